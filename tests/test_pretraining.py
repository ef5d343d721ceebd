"""Pretraining in JAX (configs/pretrain_*.py): objectives, the exported artifact, and fine-tuning from it."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import config_for, fixed_training_batch
from transfer_jax.tasks import provicnet_contrastive as contrastive
from transfer_jax.tasks.registry import get_task
from transfer_jax.train.pretrained import RUNTIME_OPTIONS


PRETRAIN_TO_TASK = [
    ("pretrain_mae", "smoke", "seg", "profound_vit,smoke"),
    ("pretrain_fcmae", "smoke", "synthesis", "profound_conv,smoke"),
    ("pretrain_contrastive", "smoke,self_supervised", "seg", "provicnet,smoke"),
]


@pytest.mark.slow
@pytest.mark.parametrize("pretrain,arg,task,task_arg", PRETRAIN_TO_TASK, ids=[p for p, *_ in PRETRAIN_TO_TASK])
def test_pretrain_then_finetune(pretrain, arg, task, task_arg, tmp_path):
    """Pretraining lowers its loss on a fixed batch, writes an artifact, and a task run starts from its weights."""
    from transfer_jax.convert.artifact import load_converted
    from transfer_jax.convert.table import flatten
    from transfer_jax.train.loop import train_and_evaluate

    config = fixed_training_batch(config_for(pretrain, arg, **{"optimizer.warmup_steps": 0}), total_steps=4)
    summary = train_and_evaluate(config, str(tmp_path / "pretrain"))
    with open(tmp_path / "pretrain" / "metrics.jsonl") as f:
        losses = [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert summary["direction"] == "min" and np.isfinite(summary["final"][summary["primary_metric"]])
    artifact_dir = summary["pretrained_artifact"]
    assert artifact_dir == str(tmp_path / "pretrain" / "pretrained")
    artifact = flatten(load_converted(artifact_dir).state)
    assert not any(k.endswith((".count", ".key")) for k in artifact)

    finetune = config_for(task, task_arg, **{"init.mode": "pretrained", "init.checkpoint": artifact_dir,
                                             "total_steps": 1, "alignment.enabled": False})
    from transfer_jax.train import setup

    captured = {}
    original = setup.load_into

    def spy(params, rest, directory, **kwargs):
        out = original(params, rest, directory, **kwargs)
        captured["params"], captured["report"] = jax.device_get(out[0]), out[2]  # before donation
        return out

    setup.load_into = spy
    try:
        train_and_evaluate(finetune, str(tmp_path / "finetune"))
    finally:
        setup.load_into = original
    report = captured["report"]
    backbone_prefix = get_task(finetune).backbone_prefix
    loaded_backbone = [p for p in report.loaded if p.startswith(backbone_prefix)]
    assert loaded_backbone, report.describe()
    from flax import nnx

    params = flatten(nnx.to_pure_dict(captured["params"]))
    for path in loaded_backbone:
        if path in params:
            np.testing.assert_array_equal(np.asarray(params[path]), artifact[path], err_msg=path)
    # every backbone parameter of the task model came from the artifact
    missing = [p for p in params if p.startswith(backbone_prefix) and p not in report.loaded]
    assert not missing, missing[:5]


@pytest.mark.parametrize("pretrain,task", [
    ("pretrain_mae", "profound_vit"), ("pretrain_fcmae", "profound_conv"), ("pretrain_contrastive", "provicnet")])
@pytest.mark.parametrize("preset", ["smoke", "default", "full"])
def test_pretraining_architecture_matches_task_configs(pretrain, task, preset):
    """A pretrained artifact must fit the task configs of the same preset without changing their architecture."""
    pre = config_for(pretrain, preset)
    tasks = ["seg"] if task == "provicnet" else ["seg", "cls", "sr", "distortion", "synthesis"]
    for name in tasks:
        other = config_for(name, f"{task},{preset}")
        mine = {k: v for k, v in pre.model.backbone_options.to_dict().items() if k not in RUNTIME_OPTIONS}
        theirs = {k: v for k, v in other.model.backbone_options.to_dict().items() if k not in RUNTIME_OPTIONS}
        assert mine == theirs, (name, preset)
        assert tuple(pre.data.crop_size) == tuple(other.data.crop_size)
        assert tuple(pre.data.spacing) == tuple(other.data.spacing)
        assert pre.data.phantom.seed != other.data.phantom.seed  # pretraining never sees the task's cases


def test_mae_per_case_loss_averages_to_the_batch_loss():
    config = config_for("pretrain_mae", "smoke")
    task = get_task(config)
    from flax import nnx

    model = task.build_model(nnx.Rngs(0))
    images = jax.random.normal(jax.random.key(1), (3,) + tuple(config.data.crop_size) + (3,))
    noise = jax.random.uniform(jax.random.key(2), (3, task.num_patches))
    outputs = task.forward(model, {"image": images, "noise": noise}, jnp.float32)
    per_case = task.eval_stats(outputs, {"image": images})["recon_loss"]
    assert per_case.shape == (3,)
    # every case hides the same number of patches, so the batch loss is the mean of the per-case losses
    np.testing.assert_allclose(per_case.mean(), outputs.loss, rtol=1e-5)


def test_masking_noise_is_deterministic_per_sample():
    task = get_task(config_for("pretrain_mae", "smoke"))
    image = np.random.default_rng(0).normal(size=(16, 32, 32, 3)).astype(np.float32)
    first = task.make_sample({"image": image, "case_index": 1})
    again = task.make_sample({"image": image.copy(), "case_index": 1})
    other = task.make_sample({"image": image, "case_index": 2})
    np.testing.assert_array_equal(first["noise"], again["noise"])
    assert not np.array_equal(first["noise"], other["noise"])
    assert first["noise"].shape == (task.num_patches,)


def test_view_pairs():
    grid = (3, 5, 6)
    per_view = int(np.prod(grid))
    pairs = jax.jit(lambda k: contrastive.view_pairs(k, grid, max_pairs=64))(jax.random.key(0))
    anchor, other = np.asarray(pairs.anchor), np.asarray(pairs.other)
    valid, target = np.asarray(pairs.valid), np.asarray(pairs.target)
    positives, negatives = slice(0, 64), slice(64, 128)
    assert (anchor < per_view).all()
    np.testing.assert_array_equal(other[positives], anchor[positives] + per_view)  # same patch, other view
    assert valid[positives].all() and (target[positives] == 1).all()
    assert 0 < valid[negatives].sum() < 64  # some distance-2 neighbours fall off a 5 x 6 grid
    a = np.unravel_index(anchor[negatives][valid[negatives]], grid)
    o = np.unravel_index(other[negatives][valid[negatives]] - per_view, grid)
    np.testing.assert_array_equal(a[0], o[0])  # same slice
    steps = np.stack([o[1] - a[1], o[2] - a[2]], axis=1)
    assert set(map(tuple, np.abs(steps))) <= {(0, 2), (2, 0), (2, 2)}
    assert (target[negatives][valid[negatives]] == -1).all() and (target[negatives][~valid[negatives]] == 0).all()


def test_contrastive_case_losses_match_pair_loss():
    """The pretraining task's loss of each case is `pair_loss` over that case's own two views, with pairs drawn from
    the case's own seed: cases in a batch never mix."""
    from flax import nnx

    config = config_for("pretrain_contrastive", "smoke,self_supervised")
    task = get_task(config)
    model = task.build_model(nnx.Rngs(0))
    model.eval()
    cases, slices, size = 2, 2, config.task.image_size
    labels = task.label_size
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(cases, slices, size, size, 3)).astype(np.float32),
             "view2": rng.normal(size=(cases, slices, size, size, 3)).astype(np.float32),
             "slice_position": np.tile(np.array([[0, slices], [1, slices]], np.int32), (cases, 1, 1)),
             "label": np.zeros((cases, slices, labels, labels), np.int32),
             "pair_seed": np.array([5, 11], np.int32)}
    per_case = task.forward(model, jax.tree.map(jnp.asarray, batch), jnp.float32).per_case
    grid = (slices,) + model.config.backbone.patch_grid(size, size)
    for case in range(cases):
        def tokens(images):
            out = model.forward_features(jnp.asarray(images[case]), jnp.asarray(batch["slice_position"][case]))
            return out.patch_tokens.reshape(-1, out.patch_tokens.shape[-1])

        vectors = jnp.concatenate([tokens(batch["image"]), tokens(batch["view2"])])
        key = jax.random.fold_in(jax.random.key(config.seed), batch["pair_seed"][case])
        pairs = contrastive.view_pairs(jax.random.fold_in(key, 1), grid,
                                       max_pairs=config.task.contrastive_max_pairs)
        expected = contrastive.pair_loss(model.project(vectors[pairs.anchor]), model.project(vectors[pairs.other]),
                                         pairs, config.task.contrastive_margin)
        np.testing.assert_allclose(per_case[case], expected, rtol=1e-5)


def test_pretrain_config_errors():
    with pytest.raises(ValueError, match="'contrastive_v2'.*self_supervised"):
        config_for("pretrain_contrastive", "smoke,contrastive_v2")
    with pytest.raises(ValueError, match="one variant at a time"):
        config_for("pretrain_contrastive", "both,label_guided")
    with pytest.raises(ValueError, match="norm_pix"):
        config_for("pretrain_mae", "tiny")
    config = config_for("pretrain_mae", "smoke")
    config.data.crop_size = (16, 32, 48)
    with pytest.raises(ValueError, match="img_size"):
        get_task(config)
    with pytest.raises(ValueError, match="variant"):
        get_task(config_for("pretrain_contrastive", "smoke", **{"task.variant": "simclr"}))


def test_norm_pix_option_reaches_the_model():
    assert config_for("pretrain_mae", "smoke,norm_pix").model.decoder_options.norm_pix_loss is True
    assert config_for("pretrain_mae", "smoke").model.decoder_options.norm_pix_loss is False
    assert config_for("pretrain_fcmae", "norm_pix").model.decoder_options.norm_pix_loss is True
