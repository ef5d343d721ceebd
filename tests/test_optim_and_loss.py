"""Optimizer groups (layer-wise lr decay, freezing, weight-decay masks) and the DiceCE loss."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from transfer_jax.models.convnext import layer_id
from transfer_jax.tasks.segmentation import dice_ce_loss
from transfer_jax.train.optim import make_optimizer


def _opt_config(**overrides):
    values = dict(lr=1.0, min_lr=0.0, warmup_steps=0, weight_decay=0.1, b1=0.9, b2=0.999, eps=1e-8, layer_decay=1.0,
                  layer_decay_scheme="group", freeze_backbone=False, frozen_patterns=(), grad_clip=0.0)
    values.update(overrides)
    return ml_collections.ConfigDict(values)


def test_group_layer_ids_follow_upstream_table():
    depths = (3, 3, 9, 3)
    assert layer_id(("downsample_layers", 0, 0, "kernel"), depths) == 0
    assert layer_id(("stages", 0, 2, "dwconv", "kernel"), depths) == 1
    assert layer_id(("downsample_layers", 1, 1, "kernel"), depths) == 2
    assert layer_id(("stages", 1, 0, "norm", "scale"), depths) == 2
    assert layer_id(("downsample_layers", 2, 0, "scale"), depths) == 3
    assert [layer_id(("stages", 2, b, "grn", "gamma"), depths) for b in range(9)] == [3, 3, 3, 4, 4, 4, 5, 5, 5]
    assert layer_id(("downsample_layers", 3, 1, "kernel"), depths) == 12
    assert layer_id(("stages", 3, 2, "pwconv1", "kernel"), depths) == 12
    assert layer_id(("norm", "scale"), depths) == 13
    # "single": every block its own id; the final norm gets the top one (scale 1)
    assert layer_id(("stages", 2, 4, "norm", "scale"), depths, "single") == 3 + 3 + 4 + 1
    assert layer_id(("norm", "bias"), depths, "single") == 19


def test_layer_decay_scales_frozen_parameters_and_decay_mask():
    params = {
        "encoder": {"stages": {"0": {"0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}},
                    "norm": {"scale": jnp.ones((2,))}},
        "decode_head": {"kernel": jnp.ones((2, 2))},
        "hidden_norm": {"scale": jnp.ones((2,))},
    }

    def ids(path):
        names = tuple(str(getattr(p, "key", p)) for p in path)[1:]
        return layer_id(tuple(int(n) if n.isdigit() else n for n in names), (3, 3, 9, 3))

    tx, _, info = make_optimizer(
        _opt_config(layer_decay=0.5, frozen_patterns=(r"^hidden_norm\.",)), params, total_steps=10,
        backbone_layer_id=ids, num_backbone_layers=18, is_backbone=lambda n: n.startswith("encoder."))
    assert info["frozen"] == ["hidden_norm.scale"]
    assert info["lr_scale"]["encoder.stages.0.0.kernel"] == pytest.approx(0.5 ** 18)  # layer 1 -> ld^(19-1)
    assert info["lr_scale"]["encoder.norm.scale"] == pytest.approx(0.5 ** 6)  # layer 13
    assert info["lr_scale"]["decode_head.kernel"] == 1.0

    grads = jax.tree.map(jnp.ones_like, params)
    state = tx.init(params)
    updates, _ = tx.update(grads, state, params)
    assert float(jnp.abs(updates["hidden_norm"]["scale"]).max()) == 0.0  # frozen: no update at all
    head = float(jnp.abs(updates["decode_head"]["kernel"]).max())
    stem = float(jnp.abs(updates["encoder"]["stages"]["0"]["0"]["kernel"]).max())
    assert stem == pytest.approx(head * 0.5 ** 18, rel=1e-5)

    # decoupled weight decay applies to matrices, not to biases / 1-D parameters
    tx, _, _ = make_optimizer(_opt_config(lr=1.0, weight_decay=0.5), params, total_steps=10, backbone_layer_id=None,
                              num_backbone_layers=0, is_backbone=lambda n: False)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    assert float(updates["decode_head"]["kernel"][0, 0]) == pytest.approx(-0.5, rel=1e-5)  # -lr * wd * w
    assert float(updates["encoder"]["stages"]["0"]["0"]["bias"][0]) == 0.0


def test_freeze_backbone_keeps_no_moments_for_it():
    params = {"encoder": {"w": jnp.ones((4, 4))}, "head": {"w": jnp.ones((4, 4))}}
    tx, _, info = make_optimizer(_opt_config(freeze_backbone=True), params, total_steps=5, backbone_layer_id=None,
                                 num_backbone_layers=0, is_backbone=lambda n: n.startswith("encoder."))
    assert info["frozen"] == ["encoder.w"]
    moments = [x for x in jax.tree.leaves(tx.init(params)) if getattr(x, "shape", ()) == (4, 4)]
    assert len(moments) == 2  # mu and nu of the head only


def _dice_ce_reference(logits, labels):
    """MONAI DiceCELoss(to_onehot_y, softmax, include_background=False) in float64 NumPy."""
    logits = logits.astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    k = logits.shape[-1]
    onehot = np.eye(k)[labels]
    axes = tuple(range(1, logits.ndim - 1))
    inter = (probs * onehot).sum(axes)
    denom = probs.sum(axes) + onehot.sum(axes)
    dice = 1 - (2 * inter + 1e-5) / (denom + 1e-5)
    ce = -np.log((probs * onehot).sum(-1)).mean()
    return dice[:, 1:].mean() + ce


def test_dice_ce_matches_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 5, 6, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=(2, 4, 5, 6))
    ours = float(dice_ce_loss(jnp.asarray(logits), jnp.asarray(labels)))
    assert ours == pytest.approx(_dice_ce_reference(logits, labels), rel=1e-5)
    perfect = np.eye(3)[labels] * 50.0
    assert float(dice_ce_loss(jnp.asarray(perfect), jnp.asarray(labels))) < 1e-3


def _mae_layer_id(name: str, depth: int) -> int:
    """MAE's `get_layer_id_for_vit` on a parameter name inside the ViT, transcribed on its own for the check."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def test_profound_vit_layer_decay_follows_mae():
    from helpers import config_for
    from transfer_jax.tasks.registry import get_task
    from transfer_jax.train.optim import make_run_optimizer
    from transfer_jax.train.state import model_graph

    config = config_for("seg", "profound_vit,smoke", **{"optimizer.layer_decay": 0.75})
    depth = config.model.backbone_options.depth
    task = get_task(config)
    _, params, _ = model_graph(task.build_model)
    _, _, info = make_run_optimizer(config, params, task.backbone_prefix)
    # parameter names as the optimizer reports them: "encoder.blocks.0.attn.qkv.kernel..value"
    encoder = {name.removeprefix("encoder.").removesuffix("..value"): scale
               for name, scale in info["lr_scale"].items() if name.startswith("encoder.")}
    ids = {name: _mae_layer_id(name, depth) for name in encoder}
    assert set(ids.values()) == set(range(depth + 2))  # embeddings, every block, the final norm
    for name, scale in encoder.items():
        assert scale == pytest.approx(0.75 ** (depth + 1 - ids[name]), rel=1e-12), name
    others = [scale for name, scale in info["lr_scale"].items() if not name.startswith("encoder.")]
    assert others and all(scale == 1.0 for scale in others)  # adapter and heads at the full lr


def test_registry_layer_ids_per_backbone():
    from transfer_jax.models.registry import layer_ids

    conv, num_conv = layer_ids("profound_conv", {"depths": (3, 3, 9, 3), "dims": (8, 8, 8, 8)}, "single")
    assert num_conv == 18 and conv(("stages", 2, 4, "norm", "scale")) == layer_id(("stages", 2, 4), (3, 3, 9, 3),
                                                                                   "single")
    vit, num_vit = layer_ids("profound_vit", {"depth": 4, "width": 48, "num_heads": 4, "out_indices": (0, 1, 2, 3)},
                             "group")
    assert num_vit == 4 and [vit(("blocks", b, "mlp")) for b in range(4)] == [1, 2, 3, 4]
    assert vit(("patch_embed", "proj", "kernel")) == vit(("cls_token",)) == 0 and vit(("norm", "scale")) == 5
    assert layer_ids("provicnet", {}, "group") == (None, 0)
    with pytest.raises(ValueError, match="unknown backbone 'resnet'"):
        layer_ids("resnet", {}, "group")
