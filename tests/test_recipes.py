"""Upstream fine-tuning recipes: the lr and weight decay every parameter actually gets, ReduceLROnPlateau against
torch, class-balanced sampling, the ProViCNet loss-side details, MONAI's centre crop and blending."""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from helpers import fixture_path, load_config
from transfer_jax.data.augment import center_crop, center_start
from transfer_jax.data.pipeline import ClassBalancedDraw, class_balanced_probabilities
from transfer_jax.tasks import sliding_window as S
from transfer_jax.tasks.registry import get_task
from transfer_jax.tasks.slice_segmentation import background_slice_keep
from transfer_jax.train.optim import Plateau, make_optimizer, make_run_optimizer, observe_evaluation, path_str
from transfer_jax.train.state import model_graph


# --------------------------------------------------------------------------------------------------------------
# Transcriptions of upstream's layer ids (written from the rules, on torch-style parameter names)


def upstream_vit_layer(name: str, num_layers: int) -> int:
    """CausalProbing util/lr_decay.get_layer_id_for_vit, num_layers = len(blocks) + 1."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_layers


def upstream_vit_scale(name: str, depth: int, ld: float) -> float:
    num_layers = depth + 1  # param_groups_lrd: layer_scales[i] = ld ** (num_layers - i)
    return ld ** (num_layers - upstream_vit_layer(name, num_layers))


def upstream_convnext_group_layer(name: str) -> int:
    """ProFound util/convnext_optim.get_num_layer_for_convnext ("group")."""
    parts = name.split(".")
    if parts[0] == "downsample_layers":
        stage = int(parts[1])
        return {0: 0, 1: 2, 2: 3, 3: 12}[stage]
    if parts[0] == "stages":
        stage, block = int(parts[1]), int(parts[2])
        return {0: 1, 1: 2, 3: 12}.get(stage, 3 + block // 3)
    return 13


def upstream_convnext_scale(name: str, depths, ld: float) -> float:
    num_layers = sum(depths)  # LayerDecayValueAssigner(ld ** (num_layers + 1 - i))
    return ld ** (num_layers + 1 - upstream_convnext_group_layer(name))


def _effective(config, grads_fill: float):
    """(params, {path: -update}) for one optimizer step from the config's run optimizer on ones-parameters."""
    task = get_task(config)
    _, abstract, _ = model_graph(task.build_model)
    tx, _, _ = make_run_optimizer(config, abstract, task.backbone_prefix)
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), abstract)
    grads = jax.tree.map(lambda p: jnp.full_like(p, grads_fill), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    flat = jax.tree_util.tree_flatten_with_path(updates)[0]
    shapes = {path_str(p): leaf.shape for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    return shapes, {path_str(p): -np.asarray(u) for p, u in flat}, task.backbone_prefix


def _shrink(config, backbone):
    """Full-preset recipe on a model small enough for a CPU test (the layer structure is kept)."""
    opts = config.model.backbone_options
    if backbone == "profound_conv":
        opts.update(dict(depths=(3, 3, 9, 3), dims=(8, 8, 16, 16)))
    else:
        opts.update(dict(width=24, num_heads=2, depth=12, img_size=(16, 32, 32), patch_size=(16, 32, 32),
                         out_indices=(3, 5, 7, 11)))
        config.data.crop_size = (16, 32, 32)
    if "head_options" in config.model and "hidden_size" in config.model.head_options:
        config.model.head_options.update(dict(hidden_size=8, auxiliary_channels=8))
    if "bottleneck_dim" in config.task:
        config.task.bottleneck_dim = 8
    return config


RECIPES = [  # (config, arg, backbone, upstream layer decay, head weight decay follows `decoder_parameters`)
    ("seg", "profound_conv,full", "profound_conv", 0.6, True),
    ("seg", "profound_vit,full", "profound_vit", 0.75, True),
    ("cls", "profound_conv,full", "profound_conv", 0.6, False),
    ("cls", "profound_vit,full", "profound_vit", 0.6, False),
]


@pytest.mark.parametrize("name,arg,backbone,ld,head_decays", RECIPES)
def test_every_parameter_gets_upstreams_lr_and_weight_decay(name, arg, backbone, ld, head_decays):
    config = _shrink(load_config(name, arg), backbone)
    assert config.optimizer.layer_decay == ld
    lr = config.optimizer.lr
    config.optimizer.update(dict(warmup_steps=0, weight_decay=0.0))
    shapes, lrs, prefix = _effective(config, grads_fill=1.0)  # Adam's first step with g = 1 moves by lr
    depth = config.model.backbone_options.get("depth")
    depths = config.model.backbone_options.get("depths")
    checked = 0
    for path, step in lrs.items():
        if path.startswith("hidden_norm."):  # upstream's optimiser never sees UPerNet's hidden_norm
            expected = 0.0
        elif path.startswith(prefix):
            inner = path[len(prefix):]
            scale = upstream_vit_scale(inner, depth, ld) if backbone == "profound_vit" else \
                upstream_convnext_scale(inner, depths, ld)
            expected = lr * scale
            checked += 1
        else:
            expected = lr
        np.testing.assert_allclose(step, expected, rtol=1e-5, err_msg=path)
    assert checked > 20

    # Weight decay alone (zero gradients, lr 1, wd 0.5): -update = scale * 0.5 where upstream decays.
    config.optimizer.update(dict(lr=1.0, weight_decay=0.5))
    _, decays, _ = _effective(config, grads_fill=0.0)
    for path, step in decays.items():
        ndim = len(shapes[path])
        if path.startswith("hidden_norm."):
            decayed, scale = False, 0.0
        elif path.startswith(prefix):
            inner = path[len(prefix):]
            if backbone == "profound_vit":  # param_groups_lrd: 1-D tensors only (the cls token decays)
                decayed, scale = ndim > 1, upstream_vit_scale(inner, depth, ld)
            else:  # get_parameter_groups: 1-D, .bias, .gamma, .beta
                decayed = not (ndim <= 1 or inner.rsplit(".", 1)[-1] in ("bias", "gamma", "beta"))
                scale = upstream_convnext_scale(inner, depths, ld)
        else:  # segmentation: decoder_parameters (ndim <= 1 or .bias); classification head: weight_decay 0
            decayed, scale = head_decays and not (ndim <= 1 or path.endswith(".bias")), 1.0
        np.testing.assert_allclose(step, 0.5 * scale if decayed else 0.0, rtol=1e-5, atol=1e-12, err_msg=path)
    if backbone == "profound_vit":
        assert float(decays[prefix + "cls_token"].max()) > 0.0


def test_classification_full_samples_class_balanced():
    assert load_config("cls", "profound_conv,full").data.sampler == "class_balanced"
    assert load_config("cls", "profound_conv").data.sampler == "shuffle"


# --------------------------------------------------------------------------------------------------------------
# ReduceLROnPlateau


def _plateau_fixture():
    with open(fixture_path("recipes", "plateau.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_plateau_follows_torch_reduce_lr_on_plateau(index):
    fixture = _plateau_fixture()
    case = fixture["cases"][index]
    plateau = Plateau.from_config({k: case[k] for k in ("mode", "factor", "patience", "cooldown", "min_lr")})
    states = [plateau.transform(lr).init(None) for lr in case["lrs"]]
    for value, expected in zip(fixture["values"], case["expected"]):
        states = [plateau.step(s, value) for s in states]
        got = [lr * float(s.scale) for lr, s in zip(case["lrs"], states)]
        np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_plateau_schedule_scales_every_group_through_observe_evaluation():
    """ProViCNet's recipe end to end in the optimizer: head 1e-3, backbone 5e-5, reduced on evaluation losses."""
    case = _plateau_fixture()["cases"][0]
    config = ml_collections.ConfigDict(dict(
        lr=1e-3, min_lr=0.0, warmup_steps=0, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, layer_decay=1.0,
        layer_decay_scheme="group", freeze_backbone=False, frozen_patterns=(), grad_clip=0.0,
        lr_scale_patterns=((r"^backbone\.", 0.05),), schedule="plateau",
        plateau=dict(metric="loss", mode="min", factor=0.9, patience=3, threshold=1e-4, cooldown=0, min_lr=1e-6)))
    params = {"backbone": {"w": jnp.ones((2, 2))}, "head": {"w": jnp.ones((2, 2))}}
    tx, _, _ = make_optimizer(config, params, total_steps=100, backbone_layer_id=None, num_backbone_layers=0,
                              is_backbone=lambda n: n.startswith("backbone."))
    state = tx.init(params)
    for value in _plateau_fixture()["values"]:
        state = observe_evaluation(state, {"loss": value, "dice_mean": 0.5}, config)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    head_lr, backbone_lr = case["expected"][-1]
    np.testing.assert_allclose(-np.asarray(updates["head"]["w"]), head_lr, rtol=1e-5)
    np.testing.assert_allclose(-np.asarray(updates["backbone"]["w"]), backbone_lr, rtol=1e-5)
    with pytest.raises(KeyError, match="plateau.metric"):
        observe_evaluation(state, {"dice_mean": 0.5}, config)
    cosine = ml_collections.ConfigDict(dict(config.to_dict(), schedule="cosine"))
    assert observe_evaluation(state, {"loss": 1.0}, cosine) is state


def test_provicnet_full_is_upstreams_train_py():
    config = load_config("seg", "provicnet,full")
    assert (config.optimizer.lr, config.optimizer.schedule, config.optimizer.warmup_steps) == (1e-3, "plateau", 0)
    assert config.optimizer.lr_scale_patterns == ((r"^backbone\.", 0.05),)
    assert dict(config.optimizer.plateau) == dict(metric="loss", mode="min", factor=0.9, patience=3,
                                                  threshold=1e-4, cooldown=0, min_lr=1e-6)
    assert (config.task.contrastive_alpha, config.task.background_keep, config.task.skip_no_cancer) == (0.05, 0.8,
                                                                                                        True)
    assert config.optimizer.skip_zero_gradient_steps


# --------------------------------------------------------------------------------------------------------------
# ProViCNet loss side


def test_zero_gradient_steps_leave_the_optimizer_untouched():
    config = ml_collections.ConfigDict(dict(
        lr=1e-2, min_lr=0.0, warmup_steps=0, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, layer_decay=1.0,
        layer_decay_scheme="group", freeze_backbone=False, frozen_patterns=(), grad_clip=0.0,
        skip_zero_gradient_steps=True))
    params = {"w": jnp.ones((3,))}
    tx, _, _ = make_optimizer(config, params, total_steps=10, backbone_layer_id=None, num_backbone_layers=0,
                              is_backbone=lambda n: False)
    state = tx.init(params)
    _, state = tx.update({"w": jnp.ones((3,))}, state, params)  # a real step leaves momentum behind
    updates, skipped = tx.update({"w": jnp.zeros((3,))}, state, params)
    assert float(jnp.abs(updates["w"]).max()) == 0.0
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), skipped, state)
    config.skip_zero_gradient_steps = False
    tx, _, _ = make_optimizer(config, params, total_steps=10, backbone_layer_id=None, num_backbone_layers=0,
                              is_backbone=lambda n: False)
    _, state = tx.update({"w": jnp.ones((3,))}, tx.init(params), params)
    updates, _ = tx.update({"w": jnp.zeros((3,))}, state, params)
    assert float(jnp.abs(updates["w"]).max()) > 0.0  # without the skip, Adam's momentum keeps moving


def test_background_slice_filter_keeps_gland_slices_and_80_percent_of_the_rest():
    labels = np.zeros((2, 12, 4, 4), np.int32)
    labels[0, 3:5, 1, 1] = 1  # case 0: 2 gland slices, 10 background -> keep 8 of them
    labels[1, :7, 2, 2] = 3  # case 1: 7 cancer slices, 5 background -> keep 4
    keep = np.asarray(background_slice_keep(jax.random.key(0), jnp.asarray(labels), jnp.asarray([5, 9]), 0.8))
    assert keep[0, 3:5].all() and keep[1, :7].all()
    assert keep[0].sum() == 2 + 8 and keep[1].sum() == 7 + 4
    other = np.asarray(background_slice_keep(jax.random.key(0), jnp.asarray(labels), jnp.asarray([6, 9]), 0.8))
    draws = {tuple(np.asarray(background_slice_keep(jax.random.key(0), jnp.asarray(labels), jnp.asarray([s, 9]),
                                                    0.8))[0]) for s in range(8)}
    assert len(draws) > 1 and other[1].tolist() == keep[1].tolist()  # a case's draw depends on its own seed only


def test_provicnet_training_loss_filters_background_and_skips_batches_without_cancer():
    from transfer_jax.tasks.slice_segmentation import SliceOutput
    from transfer_jax.tasks.segmentation import dice_ce_loss

    config = load_config("seg", "provicnet,smoke")
    config.task.update(dict(background_keep=0.5, skip_no_cancer=True))
    with pytest.raises(ValueError, match="skip_zero_gradient_steps"):
        get_task(config)
    config.optimizer.skip_zero_gradient_steps = True
    task = get_task(config)
    rng = np.random.default_rng(0)
    labels = np.zeros((1, 4, 8, 8), np.int32)
    labels[0, 1:3, 2:5, 2:5] = 1
    logits = jnp.asarray(rng.normal(size=(4, 8, 8, 4)), jnp.float32)
    batch = {"label": jnp.asarray(labels), "pair_seed": jnp.asarray([3], jnp.int32)}
    loss, metrics = task.loss(SliceOutput(logits, None, True), batch)
    assert float(loss) == 0.0 and float(metrics["skipped"]) == 1.0  # no cancer pixel: the step is skipped
    labels[0, 2, 3, 3] = 3
    batch["label"] = jnp.asarray(labels)
    loss, metrics = task.loss(SliceOutput(logits, None, True), batch)
    keep = np.asarray(background_slice_keep(jax.random.key(config.seed + 11), batch["label"], batch["pair_seed"],
                                            0.5))[0].astype(bool)
    assert keep.sum() == 3  # 2 gland slices + 1 of 2 background slices
    weights = jnp.asarray(config.task.class_weights, jnp.float32)
    expected = dice_ce_loss(logits[keep], labels[0][keep], include_background=True, class_weights=weights)
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)  # the loss of the kept slices only
    assert float(metrics["skipped"]) == 0.0
    eval_loss, _ = task.loss(SliceOutput(logits, None, False), batch)  # evaluation: every slice, eval weights
    eval_weights = jnp.asarray(config.task.eval_class_weights, jnp.float32)
    np.testing.assert_allclose(float(eval_loss), float(dice_ce_loss(logits, labels[0], include_background=True,
                                                                    class_weights=eval_weights)), rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Class-balanced sampling


def test_class_balanced_draw_is_upstreams_weighted_sampler():
    classes = ["0"] * 6 + ["1"] * 2 + ["2"]  # inverse class frequency: every class 1/3 of the draws
    probs = class_balanced_probabilities(classes)
    np.testing.assert_allclose([probs[:6].sum(), probs[6:8].sum(), probs[8]], [1 / 3] * 3)
    import grain
    draw = ClassBalancedDraw(grain.MapDataset.source(list(range(9))), classes, seed=0)
    epochs = np.asarray([draw[i] for i in range(9 * 2000)])
    shares = [np.isin(epochs, idx).mean() for idx in (range(6), range(6, 8), [8])]
    np.testing.assert_allclose(shares, [1 / 3] * 3, atol=0.02)
    assert [draw[i] for i in range(9)] == [draw[i] for i in range(9)]  # deterministic per epoch
    assert len(set(epochs[:9].tolist())) < 9 or len(set(epochs[9:18].tolist())) < 9  # drawn with replacement


# --------------------------------------------------------------------------------------------------------------
# MONAI centre crop and blending


def _monai_fixture():
    with open(fixture_path("recipes", "monai.json"), encoding="utf-8") as f:
        return json.load(f)


def test_center_crop_starts_where_monai_center_spatial_crop_does():
    crops = _monai_fixture()["crops"]
    assert {(c["size"] - c["roi"]) % 2 for c in crops} == {0, 1}  # odd and even margins
    for c in crops:
        assert center_start(c["size"], c["roi"]) == c["start"], c
    # The 82-slice volume with an odd crop: MONAI starts one voxel after floor((size - roi) / 2).
    volume = np.arange(82 * 3 * 3, dtype=np.float32).reshape(82, 3, 3, 1)
    cropped = center_crop({"image": volume}, (63, 3, 3))["image"]
    assert cropped[0, 0, 0, 0] == volume[10, 0, 0, 0] and (82 - 63) // 2 == 9


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_sliding_window_blending_matches_monai(mode):
    fixture = _monai_fixture()["sliding"]
    volume = jnp.asarray(fixture["volume"], jnp.float32)[..., None]

    def window_model(x):  # 2 x + the window's mean, as the fixture's model
        return 2.0 * x + jnp.mean(x, axis=(1, 2, 3), keepdims=True)

    kwargs = dict(roi=tuple(fixture["roi"]), overlap=fixture["overlap"], batch_size=1)
    got = S.sliding_window_inference(window_model, volume, mode=mode, **kwargs)[..., 0]
    np.testing.assert_allclose(got, np.asarray(fixture[mode]), rtol=1e-5, atol=1e-5)
    if mode == "constant":  # MONAI's default is the default here too
        default = S.sliding_window_inference(window_model, volume, **kwargs)[..., 0]
        np.testing.assert_array_equal(default, got)
        assert not np.allclose(np.asarray(fixture["gaussian"]), np.asarray(fixture["constant"]), atol=1e-3)


@pytest.mark.slow
def test_provicnet_upstream_recipe_runs_end_to_end_on_the_mesh(tmp_path):
    """Smoke sizes with train.py's recipe (plateau schedule, skip, background filter, contrastive term) through
    the trainer on the simulated 8-device mesh: every evaluation steps the plateau counters."""
    from transfer_jax.train.loop import train_and_evaluate
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("seg_config", os.path.join(os.path.dirname(__file__), "..",
                                                                              "configs", "seg.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.provicnet_config("smoke")
    module.provicnet_upstream_training(config)
    config.optimizer.plateau.patience = 0  # every evaluation without improvement reduces the lr
    config.update(dict(total_steps=3, eval_every=1, checkpoint_every=3, log_every=1))
    config.logging.tensorboard = False
    config.alignment.enabled = False
    summary = train_and_evaluate(config, str(tmp_path / "run"))
    assert summary["steps"] == 3 and len(summary["history"]) == 4  # step 0 + one evaluation per step
    assert all(np.isfinite(h["metrics"]["loss"]) for h in summary["history"])


def test_train_pipeline_draws_classes_equally_often(tmp_path):
    from helpers import smoke_config, tiny_manifest
    from transfer_jax.data.augment import AugmentConfig
    from transfer_jax.data.manifest import read_manifest
    from transfer_jax.data.pipeline import case_class, train_dataset
    from transfer_jax.data.preprocess import PreprocessConfig, preprocess_cases

    cases = read_manifest(tiny_manifest(str(tmp_path / "data"), num_cases=8))
    report = preprocess_cases(cases, PreprocessConfig(spacing=(3.0, 2.0, 2.0), crop_size=(16, 32, 32)),
                              str(tmp_path / "cache"))
    paths = [report.paths[c.case_id] for c in cases if c.split == "train"]
    classes = [case_class(p) for p in paths]
    assert len(set(classes)) > 1 and len(set(classes)) < len(classes)  # unbalanced classes
    it = iter(train_dataset(paths, get_task(smoke_config()), crop_size=(16, 32, 32), augment=AugmentConfig(),
                            per_process_batch=4, seed=0, sampler="class_balanced"))
    drawn = np.concatenate([next(it)["case_index"] for _ in range(150)])
    shares = {c: np.isin(drawn, [i for i, k in enumerate(classes) if k == c]).mean() for c in set(classes)}
    np.testing.assert_allclose(sorted(shares.values()), [1 / len(shares)] * len(shares), atol=0.06)
    with pytest.raises(ValueError, match="data.sampler"):
        train_dataset(paths, None, crop_size=(16, 32, 32), augment=AugmentConfig(), per_process_batch=4, seed=0,
                      sampler="balanced")
