"""Predictions of a trained run on the cases of a manifest.

    python -m transfer_jax.predict --workdir=runs/seg --manifest=cases.csv --output=preds/
    python -m transfer_jax.predict --workdir=runs/cls --manifest=cases.csv --output=preds/ --checkpoint=200
    python -m transfer_jax.predict --params=artifacts/T2 --manifest=cases.csv --output=preds/ --save_probabilities

Restores the run's config (saved in every checkpoint's metadata) and the parameters of its best checkpoint by the
task's primary metric (`--checkpoint best`, the default; `latest`, or a step number), prepares
each manifest row exactly as training did (`data.*`: spacing, region of `crop_size * region_margin` voxels
placed by `data.region_centre`, per-channel z-score), and then, per task:

* segmentation: MONAI-style sliding-window inference (`tasks/inference.py`, the end-of-run evaluation's own
  function: ROI = `data.crop_size`, `--overlap`, constant blending of the logits as MONAI's default) over the whole
  prepared region; the label map (softmax head: the argmax, 0 background, 1 gland, 2 lesion; sigmoid head: sigmoid
  > `task.threshold`, 0 / 1) is written as `<case_id>_seg.nii.gz` on the T2 file's own grid (nearest-neighbour;
  voxels outside the prepared region are background); with `--save_probabilities` also the class probabilities
  (softmax, or [1 - p, p] of the sigmoid head) as `<case_id>_probabilities.nii.gz` on the T2 grid, classes last
  (trilinear; background probability 1 outside the prepared region);
* classification: the centre crop (as in evaluation); class probabilities go to `<output>/probabilities.csv`
  (`case_id, prob_0..prob_{K-1}, pred`);
* super-resolution / distortion / synthesis: the task's input is built from the prepared region as in evaluation
  (thick slices, the case's deterministic distortion field, or the image without the target channel; a
  super-resolution region depth must be a multiple of `task.sr_factor`), sliding-window inference predicts the
  target channels, written as `<case_id>_<channel>.nii.gz` on the T2 grid (trilinear; z-scored intensities as the
  network sees them; zero outside the prepared region).

ProViCNet segmentation (a `provicnet_segmentation` run, or `--params` = a converted release checkpoint, e.g.
T2_best.pth through `python -m transfer_jax.convert provicnet`, no training run needed) follows upstream's
inference (`data/slices.py:case_slices`): the whole slices of the T2 file's grid (a run: resampled to its
`data.spacing` first, and the result sampled back) of `task.sequence` (or `--sequence` with `--params`), gland
z-score of the raw intensities (so the manifest's gland mask is needed), resize to the model's input size, 3-slice
stacks with upstream's edge rule, slice positions (j, number of slices of the volume); the argmax class
(0 background, 1 gland, 2 indolent, 3 csPCa) is written as `<case_id>_seg.nii.gz` and, with
`--save_probabilities`, the softmax as `<case_id>_probabilities.nii.gz` (float32, classes on the last axis), both
on the T2 grid. The other ProViCNet tasks (classification, image-to-image) see every slice of the prepared region,
cut in-plane to the centred `data.crop_size` window, with the positions of the volume.

Only the state is restored (not the data-iterator position); labels (and, except for ProViCNet, masks) in the
manifest are not needed.
"""
from __future__ import annotations

import csv
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from transfer_jax.cli import ArgumentParser, reports_data_errors
from transfer_jax.convert.provicnet import SLICE_MODEL_NAME, load_provicnet
from transfer_jax.data.augment import center_crop
from transfer_jax.data.dataset import preprocess_config
from transfer_jax.data.manifest import read_manifest
from transfer_jax.data.nifti import Volume, resample, write_like
from transfer_jax.data.preprocess import prepare_case
from transfer_jax.data.slices import MODEL_IMAGE_SIZE, slice_origin, write_prediction_nifti
from transfer_jax.features.provicnet import predict_case, write_case_prediction
from transfer_jax.tasks.classification import ClassificationTask
from transfer_jax.models.registry import compute_dtype as model_compute_dtype
from transfer_jax.tasks.inference import network_input, whole_volume_outputs
from transfer_jax.tasks.registry import get_task
from transfer_jax.tasks.slice_segmentation import SliceTask
from transfer_jax.train.checkpoint import RunCheckpointer, select_step
from transfer_jax.train.mesh import create_mesh
from transfer_jax.train.optim import make_run_optimizer
from transfer_jax.train.state import abstract_state, init_state, model_graph, state_shardings


def _checkpointer(workdir: str) -> RunCheckpointer:
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints in {directory}: is {workdir!r} a training run's workdir?")
    return RunCheckpointer(directory, asynchronous=False, read_only=True)


def load_run(workdir: str, checkpoint: str = "best"):
    """(config, task, graph, params, rest, step, chosen) of a run's checkpoint on one device: `checkpoint` is
    "best" (by the task's primary metric), "latest" or a step number; `chosen` says which was taken."""
    checkpointer = _checkpointer(workdir)
    step, chosen = select_step(checkpointer, str(checkpoint))
    meta = checkpointer.restore_meta(step)
    if "config" not in meta:
        raise ValueError(f"checkpoint {step} of {workdir} carries no run config (written by an older version)")
    config = ml_collections.ConfigDict(meta["config"])
    config.init.mode = "scratch"  # the weights come from the checkpoint
    task = get_task(config)
    mesh = create_mesh(1, 1, num_devices=1)
    _, abstract_params, _ = model_graph(task.build_model)
    # the run's optimizer groups, so that the optimizer state's structure matches the checkpoint's
    tx, _, _ = make_run_optimizer(config, abstract_params, task.backbone_prefix)
    state, graph, shardings = init_state(task.build_model, tx, jax.random.key(0), mesh, "replicate")
    target = abstract_state(state, state_shardings(state, mesh, "replicate"))
    restored = checkpointer.restore_state(step, target)
    checkpointer.close()
    return config, task, graph, restored.params, restored.rest, step, chosen


def _dense_predictor(task, graph, params, rest, roi, overlap: float, batch_size: int, compute_dtype):
    @jax.jit
    def predict(volume):
        model = graph.merge(params, rest, training=False)
        return whole_volume_outputs(task, model, volume, roi=roi, overlap=overlap, batch_size=batch_size,
                                    compute_dtype=compute_dtype)

    return predict


def _write_probabilities(probs: np.ndarray, prepared, case, output: str) -> str:
    """Class probabilities on the T2 grid, classes on the last axis, written as the ProViCNet path writes them;
    outside the prepared region: background."""
    inside = resample(Volume(np.ones(probs.shape[:3], np.float32), prepared.region_grid, ""), prepared.source_grid,
                      order=1)
    channels = [resample(Volume(probs[..., k], prepared.region_grid, ""), prepared.source_grid, order=1)
                for k in range(probs.shape[-1])]
    channels[0] = channels[0] + (1.0 - inside)  # the region's border blends into background outside it
    path = os.path.join(output, f"{case.case_id}_probabilities.nii.gz")
    return write_prediction_nifti(np.stack(channels, axis=-1).astype(np.float32), case.t2, path)


def _slice_window(task, prepared, case, index: int) -> tuple[dict, tuple[slice, ...]]:
    """A ProViCNet task's one-case batch from the prepared region, and where its predictions go in the region."""
    if prepared.gland is None:
        raise ValueError(f"case {case.case_id}: ProViCNet inputs are z-scored inside the gland, but the manifest's "
                         "'gland_mask' cell is empty")
    depth, height, width = prepared.image.shape[:3]
    size = task.label_size
    if height < size or width < size:
        raise ValueError(f"case {case.case_id}: prepared region {height}x{width} is smaller in-plane than the "
                         f"model's {size}x{size} window")
    depth -= depth % int(getattr(task, "sr_factor", 1))
    y0, x0 = (height - size) // 2, (width - size) // 2
    window = (slice(0, depth), slice(y0, y0 + size), slice(x0, x0 + size))
    # make_sample also builds training targets; the forward pass reads none of them, so no label is needed.
    sample = {"image": prepared.image[window], "gland": prepared.gland[window], "case_index": np.int32(index),
              "label": "0", "slice_coordinate": np.arange(depth, dtype=np.float32),
              **slice_origin(prepared.region_grid, prepared.source_grid)}
    row = task.make_sample(sample)
    return {k: jnp.asarray(v)[None] for k, v in row.items()}, window


def predict_params(params: str, manifest: str, output: str, *, sequence: str = "t2",
                   image_size: int = MODEL_IMAGE_SIZE, save_probabilities: bool = False, batch_size: int = 8) -> dict:
    """A converted ProViCNet segmentation artifact (`--params`) on every case of a manifest; no training run."""
    model = load_provicnet(params, expect=SLICE_MODEL_NAME)
    os.makedirs(output, exist_ok=True)
    written: dict = {"step": None, "files": [], "probabilities": None}
    for case in read_manifest(manifest):
        probabilities = predict_case(model, case, sequence=sequence, image_size=image_size, batch_size=batch_size)
        written["files"] += write_case_prediction(probabilities, case, output, save_probabilities=save_probabilities)
    return written


def predict(workdir: str, manifest: str, output: str, *, checkpoint: str = "best", overlap: float = 0.5,
            batch_size: int = 2, save_probabilities: bool = False) -> dict:
    config, task, graph, params, rest, step, chosen = load_run(workdir, checkpoint)
    os.makedirs(output, exist_ok=True)
    compute_dtype = model_compute_dtype(config.model.backbone_options)
    roi = tuple(int(s) for s in config.data.crop_size)
    prep = preprocess_config(config.data)
    cases = read_manifest(manifest)
    written: dict = {"step": step, "checkpoint": chosen, "files": [], "probabilities": None}
    slices = isinstance(task, SliceTask)
    if save_probabilities and task.name not in ("segmentation", "provicnet_segmentation"):
        raise ValueError(f"--save_probabilities applies to segmentation runs and ProViCNet artifacts; {workdir!r} is "
                         f"a {task.name!r} run")
    forward = jax.jit(lambda batch: task.forward(graph.merge(params, rest, training=False), batch, compute_dtype))
    if isinstance(task, ClassificationTask):
        path = os.path.join(output, "probabilities.csv")
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["case_id", *[f"prob_{k}" for k in range(task.num_classes)], "pred"])
            for index, case in enumerate(cases):
                prepared = prepare_case(case, prep)
                if slices:
                    batch, _ = _slice_window(task, prepared, case, index)
                else:
                    batch = {"image": jnp.asarray(center_crop({"image": prepared.image}, roi)["image"][None])}
                probs = np.asarray(jax.nn.softmax(forward(batch).astype(jnp.float32)))[0]
                writer.writerow([case.case_id, *[f"{p:.6f}" for p in probs], int(probs.argmax())])
                print(f"case {index + 1}/{len(cases)} {case.case_id}: done", flush=True)
        written["probabilities"] = path
        return written

    if slices and task.name == "provicnet_segmentation":
        model = graph.merge(params, rest, training=False)
        for case in cases:
            probabilities = predict_case(model, case, sequence=task.config.task.sequence, image_size=task.image_size,
                                         edge=task.edge, spacing=prep.spacing, batch_size=batch_size)
            written["files"] += write_case_prediction(probabilities, case, output,
                                                      save_probabilities=save_probabilities)
        return written

    predictor = _dense_predictor(task, graph, params, rest, roi, overlap, batch_size, compute_dtype)
    for index, case in enumerate(cases):
        prepared = prepare_case(case, prep)
        if slices:
            batch, window = _slice_window(task, prepared, case, index)
            logits = np.asarray(forward(batch).logits, np.float32)
            out = np.zeros(prepared.image.shape[:3] + logits.shape[-1:], np.float32)
            if task.name.endswith("segmentation"):
                out[..., 0] = 1.0  # background outside the window
            out[window] = logits.reshape(out[window].shape)
        else:
            sample = {"image": prepared.image, "gland": prepared.gland, "case_index": np.int32(index)}
            out = np.asarray(predictor(jnp.asarray(network_input(task, sample))))
        if hasattr(task, "target_channels") and not task.name.endswith("segmentation"):
            for c, name in enumerate(task.target_channels):
                on_source = resample(Volume(out[..., c], prepared.region_grid, ""), prepared.source_grid, order=1)
                path = os.path.join(output, f"{case.case_id}_{name}.nii.gz")
                write_like(on_source.astype(np.float32), prepared.source_grid, path, reference=case.t2)
                written["files"].append(path)
        else:
            # the task's label map: threshold (sigmoid head) or argmax (softmax head, slice tasks)
            to_labels = getattr(task, "predicted_labels", lambda logits: logits.argmax(axis=-1))
            labels = np.asarray(to_labels(out), np.float32)
            on_source = resample(Volume(labels, prepared.region_grid, ""), prepared.source_grid, order=0)
            path = os.path.join(output, f"{case.case_id}_seg.nii.gz")
            write_like(np.rint(on_source).astype(np.uint8), prepared.source_grid, path, reference=case.t2)
            written["files"].append(path)
            if save_probabilities:
                probs = task.probabilities(out) if hasattr(task, "probabilities") else np.asarray(jax.nn.softmax(out))
                written["files"].append(_write_probabilities(probs, prepared, case, output))
        print(f"case {index + 1}/{len(cases)} {case.case_id}: done", flush=True)
    return written


@reports_data_errors
def main(argv=None) -> None:
    """The `transfer-jax-predict` console script and `python -m transfer_jax.predict`."""
    parser = ArgumentParser("transfer_jax.predict", __doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a training run's workdir (holds checkpoints/)")
    source.add_argument("--params", metavar="ARTIFACT",
                        help="a converted ProViCNet segmentation checkpoint (python -m transfer_jax.convert provicnet)")
    parser.add_argument("--manifest", required=True,
                        help="CSV of the cases to predict (the training manifest format; labels not needed)")
    parser.add_argument("--output", required=True, help="folder for the NIfTI predictions / probabilities.csv")
    parser.add_argument("--checkpoint", default="best",
                        help="'best' (by the task's primary metric; the default), 'latest' or a step number")
    parser.add_argument("--overlap", type=float, default=0.5,
                        help="fraction of the ROI by which neighbouring sliding windows overlap, in [0, 1)")
    parser.add_argument("--batch_size", type=int, default=2, help="sliding windows (ProViCNet: slices) per model call")
    parser.add_argument("--sequence", choices=("t2", "adc", "dwi"),
                        help="with --params: the manifest column the model reads (default t2; ADC_best.pth: adc)")
    parser.add_argument("--save_probabilities", action="store_true",
                        help="segmentation: also write <case_id>_probabilities.nii.gz (classes on the last axis)")
    args = parser.parse_args(argv)
    if args.params is not None:
        result = predict_params(args.params, args.manifest, args.output, sequence=args.sequence or "t2",
                                save_probabilities=args.save_probabilities, batch_size=args.batch_size)
    elif args.sequence is not None:
        parser.error("--sequence applies to --params; a training run predicts with its own task.sequence")
    else:
        result = predict(args.workdir, args.manifest, args.output, checkpoint=args.checkpoint, overlap=args.overlap,
                         batch_size=args.batch_size, save_probabilities=args.save_probabilities)
    where = result["probabilities"] or f"{len(result['files'])} file(s) in {args.output}"
    origin = (f"checkpoint step {result['step']} ({result['checkpoint']})" if result["step"] is not None
              else f"artifact {args.params}")
    print(f"predicted with {origin}: {where}")


if __name__ == "__main__":
    main()
