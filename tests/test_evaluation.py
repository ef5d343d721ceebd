"""What a run reports: whole-volume metrics, the best checkpoint by the primary metric, the test split once, and
`python -m transfer_jax.score` agreeing with the run on the same predictions."""
import json
import os
import types

import grain
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import config_for, write_nifti
from transfer_jax.data.augment import center_crop
from transfer_jax.data.manifest import Case, write_manifest
from transfer_jax.data.nifti import Grid
from transfer_jax.data.preprocess import PreparedCase
from transfer_jax.models.upernet import SegmentationOutput
from transfer_jax.tasks.segmentation import SegmentationTask
from transfer_jax.train.checkpoint import RunCheckpointer, select_step, selection_metrics
from transfer_jax.train.evaluator import Evaluator, WholeVolumeEvaluator
from transfer_jax.train.mesh import create_mesh
from transfer_jax.train.state import model_graph, split_model

REGION, CROP = (12, 20, 20), (8, 12, 12)


class LabelInChannel(SegmentationTask):
    """A segmentation 'model' that outputs the label map stored in the image's first channel (logits 10 x one-hot),
    so the evaluation is tested on a known prediction."""

    def build_model(self, rngs):
        return nnx.Linear(1, 1, rngs=rngs)  # carries parameters; the prediction ignores them

    def forward(self, model, batch, compute_dtype):
        labels = jnp.rint(batch["image"][..., 0]).astype(jnp.int32)
        return SegmentationOutput(logits=10.0 * nnx.one_hot(labels, self.num_classes), aux_logits=None)


def _prepared_case(path: str) -> str:
    """A gland reaching past the centre crop; the stored 'prediction' is right inside the crop, background outside."""
    gland = np.zeros(REGION, np.uint8)
    gland[1:11, 2:18, 2:18] = 1
    lesion = np.zeros(REGION, np.uint8)
    lesion[5:7, 9:11, 9:11] = 1
    truth = np.where(lesion > 0, 2, gland).astype(np.float32)
    index = np.arange(np.prod(REGION)).reshape(REGION)
    inside = np.isin(index, center_crop({"image": index[..., None]}, CROP)["image"])  # the in-loop crop's voxels
    predicted = np.where(inside, truth, 0.0).astype(np.float32)
    image = np.stack([predicted, np.zeros_like(predicted), np.zeros_like(predicted)], axis=-1)
    grid = Grid(REGION, np.diag([2.0, 2.0, 3.0, 1.0]))
    PreparedCase("c0", image, gland, lesion, grid, grid, None).save(path)
    return path


def test_whole_volume_scores_what_the_centre_crop_misses(tmp_path):
    config = config_for("seg", "smoke", **{"data.crop_size": CROP})
    task = LabelInChannel(config)
    graph, _, _ = model_graph(task.build_model)
    _, params, rest = split_model(task.build_model(nnx.Rngs(0)))
    state = types.SimpleNamespace(params=params, rest=rest)
    mesh = create_mesh(1, 1, num_devices=1)
    paths = [_prepared_case(str(tmp_path / "c0.npz"))]

    in_loop = Evaluator(task, graph, paths, CROP, 1, mesh, jnp.float32)(state)
    assert in_loop["dice/gland"] == pytest.approx(1.0) and in_loop["dice/lesion"] == pytest.approx(1.0)
    assert in_loop["hd95/gland"] == pytest.approx(0.0)

    whole = WholeVolumeEvaluator(task, graph, roi=CROP, overlap=0.5, window_batch=2, mesh=mesh,
                                 compute_dtype=jnp.float32)(params, rest, paths)
    gland_voxels, inside_voxels = 10 * 16 * 16 - 8, 8 * 12 * 12 - 8  # gland label (lesion voxels excluded)
    assert whole["dice/gland"] == pytest.approx(2 * inside_voxels / (inside_voxels + gland_voxels), rel=1e-6)
    assert whole["dice/lesion"] == pytest.approx(1.0)  # the lesion lies inside the crop
    assert whole["hd95/gland"] > 0.0 and whole["dice_mean"] < 1.0


def _checkpointer(directory, saves, direction="max", keep=1):
    data = iter(grain.MapDataset.range(4).to_iter_dataset())
    checkpointer = RunCheckpointer(directory, max_to_keep=keep, asynchronous=False)
    for step, value in saves:
        metrics = None if value == "none" else selection_metrics("m", value, direction)
        checkpointer.save(step, {"w": np.full(2, step, np.float32)}, data, {"step": step}, metrics=metrics)
    return checkpointer


@pytest.mark.parametrize("direction,best", [("max", 4), ("min", 6)])
def test_best_checkpoint_by_primary_metric_is_kept_with_the_latest(tmp_path, direction, best):
    saves = [(2, 0.5), (4, 0.9), (6, 0.1), (8, float("nan")), (10, "none")]
    checkpointer = _checkpointer(str(tmp_path / "ckpt"), saves, direction)
    checkpointer.close()
    assert sorted(int(d) for d in os.listdir(tmp_path / "ckpt")) == sorted({best, 10})
    reader = RunCheckpointer(str(tmp_path / "ckpt"), asynchronous=False, read_only=True)
    assert select_step(reader, "best") == (best, "best")
    assert select_step(reader, "latest") == (10, "latest")
    assert select_step(reader, str(best)) == (best, f"step {best}")
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 3 .* saved steps"):
        select_step(reader, "3")
    with pytest.raises(ValueError, match="--checkpoint must be 'latest', 'best' or a step number"):
        select_step(reader, "newest")


def test_best_falls_back_to_latest_without_recorded_metrics(tmp_path):
    _checkpointer(str(tmp_path / "ckpt"), [(2, "none"), (4, "none")], keep=2).close()
    reader = RunCheckpointer(str(tmp_path / "ckpt"), asynchronous=False, read_only=True)
    step, chosen = select_step(reader, "best")
    assert step == 4 and chosen.startswith("latest (no checkpoint records")


# -- one training run on cases whose T2 grid is the prepared grid --------------------------------------------------

REGION_IJK, SPACING_IJK = (40, 40, 20), (2.0, 2.0, 3.0)  # smoke: crop (16, 32, 32) x 1.25, spacing (3, 2, 2)


def _grid_case(directory: str, case_id: str, split: str, rng: np.random.Generator) -> Case:
    """Volumes of exactly the prepared region on the run's grid, gland centred: the prepared case is the volume."""
    i, j, k = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in REGION_IJK], indexing="ij")
    radii = rng.uniform(0.8, 1.0) * np.array([12.0, 12.0, 6.0])
    gland = ((i / radii[0]) ** 2 + (j / radii[1]) ** 2 + (k / radii[2]) ** 2 <= 1).astype(np.uint8)
    ci, cj = rng.integers(-4, 5, 2)
    lesion = (((i - ci) / 3) ** 2 + ((j - cj) / 3) ** 2 + (k / 2) ** 2 <= 1).astype(np.uint8) * gland
    affine = np.diag([*SPACING_IJK, 1.0])
    paths = {}
    for name, contrast in (("t2", (60, -30)), ("adc", (40, -25)), ("dwi", (30, 50))):
        image = 100.0 + contrast[0] * gland.astype(float) + contrast[1] * lesion.astype(float) \
            + rng.normal(0, 5, REGION_IJK)
        paths[name] = write_nifti(os.path.join(directory, f"{case_id}_{name}.nii.gz"), image, affine)
    paths["gland_mask"] = write_nifti(os.path.join(directory, f"{case_id}_gland.nii.gz"), gland, affine, np.uint8)
    paths["lesion_mask"] = write_nifti(os.path.join(directory, f"{case_id}_lesion.nii.gz"), lesion, affine, np.uint8)
    return Case(case_id=case_id, split=split, **paths)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from transfer_jax.train.loop import train_and_evaluate

    root = tmp_path_factory.mktemp("evaluation")
    rng = np.random.default_rng(0)
    splits = ["train"] * 4 + ["val", "test"]
    cases = [_grid_case(str(root), f"case{n}", split, rng) for n, split in enumerate(splits)]
    manifest = str(root / "manifest.csv")
    write_manifest(manifest, cases)
    config = config_for("seg", "smoke", **{"data.manifest": manifest, "alignment.enabled": False,
                                           "total_steps": 4, "eval_every": 1, "checkpoint_every": 4,
                                           "keep_checkpoints": 1})
    workdir = str(root / "run")
    return config, train_and_evaluate(config, workdir), workdir, manifest


@pytest.mark.slow
def test_run_keeps_best_and_scores_test_once(trained):
    config, summary, workdir, _ = trained
    history = {h["step"]: h["metrics"]["dice_mean"] for h in summary["history"]}
    saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")))
    trained_steps = {s: v for s, v in history.items() if s > 0}
    best_trained = max(trained_steps, key=lambda s: (np.nan_to_num(trained_steps[s], nan=-1.0), -s))
    # every new best is saved, so the best checkpoint is the best evaluated step after training started
    assert summary["best_step"] == best_trained and best_trained in saved and 4 in saved
    assert summary["evaluation"]["final_best_test"].startswith("whole prepared region")
    assert summary["in_loop"]["final"] == summary["history"][-1]["metrics"]
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    tested = [r for r in records if any(k.startswith("test/") for k in r)]
    assert len(tested) == 1 and tested[0]["step"] == summary["best_step"] and summary["test_cases"] == 1
    assert tested[0]["test/dice_mean"] == pytest.approx(summary["test"]["dice_mean"], nan_ok=True)
    assert not any(k.startswith("test") for h in summary["history"] for k in h["metrics"])


@pytest.mark.slow
def test_score_agrees_with_the_run_on_the_same_predictions(trained, tmp_path):
    import nibabel as nib

    from transfer_jax.predict import main as predict_main
    from transfer_jax.score import score

    config, summary, workdir, manifest = trained
    output = str(tmp_path / "predictions")
    predict_main(["--workdir", workdir, "--manifest", manifest, "--output", output, "--save-probabilities",
                  "--batch_size", str(config.eval_batch_size)])
    result = score(output, manifest, "test")
    assert result["kind"] == "segmentation" and result["cases"] == 1
    for key, value in summary["test"].items():
        if key != "loss":
            np.testing.assert_allclose(result["metrics"][key], value, rtol=1e-6, atol=1e-6, err_msg=key)

    labels = nib.load(os.path.join(output, "case5_seg.nii.gz")).get_fdata()
    probabilities = nib.load(os.path.join(output, "case5_probabilities.nii.gz")).get_fdata()
    assert probabilities.shape == (*REGION_IJK, 3)
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probabilities.argmax(axis=-1), labels)


def test_study_rows_carry_the_test_split():
    from transfer_jax.study.analysis import build_row

    def summary(best, test):
        return {"task": "segmentation", "primary_metric": "dice_mean", "direction": "max", "best": best,
                "test": test, "steps": 4, "steps_to_95pct_gain": 2}

    row = build_row("b", "seg", {0: summary(0.8, {"dice_mean": 0.7}), 1: summary(0.7, {"dice_mean": 0.5})},
                    {0: summary(0.6, None), 1: summary(0.5, None)})
    assert row.pretrained_test.mean == pytest.approx(0.6) and row.pretrained_test.n == 2
    assert row.scratch_test is None and row.pretrained_best == pytest.approx(0.75)
