"""Declarative checkpoint conversion: a key table maps a flat source dict onto an abstract Flax NNX state.

A converter is data, not code (the bonsai `params.py` pattern):

* `Rule(source_regex, target_template, transform)`: every source key that *fully* matches `source_regex` is
  written to the dotted target path `target_template` (`re.Match.expand` syntax: `\\1`, `\\g<name>`), after
  `transform` turned the PyTorch layout into the Flax one.
* `Ignore(regex, reason)`: source keys that are dropped on purpose (e.g. a pretraining decoder).
* `Default(regex, init, reason)`: target entries the source may legitimately lack; they are initialised (`ones`
  or `zeros`) and reported.

`convert_state` applies the table, checks each produced array against the abstract target (path, shape, dtype;
see `target_spec`) and collects *every* problem before raising one `ConversionError`: source keys no rule or ignore
pattern covers, keys claimed by two entries, unknown target paths, transform failures, shape mismatches (with the
expected shape), targets written twice and targets left unfilled. On success it returns the filled flat dict plus a
`ConversionReport` (what was consumed, dropped and initialised) that goes into the artifact's `model.json`.

Flat target paths are the NNX state paths joined with dots (`encoder.stages.0.1.dwconv.kernel`); list indices are
the numeric components. `unflatten` turns such a flat dict into the nested pure dict `nnx.replace_by_pure_dict`
accepts.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

__all__ = [
    "Transform", "Rule", "Ignore", "Default", "ConversionError", "ConversionReport",
    "IDENTITY", "LINEAR", "CONV2D", "CONV3D", "CONV_TRANSPOSE3D", "RESHAPE", "SPARSE_CONV3D", "SPARSE_DEPTHWISE3D",
    "transformer_block_rules", "convert_state", "target_spec", "flatten", "unflatten", "path_to_str",
]


# --------------------------------------------------------------------------------------------------------------
# Transforms: PyTorch layout -> Flax layout. Each gets the source array and the target shape it must produce.


@dataclasses.dataclass(frozen=True)
class Transform:
    name: str
    fn: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
    doc: str = ""

    def __call__(self, array: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
        return self.fn(array, target_shape)

    def __repr__(self) -> str:
        return self.name


def _transpose(axes):
    def fn(x, _shape):
        if x.ndim != len(axes):
            raise ValueError(f"expects a {len(axes)}-D array, got shape {x.shape}")
        return np.transpose(x, axes)
    return fn


def _reshape_to_target(x, shape):
    if x.size != int(np.prod(shape)):
        raise ValueError(f"cannot reshape {x.shape} ({x.size} values) to {shape}")
    return x.reshape(shape)


def _cube_root(volume: int) -> int:
    k = int(round(volume ** (1.0 / 3.0)))
    if k ** 3 != volume:
        raise ValueError(f"sparse kernel volume {volume} is not a cube")
    return k


def _sparse_conv3d(x, _shape):
    # MinkowskiConvolution kernel (k^3, Cin, Cout), offsets enumerated with the first spatial axis (D) fastest,
    # i.e. offset index = w*k*k + h*k + d (upstream `remap_checkpoint_keys`). A 1x1x1 kernel is stored squeezed
    # as (Cin, Cout). Result: Flax kernel (kd, kh, kw, Cin, Cout).
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"expects a sparse kernel (k^3, Cin, Cout) or (Cin, Cout), got shape {x.shape}")
    k = _cube_root(x.shape[0])
    # Reshaped, the three kernel axes come out as (w, h, d); reversing their order gives (d, h, w).
    return np.ascontiguousarray(x.reshape(k, k, k, x.shape[1], x.shape[2]).transpose(2, 1, 0, 3, 4))


def _sparse_depthwise3d(x, _shape):
    # MinkowskiChannelwiseConvolution kernel (k^3, C), same offset order; Flax depthwise kernel (k, k, k, 1, C).
    if x.ndim != 2:
        raise ValueError(f"expects a sparse depthwise kernel (k^3, C), got shape {x.shape}")
    k = _cube_root(x.shape[0])
    return np.ascontiguousarray(x.reshape(k, k, k, x.shape[1]).transpose(2, 1, 0, 3)[..., None, :])


IDENTITY = Transform("identity", lambda x, _s: x, "copied as is")
LINEAR = Transform("linear", _transpose((1, 0)), "torch Linear (out, in) -> Flax kernel (in, out)")
CONV2D = Transform("conv2d", _transpose((2, 3, 1, 0)), "torch Conv2d (O, I/g, kh, kw) -> (kh, kw, I/g, O)")
CONV3D = Transform(
    "conv3d", _transpose((2, 3, 4, 1, 0)), "torch Conv3d (O, I/g, kd, kh, kw) -> Flax kernel (kd, kh, kw, I/g, O)"
)
CONV_TRANSPOSE3D = Transform(
    "conv_transpose3d", _transpose((2, 3, 4, 0, 1)),
    "torch ConvTranspose3d (I, O, kd, kh, kw) -> (kd, kh, kw, I, O), used by the einsum transposed conv",
)
RESHAPE = Transform("reshape", _reshape_to_target, "same values, reshaped to the target shape (e.g. GRN (1,1,1,1,C))")
SPARSE_CONV3D = Transform(
    "sparse_conv3d", _sparse_conv3d, "Minkowski kernel (k^3, Cin, Cout), D-fastest offsets -> (kd, kh, kw, Cin, Cout)"
)
SPARSE_DEPTHWISE3D = Transform(
    "sparse_depthwise3d", _sparse_depthwise3d, "Minkowski channelwise kernel (k^3, C) -> (kd, kh, kw, 1, C)"
)


# --------------------------------------------------------------------------------------------------------------
# Table entries


@dataclasses.dataclass(frozen=True)
class Rule:
    """Source keys fully matching `source` go to `target` (a `re.Match.expand` template) through `transform`."""

    source: str
    target: str
    transform: Transform = IDENTITY

    def __post_init__(self):
        object.__setattr__(self, "_regex", re.compile(self.source))

    def match(self, key: str):
        return self._regex.fullmatch(key)


@dataclasses.dataclass(frozen=True)
class Ignore:
    """Source keys fully matching `pattern` are dropped on purpose; `reason` goes into the report."""

    pattern: str
    reason: str

    def __post_init__(self):
        object.__setattr__(self, "_regex", re.compile(self.pattern))

    def match(self, key: str):
        return self._regex.fullmatch(key)


_INITIALISERS = {"ones": np.ones, "zeros": np.zeros}


@dataclasses.dataclass(frozen=True)
class Default:
    """Target paths fully matching `pattern` that no source key fills start as `init` ('ones' or 'zeros')."""

    pattern: str
    init: str
    reason: str

    def __post_init__(self):
        if self.init not in _INITIALISERS:
            raise ValueError(f"Default init must be one of {sorted(_INITIALISERS)}, got {self.init!r}")
        object.__setattr__(self, "_regex", re.compile(self.pattern))

    def match(self, path: str):
        return self._regex.fullmatch(path)


def transformer_block_rules(src_blocks: str, dst_blocks: str) -> list[Rule]:
    """The pre-norm transformer blocks ProFound's ViT / MAE and DINOv2 share (``norm1``, ``attn.qkv``,
    ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``): torch ``{src_blocks}{i}.*`` -> Flax ``{dst_blocks}{i}.*``."""
    p = re.escape(src_blocks)
    return [
        Rule(rf"{p}(\d+)\.(norm[12])\.weight", rf"{dst_blocks}\1.\2.scale"),
        Rule(rf"{p}(\d+)\.(norm[12])\.bias", rf"{dst_blocks}\1.\2.bias"),
        # Fused qkv stays fused: rows [q | k | v], head-major, become kernel columns in the same order.
        Rule(rf"{p}(\d+)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.weight", rf"{dst_blocks}\1.\2.kernel", LINEAR),
        Rule(rf"{p}(\d+)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.bias", rf"{dst_blocks}\1.\2.bias"),
    ]


class ConversionError(ValueError):
    """Every problem found while converting one checkpoint, in one message."""

    def __init__(self, source_name: str, target_name: str, problems: Sequence[str]):
        self.source_name = source_name
        self.target_name = target_name
        self.problems = list(problems)
        lines = [f"cannot convert {source_name} into {target_name}: {len(self.problems)} problem(s):"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


@dataclasses.dataclass
class ConversionReport:
    """What a conversion did; JSON-serialisable through `to_dict`."""

    source: str
    target: str
    consumed: dict[str, str] = dataclasses.field(default_factory=dict)  # source key -> target path
    ignored: dict[str, str] = dataclasses.field(default_factory=dict)  # source key -> reason
    initialised: dict[str, str] = dataclasses.field(default_factory=dict)  # target path -> how and why
    num_parameters: int = 0  # values in the filled target (params and statistics)
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        lines = [
            f"{self.source} -> {self.target}",
            f"  {len(self.consumed)} tensors converted, {self.num_parameters:,} values in the target",
            f"  dropped {len(self.ignored)} source tensors" + (":" if self.ignored else ""),
        ]
        by_reason: dict[str, list[str]] = {}
        for key, reason in self.ignored.items():
            by_reason.setdefault(reason, []).append(key)
        for reason, keys in by_reason.items():
            shown = ", ".join(keys[:4]) + (f", ... ({len(keys)} in all)" if len(keys) > 4 else "")
            lines.append(f"    {reason}: {shown}")
        lines.append(f"  initialised {len(self.initialised)} target entries" + (":" if self.initialised else ""))
        for path, why in self.initialised.items():
            lines.append(f"    {path}: {why}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Paths and trees


def path_to_str(path: Iterable[Any]) -> str:
    return ".".join(str(getattr(p, "key", p)) for p in path)


def _path_from_str(path: str) -> tuple[Any, ...]:
    # Python attribute names never are all digits, so numeric components are list indices.
    return tuple(int(p) if p.isdigit() else p for p in path.split("."))


def target_spec(module: nnx.Module, *, exclude: Any = nnx.RngState) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat `{dotted path: ShapeDtypeStruct}` of a module's state (params, batch stats, buffers), RNG state left out.

    Pass an abstract module (`nnx.eval_shape(lambda: Model(...))`) so nothing is allocated.
    """
    state = nnx.state(module, nnx.Not(exclude)) if exclude is not None else nnx.state(module)
    spec = {}
    for path, leaf in nnx.to_flat_state(state):
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        spec[path_to_str(path)] = jax.ShapeDtypeStruct(tuple(value.shape), value.dtype)
    return spec


def flatten(tree: Mapping[Any, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict (int or str keys) -> flat dict with dotted keys. Leaves are kept as they are."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[Any, Any]:
    """Flat dotted dict -> nested dict with int keys for numeric components (the `nnx.to_pure_dict` layout)."""
    tree: dict[Any, Any] = {}
    for name, value in flat.items():
        parts = _path_from_str(name)
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"path {name!r} runs through a leaf")
        node[parts[-1]] = value
    return tree


# --------------------------------------------------------------------------------------------------------------
# The engine


def _describe(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def convert_state(
    source: Mapping[str, np.ndarray],
    rules: Sequence[Rule],
    target: Mapping[str, jax.ShapeDtypeStruct],
    *,
    ignore: Sequence[Ignore] = (),
    defaults: Sequence[Default] = (),
    source_name: str = "checkpoint",
    target_name: str = "model",
) -> tuple[dict[str, np.ndarray], ConversionReport]:
    """Apply a key table. Returns `(flat target dict of numpy arrays, report)` or raises `ConversionError`.

    `target` is `target_spec(abstract_module)` (possibly re-prefixed). Arrays are cast to the target dtype.
    """
    problems: list[str] = []
    filled: dict[str, np.ndarray] = {}
    written_by: dict[str, str] = {}
    # Targets a source key was meant for but could not fill: already reported, so not "missing" as well.
    attempted: set[str] = set()
    report = ConversionReport(source=source_name, target=target_name)

    for key in source:
        array = np.asarray(source[key])
        matches = [(rule, m) for rule in rules if (m := rule.match(key))]
        ignores = [entry for entry in ignore if entry.match(key)]
        claimants = [f"rule {r.source!r}" for r, _ in matches] + [f"ignore {i.pattern!r}" for i in ignores]
        if not claimants:
            problems.append(f"unexpected source key {key!r} {_describe(array.shape)}: no rule or ignore pattern "
                            "covers it")
            continue
        if len(claimants) > 1:
            attempted.update(m.expand(r.target) for r, m in matches)
            problems.append(f"source key {key!r} is claimed by several table entries: {', '.join(claimants)}")
            continue
        if ignores:
            report.ignored[key] = ignores[0].reason
            continue
        rule, match = matches[0]
        path = match.expand(rule.target)
        expected = target.get(path)
        if expected is None:
            close = difflib.get_close_matches(path, list(target), n=1)
            hint = f" (closest target: {close[0]!r})" if close else ""
            problems.append(f"source key {key!r} maps to {path!r}, which the target has no entry for{hint}")
            continue
        try:
            converted = rule.transform(array, tuple(expected.shape))
        except ValueError as exc:
            attempted.add(path)
            problems.append(f"source key {key!r} {_describe(array.shape)} -> {path!r}: transform "
                            f"{rule.transform.name} failed: {exc}")
            continue
        if tuple(converted.shape) != tuple(expected.shape):
            attempted.add(path)
            problems.append(
                f"source key {key!r} {_describe(array.shape)} -> {path!r}: shape {_describe(converted.shape)} after "
                f"{rule.transform.name}, expected {_describe(expected.shape)}"
            )
            continue
        if path in written_by:
            problems.append(f"target {path!r} is written by both {written_by[path]!r} and {key!r}")
            continue
        written_by[path] = key
        filled[path] = np.asarray(converted, dtype=expected.dtype)
        report.consumed[key] = path

    for path, expected in target.items():
        if path in filled or path in attempted:
            continue
        default = next((d for d in defaults if d.match(path)), None)
        if default is not None:
            filled[path] = _INITIALISERS[default.init](tuple(expected.shape), dtype=expected.dtype)
            report.initialised[path] = f"{default.init}: {default.reason}"
            continue
        problems.append(f"missing target {path!r} {_describe(expected.shape)} {np.dtype(expected.dtype).name}: "
                        "no source key provides it")

    if problems:
        raise ConversionError(source_name, target_name, problems)
    report.num_parameters = int(sum(a.size for a in filled.values()))
    return filled, report
