"""AdamW with linear warm-up + half-cycle cosine, layer-wise lr decay, weight-decay masks and frozen parameters.

Matches the upstream fine-tuning recipe (`util/lr_sched.py`, `util/convnext_optim.py`): a parameter's lr is
lr(t) * ld^(L + 1 - layer_id) for backbone parameters and lr(t) for heads; weight decay (decoupled, scaled by the
same lr) skips 1-D tensors, biases and GRN gamma/beta; frozen parameters get no update and no optimizer moments.
"""
from __future__ import annotations

import re
from typing import Callable, Optional

import jax
import optax

from transfer_jax.models.registry import layer_ids

PathFn = Callable[[tuple], Optional[int]]


def _key(entry):
    return getattr(entry, "key", getattr(entry, "idx", entry))


def path_str(path: tuple) -> str:
    return ".".join(str(_key(k)) for k in path)


def learning_rate_schedule(peak: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0):
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup_steps = min(warmup_steps, total_steps - 1) if total_steps > 1 else 0
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup_steps, decay_steps=total_steps, end_value=min_lr,
    )


def _no_decay(path: str, shape) -> bool:
    last = path.rsplit(".", 1)[-1]
    return len(shape) <= 1 or last in ("bias", "gamma", "beta") or path.endswith("pos_embed") or "token" in last


def make_optimizer(config, params, *, total_steps: int, backbone_layer_id: PathFn | None, num_backbone_layers: int,
                   is_backbone: Callable[[str], bool]):
    """Build the optax transformation for `params` (a pytree) from the `optimizer` config block.

    Parameters sharing an lr scale form one group (as torch param groups do); frozen parameters form a group that
    keeps no optimizer state. Returns (tx, schedule, info); info lists frozen paths and lr scales for the log.
    """
    schedule = learning_rate_schedule(config.lr, total_steps, config.warmup_steps, config.min_lr)
    frozen_res = [re.compile(p) for p in config.frozen_patterns]
    lr_scale_res = [(re.compile(pattern), float(scale)) for pattern, scale in config.get("lr_scale_patterns", ())]
    labels, info = {}, {"frozen": [], "lr_scale": {}}
    scales: dict[str, float] = {}
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = path_str(path)
        if (config.freeze_backbone and is_backbone(name)) or any(r.search(name) for r in frozen_res):
            labels[name] = "frozen"
            info["frozen"].append(name)
            continue
        scale = 1.0
        if is_backbone(name) and config.layer_decay < 1.0 and backbone_layer_id is not None:
            scale = float(config.layer_decay ** (num_backbone_layers + 1 - backbone_layer_id(path)))
        for pattern, factor in lr_scale_res:  # e.g. ProViCNet's backbone at 0.05 x the head's lr
            if pattern.search(name):
                scale *= factor
        labels[name] = f"lr_scale={scale:.6g}"
        scales[labels[name]] = scale
        info["lr_scale"][name] = scale

    def by_path(fn):
        return lambda tree: jax.tree_util.tree_map_with_path(lambda p, leaf: fn(path_str(p), leaf), tree)

    decay_mask = by_path(lambda name, leaf: not _no_decay(name, leaf.shape))
    groups = {
        label: optax.chain(
            optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps),
            optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
            optax.scale_by_learning_rate(lambda step, k=scale: schedule(step) * k),
        )
        for label, scale in scales.items()
    }
    groups["frozen"] = optax.set_to_zero()
    label_tree = by_path(lambda name, _: labels[name])
    frozen_tree = by_path(lambda name, _: labels[name] == "frozen")
    tx = optax.chain(
        # Frozen parameters get no gradient at all, as with requires_grad=False, so they do not count in clipping.
        optax.masked(optax.set_to_zero(), frozen_tree),
        optax.clip_by_global_norm(config.grad_clip) if config.grad_clip else optax.identity(),
        optax.multi_transform(groups, label_tree),
    )
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
