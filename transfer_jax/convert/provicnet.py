"""Convert the released ProViCNet checkpoints (pimed/ProViCNet on Hugging Face) into converted-weights artifacts.

The five files and the kind inferred from their keys:

* ``T2_best.pth``, ``ADC_best.pth``, ``DWI_best.pth``: kind ``mri`` (``ProViCNet_contrastive``, 204 keys),
* ``TRUS_best.pth``: kind ``trus`` (``ProViCNet_contrastive_US``: the same + ``ChannelReducer.*``, 206 keys),
* ``mpMRI_Fusion_best.pth``: kind ``fusion`` (``FusionModalities``, 30 keys).

Slice models convert with or without ``CL_Head.*`` (``drop_contrastive_head`` ignores it: only the training loss
uses it and upstream never optimised it). ``num_batches_tracked`` counters are dropped (eval uses the running
statistics; Flax keeps no counter). ``backbone.mask_token`` is *kept* (as ``backbone.mask_token``) so every tensor of
the file has a home, although only DINOv2's masked pre-training uses it.

Sizes come from the tensor shapes (width, depth, patch, position grid, registers, MLP ratio, head widths, classes,
reducer channels, CL head sizes). The head count is not visible in any shape: it defaults to ``width // 64`` (every
DINOv2 size has 64-wide heads) and can be given explicitly.

**Fusion and the stream overwrite.** Upstream inference loads ``mpMRI_Fusion_best.pth`` and then replaces each
stream's first conv + BatchNorm (``Stream_X.UpsampleModule.{1,2}``) by the matching sequence model's
``head.segmentation_conv.{1,2}`` (``load_partial_weights``). :func:`convert_fusion` therefore takes the three
sequence checkpoints (``.pth`` files or already converted artifact directories) and writes the *effective* inference
weights; the stored stream weights are consumed, replaced, and the replacement is listed in the report. Converting
with ``keep_stored_streams=True`` instead keeps the file's stream weights (what training ended with), which is
*not* what upstream inference computes.

All problems (unknown kind, unexpected / missing / renamed keys, wrong shapes, bad sequence checkpoints) are
collected and raised as one :class:`~transfer_jax.convert.table.ConversionError`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Mapping

import numpy as np
from flax import nnx

from transfer_jax.convert import artifact
from transfer_jax.convert.table import (
    CONV2D,
    LINEAR,
    RESHAPE,
    ConversionError,
    ConversionReport,
    Ignore,
    Rule,
    convert_state,
    flatten,
    target_spec,
    transformer_block_rules,
    unflatten,
)
from transfer_jax.convert.torch_pickle import load_state_dict
from transfer_jax.models.dinov2 import DinoV2Config
from transfer_jax.models.provicnet import (
    FUSION_SEQUENCES,
    ContrastiveHeadConfig,
    FusionConfig,
    FusionModalities,
    ProViCNet,
    ProViCNetConfig,
)

SLICE_MODEL_NAME = "provicnet"
FUSION_MODEL_NAME = "provicnet_fusion"
# DINOv2 ViT-S/B/L/g all use 64-wide attention heads.
DEFAULT_HEAD_DIM = 64
# Upstream file names per fusion stream (for messages only).
SEQUENCE_FILES = {"T2W": "T2_best.pth", "ADC": "ADC_best.pth", "DWI": "DWI_best.pth"}


# --------------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------------


def _conv_and_batchnorm_rules(prefix: str, conv_indices: str, bn_indices: str) -> list[Rule]:
    """Rules for an ``nn.Sequential`` of Conv2d / BatchNorm2d at ``prefix`` (regex alternations of indices)."""
    p = re.escape(prefix)
    return [
        Rule(rf"({p})\.({conv_indices})\.weight", r"\1.\2.kernel", CONV2D),
        Rule(rf"({p})\.({conv_indices})\.bias", r"\1.\2.bias"),
        Rule(rf"({p})\.({bn_indices})\.weight", r"\1.\2.scale"),
        Rule(rf"({p})\.({bn_indices})\.bias", r"\1.\2.bias"),
        Rule(rf"({p})\.({bn_indices})\.running_mean", r"\1.\2.mean"),
        Rule(rf"({p})\.({bn_indices})\.running_var", r"\1.\2.var"),
    ]


NUM_BATCHES_TRACKED = Ignore(
    r".*\.num_batches_tracked", "BatchNorm step counter: unused in eval (running statistics), Flax keeps none"
)

BACKBONE_RULES = [
    Rule(r"backbone\.(cls_token|pos_embed|register_tokens)", r"backbone.\1"),
    # Kept so every tensor has a home; only DINOv2's masked pre-training uses it (see module docstring).
    Rule(r"backbone\.mask_token", r"backbone.mask_token"),
    Rule(r"backbone\.patch_embed\.proj\.weight", r"backbone.patch_embed.proj.kernel", CONV2D),
    Rule(r"backbone\.patch_embed\.proj\.bias", r"backbone.patch_embed.proj.bias"),
    *transformer_block_rules("backbone.blocks.", "backbone.blocks."),
    Rule(r"backbone\.blocks\.(\d+)\.(ls[12])\.gamma", r"backbone.blocks.\1.\2.gamma"),
    Rule(r"backbone\.norm\.weight", r"backbone.norm.scale"),
    Rule(r"backbone\.norm\.bias", r"backbone.norm.bias"),
]

SLICE_HEAD_RULES = [
    *_conv_and_batchnorm_rules("head.segmentation_conv", "1|5|9", "2|6"),
    Rule(r"(axis_pos|axis_max)\.weight", r"\1.kernel", LINEAR),
    Rule(r"(axis_pos|axis_max)\.bias", r"\1.bias"),
]

CHANNEL_REDUCER_RULES = [
    Rule(r"ChannelReducer\.reduce_channels\.weight", r"ChannelReducer.reduce_channels.kernel", CONV2D),
    Rule(r"ChannelReducer\.reduce_channels\.bias", r"ChannelReducer.reduce_channels.bias"),
]

CONTRASTIVE_HEAD_RULES = [
    Rule(r"CL_Head\.mlp\.(\d+)\.weight", r"CL_Head.mlp.\1.kernel", LINEAR),
    Rule(r"CL_Head\.mlp\.(\d+)\.bias", r"CL_Head.mlp.\1.bias"),
    # Legacy nn.utils.weight_norm keys (the release) and the torch.nn.utils.parametrizations spelling.
    Rule(r"CL_Head\.last_layer\.(weight_g|parametrizations\.weight\.original0)", r"CL_Head.last_layer.g", RESHAPE),
    Rule(r"CL_Head\.last_layer\.(weight_v|parametrizations\.weight\.original1)", r"CL_Head.last_layer.v", LINEAR),
]

DROPPED_CONTRASTIVE_HEAD = Ignore(
    r"CL_Head\..*",
    "contrastive projection head dropped on request (only the training loss uses it; upstream never optimised it)",
)

FUSION_RULES = [
    *_conv_and_batchnorm_rules("Stream_T2W.UpsampleModule", "1", "2"),
    *_conv_and_batchnorm_rules("Stream_ADC.UpsampleModule", "1", "2"),
    *_conv_and_batchnorm_rules("Stream_DWI.UpsampleModule", "1", "2"),
    *_conv_and_batchnorm_rules("FusionSegmentation", "1|5", "2"),
]

SLICE_RULES = [*CHANNEL_REDUCER_RULES, *CONTRASTIVE_HEAD_RULES, *BACKBONE_RULES, *SLICE_HEAD_RULES]


# --------------------------------------------------------------------------------------------------------------
# Kind and size inference
# --------------------------------------------------------------------------------------------------------------


def infer_kind(state: Mapping[str, np.ndarray]) -> str | None:
    """``'mri'``, ``'trus'`` or ``'fusion'`` from the key set, ``None`` if it is none of them."""
    keys = set(state)
    if any(k.startswith("FusionSegmentation.") for k in keys) and any(k.startswith("Stream_") for k in keys):
        return "fusion"
    if {"backbone.pos_embed", "head.segmentation_conv.9.weight"} <= keys and any(k.startswith("axis_") for k in keys):
        return "trus" if any(k.startswith("ChannelReducer.") for k in keys) else "mri"
    return None


def _unknown_kind_problems(state: Mapping[str, np.ndarray]) -> list[str]:
    keys = sorted(state)
    problems = [
        "cannot tell which ProViCNet checkpoint this is: a slice model (T2/ADC/DWI/TRUS_best.pth) has "
        "'backbone.pos_embed', 'head.segmentation_conv.9.weight' and 'axis_pos.*'; the fusion model "
        "(mpMRI_Fusion_best.pth) has 'Stream_{T2W,ADC,DWI}.UpsampleModule.*' and 'FusionSegmentation.*'"
    ]
    if "pos_embed" in state and any(k.startswith("blocks.") for k in keys):
        problems.append("the keys look like a bare DINOv2 backbone ('pos_embed', 'blocks.N.*' without 'backbone.'), "
                        "not a ProViCNet model")
    shown = ", ".join(repr(k) for k in keys[:8])
    problems.append(f"the file has {len(keys)} keys, starting with {shown}")
    return problems


def _shape(state, key):
    value = state.get(key)
    return None if value is None else tuple(np.shape(value))


def infer_slice_config(
    state: Mapping[str, np.ndarray], *, num_heads: int | None = None, drop_contrastive_head: bool = False
) -> tuple[ProViCNetConfig, list[str]]:
    """Model config from tensor shapes, plus the problems found (the config then uses released defaults there)."""
    problems: list[str] = []
    defaults = ProViCNetConfig()
    vit = defaults.backbone

    def need(key, ndim):
        shape = _shape(state, key)
        if shape is None:
            problems.append(f"missing source key {key!r}, needed to infer the model size")
        elif len(shape) != ndim:
            problems.append(f"source key {key!r} has shape {shape}, expected a {ndim}-D tensor")
            return None
        return shape

    pos = need("backbone.pos_embed", 3)
    width, pos_grid = vit.width, vit.pos_grid
    if pos:
        width = pos[2]
        pos_grid = math.isqrt(pos[1] - 1)
        if pos_grid * pos_grid != pos[1] - 1:
            problems.append(f"backbone.pos_embed {pos}: {pos[1] - 1} patch positions is not a square grid")
    patch_w = need("backbone.patch_embed.proj.weight", 4)
    patch, in_channels = vit.patch, vit.in_channels
    if patch_w:
        patch, in_channels = patch_w[2], patch_w[1]
        if patch_w[2] != patch_w[3]:
            problems.append(f"backbone.patch_embed.proj.weight {patch_w}: non-square patches are not supported")
    registers = need("backbone.register_tokens", 3)
    if registers is None and "backbone.register_tokens" not in state:
        problems.append("only the *_reg DINOv2 backbones (registers, antialiased position resize) are supported")
    depth_indices = sorted({int(m.group(1)) for k in state if (m := re.match(r"backbone\.blocks\.(\d+)\.", k))})
    if depth_indices != list(range(len(depth_indices))):
        problems.append(f"backbone block indices are not 0..N-1: {depth_indices}")
    if not depth_indices:
        problems.append("no backbone.blocks.N.* keys")
    fc1 = _shape(state, "backbone.blocks.0.mlp.fc1.weight")
    if "backbone.blocks.0.ls1.gamma" not in state and depth_indices:
        problems.append("backbone.blocks.0.ls1.gamma is missing: backbones without LayerScale are not supported")
    heads = num_heads if num_heads is not None else max(width // DEFAULT_HEAD_DIM, 1)
    if width % heads:
        problems.append(f"width {width} is not divisible by {heads} heads (pass num_heads)")
        heads = 1
    backbone = DinoV2Config(
        width=width,
        depth=len(depth_indices) or vit.depth,
        num_heads=heads,
        patch=patch,
        pos_grid=pos_grid,
        num_registers=registers[1] if registers else vit.num_registers,
        mlp_ratio=(fc1[0] / width) if fc1 else vit.mlp_ratio,
        in_channels=in_channels,
    )
    conv1, conv5, conv9 = (need(f"head.segmentation_conv.{i}.weight", 4) for i in (1, 5, 9))
    reducer = _shape(state, "ChannelReducer.reduce_channels.weight")
    contrastive = None
    if not drop_contrastive_head and any(k.startswith("CL_Head.") for k in state):
        mlp_rows = {
            int(m.group(1)): state[k].shape
            for k in state
            if (m := re.fullmatch(r"CL_Head\.mlp\.(\d+)\.weight", k))
        }
        last = _shape(state, "CL_Head.last_layer.weight_v") or _shape(
            state, "CL_Head.last_layer.parametrizations.weight.original1"
        )
        if len(mlp_rows) < 2 or last is None:
            problems.append(
                "CL_Head is incomplete: expected CL_Head.mlp.{0,2,...}.weight and CL_Head.last_layer.weight_v "
                "(or parametrizations.weight.original1); pass drop_contrastive_head to convert without it"
            )
        else:
            ordered = [mlp_rows[i] for i in sorted(mlp_rows)]
            contrastive = ContrastiveHeadConfig(
                hidden=ordered[0][0], bottleneck=ordered[-1][0], out_dim=last[0], num_layers=len(ordered)
            )
    config = ProViCNetConfig(
        backbone=backbone,
        num_classes=conv9[0] if conv9 else defaults.num_classes,
        head_channels=(conv1[0] if conv1 else 128, conv5[0] if conv5 else 64),
        reducer_in_channels=reducer[1] if reducer else None,
        contrastive_head=contrastive,
    )
    return config, problems


def infer_fusion_config(state: Mapping[str, np.ndarray]) -> tuple[FusionConfig, list[str]]:
    problems = []
    stream = _shape(state, "Stream_T2W.UpsampleModule.1.weight")
    last = _shape(state, "FusionSegmentation.5.weight")
    if stream is None or len(stream) != 4:
        problems.append(f"Stream_T2W.UpsampleModule.1.weight is missing or not 4-D ({stream}), needed for sizes")
    if last is None or len(last) != 4:
        problems.append(f"FusionSegmentation.5.weight is missing or not 4-D ({last}), needed for sizes")
    default = FusionConfig()
    config = FusionConfig(
        embedding=stream[1] if stream and len(stream) == 4 else default.embedding,
        target_channels=stream[0] if stream and len(stream) == 4 else default.target_channels,
        num_classes=last[0] if last and len(last) == 4 else default.num_classes,
    )
    return config, problems


# --------------------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Converted:
    """A converted model: flat state ``{dotted NNX path: array}``, its config and the conversion report."""

    model_name: str
    kind: str
    config: ProViCNetConfig | FusionConfig
    state: dict[str, np.ndarray]
    report: ConversionReport

    def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> str:
        return artifact.save_converted(
            directory, self.model_name, self.config.to_dict(), self.state, self.report.to_dict(), overwrite=overwrite
        )

    def to_module(self):
        """The converted module in eval mode, without writing an artifact."""
        return module_from_state(self.model_name, self.config.to_dict(), self.state)


def _target(module_factory) -> dict:
    return target_spec(nnx.eval_shape(module_factory))


def _read(source: str | os.PathLike | Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
    if isinstance(source, Mapping):
        return dict(source), "state dict"
    return load_state_dict(source), os.fspath(source)


def convert_slice_model(
    source: str | os.PathLike | Mapping[str, np.ndarray],
    *,
    num_heads: int | None = None,
    drop_contrastive_head: bool = False,
    source_name: str | None = None,
) -> Converted:
    """Convert a T2/ADC/DWI/TRUS checkpoint (path or flat ``{key: array}``) into ProViCNet state."""
    state, name = _read(source)
    name = source_name or name
    kind = infer_kind(state)
    if kind not in ("mri", "trus"):
        problems = _unknown_kind_problems(state) if kind is None else [
            "this is the mpMRI fusion checkpoint, not a slice model: use convert_fusion"
        ]
        raise ConversionError(name, "ProViCNet slice model", problems)
    config, problems = infer_slice_config(state, num_heads=num_heads, drop_contrastive_head=drop_contrastive_head)
    ignore = [NUM_BATCHES_TRACKED] + ([DROPPED_CONTRASTIVE_HEAD] if drop_contrastive_head else [])
    rules = [r for r in SLICE_RULES if not (drop_contrastive_head and r in CONTRASTIVE_HEAD_RULES)]
    target_name = f"ProViCNet ({kind})"
    try:
        flat, report = convert_state(
            state, rules, _target(lambda: ProViCNet(config, rngs=nnx.Rngs(0))), ignore=ignore,
            source_name=name, target_name=target_name,
        )
    except ConversionError as error:
        raise ConversionError(name, target_name, problems + error.problems) from None
    if problems:
        raise ConversionError(name, target_name, problems)
    report.notes.append(f"kind {kind}: {'ProViCNet_contrastive_US (9-channel TRUS input)' if kind == 'trus' else 'ProViCNet_contrastive (3-channel MRI input)'}")
    report.notes.append("backbone.mask_token kept as a parameter; unused at inference (DINOv2 masked pre-training only)")
    report.notes.append(f"num_heads = {config.backbone.num_heads} ("
                        + ("given" if num_heads is not None else f"width {config.backbone.width} // {DEFAULT_HEAD_DIM}")
                        + "; not visible in the shapes)")
    if config.contrastive_head is None:
        report.notes.append("no CL_Head in the converted model" + (" (dropped on request)" if drop_contrastive_head
                                                                   else " (absent from the checkpoint)"))
    return Converted(SLICE_MODEL_NAME, kind, config, flat, report)


_STREAM_SOURCE_PATHS = {
    # fusion target entry suffix -> sequence model entry (upstream copies Sequential entries 1 and 2 by name)
    "1.kernel": "head.segmentation_conv.1.kernel",
    "1.bias": "head.segmentation_conv.1.bias",
    "2.scale": "head.segmentation_conv.2.scale",
    "2.bias": "head.segmentation_conv.2.bias",
    "2.mean": "head.segmentation_conv.2.mean",
    "2.var": "head.segmentation_conv.2.var",
}


def _sequence_head_entries(
    source: str | os.PathLike | Mapping[str, np.ndarray], num_heads: int | None, problems: list[str], stream: str
) -> tuple[dict[str, np.ndarray], str] | None:
    """The converted ``head.segmentation_conv.{1,2}`` entries of one sequence model (checkpoint or artifact)."""
    label = f"Stream_{stream} source"
    try:
        if not isinstance(source, Mapping) and os.path.isdir(source):
            loaded = artifact.load_converted(source)
            if loaded.model_name != SLICE_MODEL_NAME:
                problems.append(f"{label} {os.fspath(source)!r} is a {loaded.model_name!r} artifact, expected "
                                f"{SLICE_MODEL_NAME!r} (the {SEQUENCE_FILES[stream]} model)")
                return None
            if ProViCNetConfig.from_dict(loaded.config).reducer_in_channels:
                problems.append(f"{label} {os.fspath(source)!r} is a TRUS model, expected the "
                                f"{SEQUENCE_FILES[stream]} MRI model")
                return None
            flat, name = flatten(loaded.state), os.fspath(source)
        else:
            converted = convert_slice_model(source, num_heads=num_heads, drop_contrastive_head=True)
            if converted.kind != "mri":
                problems.append(f"{label} {converted.report.source!r} is a {converted.kind} model, expected the "
                                f"{SEQUENCE_FILES[stream]} MRI model")
                return None
            flat, name = converted.state, converted.report.source
    except (ConversionError, ValueError) as error:
        problems.append(f"{label} cannot be used: {error}")
        return None
    missing = [p for p in _STREAM_SOURCE_PATHS.values() if p not in flat]
    if missing:
        problems.append(f"{label} {name!r} lacks {missing}")
        return None
    return {suffix: np.asarray(flat[path]) for suffix, path in _STREAM_SOURCE_PATHS.items()}, name


def convert_fusion(
    source: str | os.PathLike | Mapping[str, np.ndarray],
    sequence_sources: Mapping[str, str | os.PathLike | Mapping[str, np.ndarray]] | None = None,
    *,
    keep_stored_streams: bool = False,
    num_heads: int | None = None,
    source_name: str | None = None,
) -> Converted:
    """Convert ``mpMRI_Fusion_best.pth`` and apply the upstream inference overwrite of its streams.

    ``sequence_sources`` maps ``"T2W"``, ``"ADC"``, ``"DWI"`` to the sequence checkpoints (``.pth``) or converted
    artifact directories; their ``head.segmentation_conv.{1,2}`` replace ``Stream_X.UpsampleModule.{1,2}``.
    ``keep_stored_streams=True`` skips the overwrite (training-time weights, not upstream inference).
    """
    state, name = _read(source)
    name = source_name or name
    target_name = "ProViCNet FusionModalities"
    kind = infer_kind(state)
    if kind != "fusion":
        problems = _unknown_kind_problems(state) if kind is None else [
            f"this is a {kind} slice model, not the mpMRI fusion checkpoint: use convert_slice_model"
        ]
        raise ConversionError(name, target_name, problems)
    config, problems = infer_fusion_config(state)
    sequence_sources = dict(sequence_sources or {})
    if keep_stored_streams and sequence_sources:
        problems.append("both sequence checkpoints for the stream overwrite and keep_stored_streams were given")
    if not keep_stored_streams:
        unknown = sorted(set(sequence_sources) - set(FUSION_SEQUENCES))
        if unknown:
            problems.append(f"unknown stream name(s) {unknown}; expected {list(FUSION_SEQUENCES)}")
        for stream in FUSION_SEQUENCES:
            if stream not in sequence_sources:
                problems.append(
                    f"no sequence checkpoint for Stream_{stream}: upstream inference overwrites it with "
                    f"{SEQUENCE_FILES[stream]}'s head.segmentation_conv.{{1,2}} (pass it, or keep_stored_streams)"
                )
    overwrites = {}
    for stream, stream_source in sequence_sources.items():
        if stream in FUSION_SEQUENCES and not keep_stored_streams:
            entries = _sequence_head_entries(stream_source, num_heads, problems, stream)
            if entries is not None:
                overwrites[stream] = entries
    target = _target(lambda: FusionModalities(config, rngs=nnx.Rngs(0)))
    try:
        flat, report = convert_state(
            state, FUSION_RULES, target, ignore=[NUM_BATCHES_TRACKED], source_name=name, target_name=target_name
        )
    except ConversionError as error:
        raise ConversionError(name, target_name, problems + error.problems) from None
    for stream, (entries, sequence_name) in overwrites.items():
        for suffix, value in entries.items():
            path = f"Stream_{stream}.UpsampleModule.{suffix}"
            if tuple(value.shape) != tuple(flat[path].shape):
                problems.append(
                    f"Stream_{stream} overwrite: {sequence_name!r} head.segmentation_conv.{suffix} has shape "
                    f"{tuple(value.shape)}, the fusion stream {path!r} has {tuple(flat[path].shape)}"
                )
                continue
            flat[path] = value.astype(flat[path].dtype)
        report.notes.append(
            f"Stream_{stream}.UpsampleModule.{{1,2}} (conv, BatchNorm) overwritten by head.segmentation_conv.{{1,2}} "
            f"of {sequence_name} (upstream inference load_partial_weights); the stored stream weights are unused"
        )
    if problems:
        raise ConversionError(name, target_name, problems)
    if keep_stored_streams:
        report.notes.append(
            "stream weights kept as stored (keep_stored_streams): upstream inference would replace them by the "
            "T2/ADC/DWI heads' first conv + BatchNorm"
        )
    return Converted(FUSION_MODEL_NAME, "fusion", config, flat, report)


def convert_checkpoint(
    source: str | os.PathLike | Mapping[str, np.ndarray],
    *,
    sequence_sources: Mapping[str, Any] | None = None,
    keep_stored_streams: bool = False,
    num_heads: int | None = None,
    drop_contrastive_head: bool = False,
) -> Converted:
    """Convert any of the five released files, dispatching on the kind inferred from the keys."""
    state, name = _read(source)
    kind = infer_kind(state)
    if kind == "fusion":
        return convert_fusion(state, sequence_sources, keep_stored_streams=keep_stored_streams,
                              num_heads=num_heads, source_name=name)
    if kind is None:
        raise ConversionError(name, "ProViCNet", _unknown_kind_problems(state))
    if sequence_sources or keep_stored_streams:
        raise ConversionError(name, f"ProViCNet ({kind})", [
            "stream options (sequence checkpoints / keep_stored_streams) only apply to the fusion checkpoint"
        ])
    return convert_slice_model(state, num_heads=num_heads, drop_contrastive_head=drop_contrastive_head,
                               source_name=name)


# --------------------------------------------------------------------------------------------------------------
# Loading artifacts back into modules
# --------------------------------------------------------------------------------------------------------------


def build_model(model_name: str, config: Mapping[str, Any], *, rngs: nnx.Rngs | None = None):
    """A randomly initialised ProViCNet / FusionModalities from an artifact's ``model`` and ``config`` fields."""
    rngs = rngs or nnx.Rngs(0)
    if model_name == SLICE_MODEL_NAME:
        return ProViCNet(ProViCNetConfig.from_dict(config), rngs=rngs)
    if model_name == FUSION_MODEL_NAME:
        return FusionModalities(FusionConfig.from_dict(config), rngs=rngs)
    raise ValueError(f"not a ProViCNet artifact: model {model_name!r} (expected {SLICE_MODEL_NAME!r} or "
                     f"{FUSION_MODEL_NAME!r})")


def module_from_state(model_name: str, config: Mapping[str, Any], state: Mapping[Any, Any]):
    """Build the module of ``model_name``/``config`` and fill it with ``state`` (flat dotted or nested); eval mode.

    Raises ``ValueError`` listing every missing, unexpected or mis-shaped entry.
    """
    abstract = nnx.eval_shape(lambda: build_model(model_name, config))
    graphdef, abstract_state = nnx.split(abstract)
    expected = target_spec(abstract)
    flat = flatten(state)
    problems = [f"missing {p!r}" for p in expected if p not in flat]
    problems += [f"unexpected {p!r}" for p in flat if p not in expected]
    problems += [
        f"{p!r} has shape {tuple(np.shape(flat[p]))}, expected {tuple(s.shape)}"
        for p, s in expected.items()
        if p in flat and tuple(np.shape(flat[p])) != tuple(s.shape)
    ]
    if problems:
        raise ValueError(f"{model_name} state does not match its config: " + "; ".join(problems))
    pure = unflatten({p: np.asarray(v, dtype=expected[p].dtype) for p, v in flat.items()})
    nnx.replace_by_pure_dict(abstract_state, pure)
    model = nnx.merge(graphdef, abstract_state)
    model.eval()  # BatchNorm on running statistics
    return model


def load_provicnet(directory: str | os.PathLike, *, expect: str | None = None):
    """Rebuild the module stored in a converted artifact (eval mode: BatchNorm uses running statistics).

    ``expect`` (``'provicnet'`` / ``'provicnet_fusion'``) turns a wrong artifact into a clear error.
    """
    loaded = artifact.load_converted(directory)
    if expect is not None and loaded.model_name != expect:
        raise artifact.ArtifactError(directory, f"holds a {loaded.model_name!r} model, expected {expect!r}")
    try:
        return module_from_state(loaded.model_name, loaded.config, loaded.state)
    except ValueError as error:
        raise artifact.ArtifactError(directory, str(error)) from None
