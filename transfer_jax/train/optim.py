"""AdamW with layer-wise lr decay, weight-decay masks, frozen parameters and upstream's two kinds of schedule.

Matches the upstream fine-tuning recipes. ProFound (`util/lr_sched.py`, `util/convnext_optim.py`,
`util/lr_decay.py`): a parameter's lr is lr(t) * ld^(L + 1 - layer_id) for backbone parameters and lr(t) for heads,
lr(t) a linear warm-up then a half-cycle cosine stepped every iteration (`schedule="cosine"`). ProViCNet
(`train.py`): a constant lr per group reduced by torch's `ReduceLROnPlateau` on the validation loss
(`schedule="plateau"`, see `Plateau`). Weight decay (decoupled, scaled by the same lr) skips what
upstream's parameter groups skip (`no_decay_rule`); frozen parameters get no update and no optimizer moments.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from transfer_jax.models.registry import layer_ids

PathFn = Callable[[tuple], Optional[int]]
SCHEDULES = ("cosine", "plateau")
NO_DECAY_RULES = ("names", "ndim")


def _key(entry):
    return getattr(entry, "key", getattr(entry, "idx", entry))


def path_str(path: tuple) -> str:
    """"encoder.blocks.0.attn.qkv.kernel" for a parameter's tree path (an NNX Variable's `.value` step left out, so
    the name ends with the parameter's own name, as in torch)."""
    return ".".join(str(_key(k)) for k in path
                    if not (isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value"))


def learning_rate_schedule(peak: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0,
                           kind: str = "cosine"):
    """Linear warm-up from 0 to `peak`, then a half-cycle cosine to `min_lr` at `total_steps` ("cosine") or a
    constant `peak` ("plateau": the plateau scaling comes on top, from the evaluations)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if kind not in SCHEDULES:
        raise ValueError(f"optimizer.schedule must be one of {SCHEDULES}, got {kind!r}")
    warmup_steps = min(warmup_steps, total_steps - 1) if total_steps > 1 else 0
    if kind == "plateau":
        if warmup_steps == 0:  # (optax's warm-up of 0 steps would stay at its initial value)
            return optax.constant_schedule(peak)
        return optax.warmup_constant_schedule(init_value=0.0, peak_value=peak, warmup_steps=warmup_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup_steps, decay_steps=total_steps, end_value=min_lr,
    )


# --------------------------------------------------------------------------------------------------------------
# ReduceLROnPlateau


class PlateauState(NamedTuple):
    """torch `ReduceLROnPlateau`'s counters for one parameter group; `min_scale` and `eps_scale` are the group's
    `min_lr` and torch's `eps` (1e-8) divided by the group's base lr, set at init."""
    scale: jax.Array  # the group's lr / its base lr
    best: jax.Array
    num_bad: jax.Array
    cooldown_left: jax.Array
    min_scale: jax.Array
    eps_scale: jax.Array


class Plateau(NamedTuple):
    """torch `ReduceLROnPlateau(mode, factor, patience, threshold, threshold_mode="rel", cooldown, min_lr)`.

    `optax.contrib.reduce_on_plateau` differs: it reduces after `patience` bad values (torch: more than
    `patience`), has no "max" mode with torch's relative threshold, floors a scale rather than each group's lr,
    and reads its value at every update. Here the optimizer only applies the scale (`transform`) and the trainer
    feeds each evaluation's metric in (`observe_evaluation`), as upstream calls `scheduler.step(val_loss)` once per
    epoch after validating.
    """
    metric: str = "loss"
    mode: str = "min"
    factor: float = 0.1
    patience: int = 10
    threshold: float = 1e-4
    cooldown: int = 0
    min_lr: float = 0.0
    eps: float = 1e-8

    @classmethod
    def from_config(cls, values) -> "Plateau":
        values = dict(values or {})
        unknown = sorted(set(values) - set(cls._fields))
        if unknown:
            raise ValueError(f"optimizer.plateau: unknown key(s) {unknown}; expected a subset of {cls._fields}")
        plateau = cls(**values)
        if plateau.mode not in ("min", "max"):
            raise ValueError(f"optimizer.plateau.mode must be 'min' or 'max', got {plateau.mode!r}")
        if not 0.0 < plateau.factor < 1.0:
            raise ValueError(f"optimizer.plateau.factor must be in (0, 1), got {plateau.factor}")
        return plateau

    def transform(self, base_lr: float) -> optax.GradientTransformation:
        """Multiplies the updates of a group whose lr is `base_lr` by its plateau scale."""
        def init(params):
            del params
            base = max(float(base_lr), 1e-30)
            return PlateauState(scale=jnp.ones((), jnp.float32),
                                best=jnp.asarray(math.inf if self.mode == "min" else -math.inf, jnp.float32),
                                num_bad=jnp.zeros((), jnp.int32), cooldown_left=jnp.zeros((), jnp.int32),
                                min_scale=jnp.asarray(self.min_lr / base, jnp.float32),
                                eps_scale=jnp.asarray(self.eps / base, jnp.float32))

        def update(updates, state, params=None):
            del params
            return jax.tree.map(lambda u: u * state.scale.astype(u.dtype), updates), state

        return optax.GradientTransformation(init, update)

    def step(self, state: PlateauState, value) -> PlateauState:
        """One `scheduler.step(value)`, as torch orders it: improvement, cooldown, then the reduction."""
        value = jnp.asarray(value, jnp.float32)
        if self.mode == "min":
            better = value < state.best * (1.0 - self.threshold)
        else:
            better = value > state.best * (1.0 + self.threshold)
        best = jnp.where(better, value, state.best)
        num_bad = jnp.where(better, 0, state.num_bad + 1)
        in_cooldown = state.cooldown_left > 0
        cooldown_left = jnp.where(in_cooldown, state.cooldown_left - 1, state.cooldown_left)
        num_bad = jnp.where(in_cooldown, 0, num_bad)
        reduce = num_bad > self.patience
        new_scale = jnp.maximum(state.scale * self.factor, state.min_scale)
        scale = jnp.where(reduce & (state.scale - new_scale > state.eps_scale), new_scale, state.scale)
        return state._replace(scale=scale, best=best, num_bad=jnp.where(reduce, 0, num_bad),
                              cooldown_left=jnp.where(reduce, self.cooldown, cooldown_left))


@functools.partial(jax.jit, static_argnums=0)
def _plateau_steps(plateau: Plateau, states: list, value) -> list:
    return [plateau.step(s, value) for s in states]


def observe_evaluation(opt_state, metrics: dict, optimizer_config):
    """The optimizer state after an evaluation's `metrics` (the trainer calls it after every evaluation but the
    one before training): with `optimizer.schedule="plateau"` every group's plateau counters take one step on
    `metrics[optimizer.plateau.metric]`; otherwise `opt_state` unchanged. One evaluation = one upstream epoch, so
    set `eval_every` to the steps of an epoch to reproduce upstream's cadence."""
    if optimizer_config.get("schedule", "cosine") != "plateau":
        return opt_state
    plateau = Plateau.from_config(optimizer_config.get("plateau"))
    if plateau.metric not in metrics:
        raise KeyError(f"optimizer.plateau.metric={plateau.metric!r} is not an evaluation metric; the evaluation "
                       f"gives {sorted(metrics)}")
    is_plateau = lambda x: isinstance(x, PlateauState)  # noqa: E731
    leaves, treedef = jax.tree.flatten(opt_state, is_leaf=is_plateau)
    where = [i for i, leaf in enumerate(leaves) if is_plateau(leaf)]
    stepped = _plateau_steps(plateau, [leaves[i] for i in where], float(metrics[plateau.metric]))
    for i, state in zip(where, stepped):  # same placement as before, which the compiled train step expects
        leaves[i] = jax.tree.map(lambda new, old: jax.device_put(new, getattr(old, "sharding", None)), state,
                                 leaves[i])
    return jax.tree.unflatten(treedef, leaves)


# --------------------------------------------------------------------------------------------------------------
# Parameter groups


def skip_zero_gradient_steps(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner`, except that a step whose gradients are all exactly zero changes nothing: no update and the same
    optimizer state (moments, counts), as upstream's `continue` skips the optimizer step. A task asks for a skip by
    returning a loss that is zero for the batch (ProViCNet: no cancer pixel)."""
    def update(updates, state, params=None):
        skip = jnp.logical_not(jnp.any(jnp.stack([jnp.any(g != 0) for g in jax.tree.leaves(updates)])))
        new_updates, new_state = inner.update(updates, state, params)
        new_updates = jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), new_updates)
        new_state = jax.tree.map(lambda new, old: jnp.where(skip, old, new), new_state, state)
        return new_updates, new_state

    return optax.GradientTransformation(inner.init, update)


def no_weight_decay(path: str, shape, rule: str = "names") -> bool:
    """True where upstream's parameter groups set weight_decay 0.

    "names" (ConvNeXt `get_parameter_groups`, the heads' `decoder_parameters`): 1-D tensors, biases, GRN
    gamma/beta, position tables and tokens. "ndim" (MAE/BEiT `param_groups_lrd`, ProFound-ViT): 1-D tensors only;
    the cls token decays."""
    if rule not in NO_DECAY_RULES:
        raise ValueError(f"optimizer.no_decay_rule must be one of {NO_DECAY_RULES}, got {rule!r}")
    if len(shape) <= 1:
        return True
    if rule == "ndim":
        return False
    last = path.rsplit(".", 1)[-1]
    return last in ("bias", "gamma", "beta") or path.endswith("pos_embed") or "token" in last


def make_optimizer(config, params, *, total_steps: int, backbone_layer_id: PathFn | None, num_backbone_layers: int,
                   is_backbone: Callable[[str], bool]):
    """Build the optax transformation for `params` (a pytree) from the `optimizer` config block.

    Parameters sharing an lr scale and a weight decay form one group (as torch param groups do); frozen
    parameters form a group that keeps no optimizer state. Returns (tx, schedule, info); info lists frozen paths,
    lr scales and weight decays for the log and tests.
    """
    kind = config.get("schedule", "cosine")
    schedule = learning_rate_schedule(config.lr, total_steps, config.warmup_steps, config.min_lr, kind)
    plateau = Plateau.from_config(config.get("plateau")) if kind == "plateau" else None
    rule = config.get("no_decay_rule", "names")
    head_decay = config.get("head_weight_decay")
    head_decay = config.weight_decay if head_decay is None else float(head_decay)
    frozen_res = [re.compile(p) for p in config.frozen_patterns]
    lr_scale_res = [(re.compile(pattern), float(scale)) for pattern, scale in config.get("lr_scale_patterns", ())]
    labels, info = {}, {"frozen": [], "lr_scale": {}, "weight_decay": {}}
    groups_spec: dict[str, tuple[float, float]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = path_str(path)
        backbone = is_backbone(name)
        if (config.freeze_backbone and backbone) or any(r.search(name) for r in frozen_res):
            labels[name] = "frozen"
            info["frozen"].append(name)
            continue
        scale = 1.0
        if backbone and config.layer_decay < 1.0 and backbone_layer_id is not None:
            scale = float(config.layer_decay ** (num_backbone_layers + 1 - backbone_layer_id(path)))
        for pattern, factor in lr_scale_res:  # e.g. ProViCNet's backbone at 0.05 x the head's lr
            if pattern.search(name):
                scale *= factor
        decay = 0.0 if no_weight_decay(name, leaf.shape, rule if backbone else "names") else \
            (config.weight_decay if backbone else head_decay)
        labels[name] = f"lr_scale={scale:.6g},wd={decay:.6g}"
        groups_spec[labels[name]] = (scale, decay)
        info["lr_scale"][name] = scale
        info["weight_decay"][name] = decay

    def group(scale: float, decay: float):
        return optax.chain(
            optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps),
            optax.add_decayed_weights(decay) if decay else optax.identity(),
            optax.scale_by_learning_rate(lambda step, k=scale: schedule(step) * k),
            plateau.transform(config.lr * scale) if plateau is not None else optax.identity(),
        )

    def by_path(fn):
        return lambda tree: jax.tree_util.tree_map_with_path(lambda p, leaf: fn(path_str(p), leaf), tree)

    groups = {label: group(*spec) for label, spec in groups_spec.items()}
    groups["frozen"] = optax.set_to_zero()
    label_tree = by_path(lambda name, _: labels[name])
    frozen_tree = by_path(lambda name, _: labels[name] == "frozen")
    tx = optax.chain(
        # Frozen parameters get no gradient at all, as with requires_grad=False, so they do not count in clipping.
        optax.masked(optax.set_to_zero(), frozen_tree),
        optax.clip_by_global_norm(config.grad_clip) if config.grad_clip else optax.identity(),
        optax.multi_transform(groups, label_tree),
    )
    if config.get("skip_zero_gradient_steps", False):
        tx = skip_zero_gradient_steps(tx)
    return tx, schedule, info


def make_run_optimizer(config, params, backbone_prefix: str):
    """`make_optimizer` for a run's config: parameters under `backbone_prefix` (e.g. "encoder.") form the
    backbone, with the layer-wise lr decay its registry entry defines (`models.registry.layer_ids`)."""
    model = config.model
    layer_fn, num_layers = layer_ids(model.backbone, model.backbone_options, config.optimizer.layer_decay_scheme)
    skip = len(backbone_prefix.rstrip(".").split("."))

    def backbone_layer_id(path: tuple) -> int:  # the registry's ids take paths inside the backbone
        return layer_fn(tuple(_key(k) for k in path[skip:]))

    return make_optimizer(config.optimizer, params, total_steps=config.total_steps,
                          backbone_layer_id=backbone_layer_id if layer_fn is not None else None,
                          num_backbone_layers=num_layers, is_backbone=lambda name: name.startswith(backbone_prefix))
