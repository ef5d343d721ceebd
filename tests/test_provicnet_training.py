"""ProViCNet fine-tuning through the one training loop (`configs/seg.py:provicnet`, tasks/slice_segmentation.py)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from helpers import config_for, fixture_path, load_config
from transfer_jax.convert.provicnet import convert_slice_model
from transfer_jax.convert.table import flatten
from transfer_jax.tasks.registry import get_task
from transfer_jax.tasks.slice_segmentation import SliceSegmentationTask
from transfer_jax.train.loop import train_and_evaluate

def _config(**overrides):
    return config_for("seg", "provicnet,smoke", **overrides)


def _phantom_sample(depth=4, size=64, seed=0, lesion_box=((1, 3), (16, 48), (16, 48))):
    """A prepared-case-like crop: gland disc in every slice, a lesion block (csPCa) inside it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size * 0.4) ** 2
    gland = np.broadcast_to(disc, (depth, size, size)).astype(np.uint8).copy()
    lesion = np.zeros_like(gland)
    (z0, z1), (y0, y1), (x0, x1) = lesion_box
    lesion[z0:z1, y0:y1, x0:x1] = 1
    image = rng.normal(size=(depth, size, size, 3)).astype(np.float32) + 2.0 * gland[..., None] - lesion[..., None]
    return {"image": image, "gland": gland, "lesion": lesion, "label": None, "case_index": np.int32(0)}


def _batch(task, samples):
    rows = [task.make_sample(s) for s in samples]
    return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def test_config_defaults_are_upstreams():
    config = load_config("seg", "provicnet")
    task = get_task(config)
    assert isinstance(task, SliceSegmentationTask)
    assert task.class_weights == (0.02, 0.04, 0.5, 0.5)
    assert task.eval_class_weights == (0.0, 0.0, 0.5, 0.5)
    assert task.alpha == 0.0 and config.task.sequence == "t2"
    assert task.label_size == 8 * config.task.image_size // 14 == config.data.crop_size[1]
    full = load_config("seg", "provicnet,full")
    full_task = get_task(full)
    assert (full.task.image_size, full_task.label_size) == (448, 256)
    assert full.model.backbone_options.backbone.width == 384 and full.model.backbone_options.backbone.depth == 12
    # the released geometry fits together: 448 px stacks -> 256 x 256 logits (shapes only, nothing is computed)
    batch = {"image": jax.ShapeDtypeStruct((1, 2, 448, 448, 3), jnp.float32),
             "slice_position": jax.ShapeDtypeStruct((1, 2, 2), jnp.float32),
             "label": jax.ShapeDtypeStruct((1, 2, 256, 256), jnp.int32)}
    model = nnx.eval_shape(lambda: full_task.build_model(nnx.Rngs(0)))
    model.eval()
    graphdef, state = nnx.split(model)
    out = jax.eval_shape(lambda st, b: full_task.forward(nnx.merge(graphdef, st), b, jnp.float32).logits,
                         state, batch)
    assert out.shape == (2, 256, 256, 4)
    with pytest.raises(ValueError, match="output size"):
        config.data.crop_size = (16, 96, 96)
        get_task(config)


def test_slice_samples_shapes_positions_labels():
    task = get_task(_config())
    sample = _phantom_sample()
    out = task.make_sample(sample)
    assert out["image"].shape == (4, 112, 112, 3) and out["image"].dtype == np.float32
    assert out["label"].shape == (4, 64, 64) and out["label"].dtype == np.int32
    np.testing.assert_array_equal(out["slice_position"], [[0, 4], [1, 4], [2, 4], [3, 4]])
    # channels = slices (j-1, j, j+1), clamped at the ends
    np.testing.assert_array_equal(out["image"][0, ..., 0], out["image"][0, ..., 1])
    np.testing.assert_array_equal(out["image"][3, ..., 2], out["image"][3, ..., 1])
    np.testing.assert_array_equal(out["image"][1, ..., 2], out["image"][2, ..., 1])
    # the sequence's channel, z-scored in the gland, resized 64 -> 112
    inside = out["image"][..., 1]  # centre channel of every stack = that slice
    assert abs(float(inside.mean())) < 1.5
    # labels: background 0, gland 1, lesion -> csPCa 3, no indolent
    assert set(np.unique(out["label"])) == {0, 1, 3}
    assert (out["label"][1, 20, 20], out["label"][0, 20, 20], out["label"][0, 0, 0]) == (3, 1, 0)
    # evaluation samples are deterministic, and a changed crop changes the pair seed
    assert task.make_sample(sample)["pair_seed"] == out["pair_seed"]
    assert task.make_sample(_phantom_sample(seed=1))["pair_seed"] != out["pair_seed"]


def test_loss_decreases_on_a_fixed_batch_and_contrastive_changes_it():
    config = _config(**{"task.contrastive_alpha": 0.05})
    task = get_task(config)
    model = task.build_model(nnx.Rngs(0))
    assert model.CL_Head is not None
    model.train()
    batch = _batch(task, [_phantom_sample(seed=0), _phantom_sample(seed=1)])

    outputs = task.forward(model, batch, jnp.float32)
    total, parts = task.loss(outputs, batch)
    assert outputs.training and outputs.contrastive is not None
    assert np.isfinite(float(parts["loss_contrastive"])) and float(parts["loss_contrastive"]) > 0
    np.testing.assert_allclose(float(total), 0.95 * float(parts["loss_dice_ce"]) + 0.05 * float(
        parts["loss_contrastive"]), rtol=1e-5)
    assert abs(float(total) - float(parts["loss_dice_ce"])) > 1e-4

    # evaluation: no contrastive term, validation weights [0, 0, .5, .5]
    model.eval()
    eval_out = task.forward(model, batch, jnp.float32)
    assert not eval_out.training and eval_out.contrastive is None
    stats = task.eval_stats(eval_out, batch)
    assert stats["intersection"].shape == (2, 4)
    model.train()

    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            return task.loss(task.forward(model, batch, jnp.float32), batch)[0]

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(6)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses


def test_bf16_compute_covers_the_whole_slice_model_and_keeps_fp32_params():
    batch = None
    logits = {}
    for dtype in ("float32", "bfloat16"):
        config = _config(**{"task.contrastive_alpha": 0.05, "model.backbone_options.dtype": dtype})
        task = get_task(config)
        model = task.build_model(nnx.Rngs(0))
        batch = batch or _batch(task, [_phantom_sample(seed=0), _phantom_sample(seed=1)])
        model.eval()
        compute = jnp.dtype(dtype)
        inner = model.backbone.blocks[0].mlp.fc1(jnp.ones((1, model.config.backbone.width), compute))
        assert inner.dtype == compute  # the ViT blocks compute in it
        logits[dtype] = task.forward(model, batch, compute).logits
        assert logits[dtype].dtype == compute  # and so does the conv head
        assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
        model.train()
        total, parts = task.loss(task.forward(model, batch, compute), batch)
        assert np.isfinite(float(total)) and np.isfinite(float(parts["loss_contrastive"]))
    want, got = np.asarray(logits["float32"]), np.asarray(logits["bfloat16"].astype(jnp.float32))
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()  # the same model, in bf16


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path):
    config = _config()
    summary = train_and_evaluate(config, str(tmp_path / "run"))
    assert summary["task"] == "provicnet_segmentation" and summary["steps"] == config.total_steps
    final = summary["final"]
    assert np.isfinite(final["dice_mean"]) and np.isfinite(final["loss"]) and np.isfinite(final["dice/gland"])
    assert np.isnan(final["dice/indolent"])  # no indolent lesions in the phantoms
    assert set(summary["alignment"]) == {"cls", "mean_patch"}
    assert np.isfinite(summary["alignment"]["cls"]["mmd2_unbiased"])


@pytest.mark.slow
def test_init_from_converted_artifact_with_contrastive_loss(tmp_path):
    artifact = str(tmp_path / "artifact")
    convert_slice_model(fixture_path("provicnet", "mri_t2.pth"), num_heads=2).save(artifact)
    config = _config(**{
        "init.mode": "pretrained", "init.checkpoint": artifact, "total_steps": 2, "eval_every": 2,
        "checkpoint_every": 2, "alignment.enabled": False, "task.contrastive_alpha": 0.05,
        "optimizer.frozen_patterns": (r"^CL_Head\.", r"^backbone\.")})
    summary = train_and_evaluate(config, str(tmp_path / "run"))
    assert summary["init"] == "pretrained" and np.isfinite(summary["final"]["dice_mean"])
    options = summary["config"]["model"]["backbone_options"]
    assert options["backbone"]["pos_grid"] == 10 and options["head_channels"] == [16, 8]  # the artifact's sizes
    assert options["contrastive_head"]["out_dim"] == 128

    saved = ocp.StandardCheckpointer().restore(os.path.join(str(tmp_path / "run"), "checkpoints", "2", "state"))
    trained = {k.removesuffix(".value"): np.asarray(v) for k, v in flatten(saved["params"]).items()}
    source = flatten(ocp.StandardCheckpointer().restore(os.path.join(artifact, "state")))
    frozen = [k for k in source if k.startswith(("backbone.", "CL_Head."))]
    assert len(frozen) > 20
    for key in frozen:
        np.testing.assert_array_equal(trained[key], np.asarray(source[key]), err_msg=key)
    assert not np.array_equal(trained["axis_pos.kernel"], np.asarray(source["axis_pos.kernel"]))
    assert not np.array_equal(trained["head.segmentation_conv.9.kernel"],
                              np.asarray(source["head.segmentation_conv.9.kernel"]))
