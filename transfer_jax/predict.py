"""Predictions of a trained run on the cases of a manifest.

    python -m transfer_jax.predict --workdir runs/seg --manifest cases.csv --output preds/

Restores the run's config (saved in every checkpoint's metadata) and its latest (or `--step`) parameters, prepares
each manifest row exactly as training did (`data.*`: spacing, gland-centred region of `crop_size * region_margin`
voxels, per-channel z-score), and then, per task:

* segmentation: MONAI-style sliding-window inference (`tasks/sliding_window.py`, ROI = `data.crop_size`,
  `--overlap`, Gaussian blending) over the whole prepared region; the argmax label map (0 background, 1 gland,
  2 lesion) is written as `<case_id>_seg.nii.gz` on the T2 file's own grid (nearest-neighbour; voxels outside the
  prepared region are background);
* classification: the centre crop (as in evaluation); class probabilities go to `<output>/probabilities.csv`
  (`case_id, prob_0..prob_{K-1}, pred`);
* super-resolution / distortion / synthesis: the task's input is built from the prepared region as in evaluation
  (thick slices, the case's deterministic distortion field, or the image without the target channel; a
  super-resolution region depth must be a multiple of `task.sr_factor`), sliding-window inference predicts the
  target channels, written as `<case_id>_<channel>.nii.gz` on the T2 grid (trilinear; z-scored intensities as the
  network sees them; zero outside the prepared region).

Only the state is restored (not the data-iterator position); labels and masks in the manifest are not needed.
"""
from __future__ import annotations

import argparse
import csv
import os
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from transfer_jax.data.augment import center_crop
from transfer_jax.data.dataset import preprocess_config
from transfer_jax.data.manifest import read_manifest
from transfer_jax.data.nifti import Volume, resample, write_like
from transfer_jax.data.preprocess import prepare_case
from transfer_jax.tasks.registry import get_task
from transfer_jax.tasks.sliding_window import sliding_window_inference
from transfer_jax.train.loop import _backbone_layer_fn
from transfer_jax.train.mesh import create_mesh
from transfer_jax.train.optim import make_optimizer
from transfer_jax.train.state import abstract_state, init_state, model_graph, state_shardings

ITEMS = ("state", "data", "meta")


def _manager(workdir: str) -> ocp.CheckpointManager:
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints in {directory}: is {workdir!r} a training run's workdir?")
    return ocp.CheckpointManager(directory, item_names=ITEMS)


def load_run(workdir: str, step: Optional[int] = None):
    """(config, task, graph, params, rest, step) of a run's checkpoint (latest by default), on one device."""
    manager = _manager(workdir)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no completed checkpoint in {workdir}/checkpoints")
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if "config" not in meta:
        raise ValueError(f"checkpoint {step} of {workdir} carries no run config (written by an older version)")
    config = ml_collections.ConfigDict(meta["config"])
    config.init.mode = "scratch"  # the weights come from the checkpoint
    task = get_task(config)
    mesh = create_mesh(1, 1, num_devices=1)
    _, abstract_params, _ = model_graph(task.build_model)
    layer_fn, num_layers = _backbone_layer_fn(config)  # the run's optimizer groups, so opt_state matches
    tx, _, _ = make_optimizer(config.optimizer, abstract_params, total_steps=config.total_steps,
                              backbone_layer_id=layer_fn, num_backbone_layers=num_layers,
                              is_backbone=lambda name: name.startswith(task.backbone_prefix))
    state, graph, shardings = init_state(task.build_model, tx, jax.random.key(0), mesh, "replicate")
    target = abstract_state(state, state_shardings(state, mesh, "replicate"))
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    manager.close()
    return config, task, graph, restored.params, restored.rest, step


def _dense_predictor(task, graph, params, rest, roi, overlap: float, batch_size: int, compute_dtype):
    @jax.jit
    def predict(volume):
        model = graph.merge(params, rest, training=False)

        def apply(x):
            return task.forward(model, {"image": x}, compute_dtype).logits.astype(jnp.float32)

        return sliding_window_inference(apply, volume, roi=roi, overlap=overlap, batch_size=batch_size)

    return predict


def predict(workdir: str, manifest: str, output: str, *, step: Optional[int] = None, overlap: float = 0.5,
            batch_size: int = 2) -> dict:
    config, task, graph, params, rest, step = load_run(workdir, step)
    os.makedirs(output, exist_ok=True)
    compute_dtype = jnp.dtype(config.model.backbone_options.get("dtype", "float32"))
    roi = tuple(int(s) for s in config.data.crop_size)
    prep = preprocess_config(config.data)
    cases = read_manifest(manifest)
    written: dict = {"step": step, "files": [], "probabilities": None}
    if task.name == "classification":
        model_fn = jax.jit(lambda x: jax.nn.softmax(task.forward(graph.merge(params, rest, training=False),
                                                                 {"image": x}, compute_dtype).astype(jnp.float32)))
        path = os.path.join(output, "probabilities.csv")
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["case_id", *[f"prob_{k}" for k in range(task.num_classes)], "pred"])
            for case in cases:
                prepared = prepare_case(case, prep)
                crop = center_crop({"image": prepared.image}, roi)["image"]
                probs = np.asarray(model_fn(jnp.asarray(crop[None])))[0]
                writer.writerow([case.case_id, *[f"{p:.6f}" for p in probs], int(probs.argmax())])
        written["probabilities"] = path
        return written

    predictor = _dense_predictor(task, graph, params, rest, roi, overlap, batch_size, compute_dtype)
    for index, case in enumerate(cases):
        prepared = prepare_case(case, prep)
        if task.name == "segmentation" or not hasattr(task, "degrade"):
            volume = prepared.image
        else:
            sample = {"image": prepared.image, "gland": prepared.gland, "case_index": np.int32(index)}
            volume = task.make_sample(sample)["image"]
        out = np.asarray(predictor(jnp.asarray(volume)))
        if hasattr(task, "target_channels") and task.name != "segmentation":
            for c, name in enumerate(task.target_channels):
                on_source = resample(Volume(out[..., c], prepared.region_grid, ""), prepared.source_grid, order=1)
                path = os.path.join(output, f"{case.case_id}_{name}.nii.gz")
                write_like(on_source.astype(np.float32), prepared.source_grid, path, reference=case.t2)
                written["files"].append(path)
        else:
            labels = out.argmax(axis=-1).astype(np.float32)
            on_source = resample(Volume(labels, prepared.region_grid, ""), prepared.source_grid, order=0)
            path = os.path.join(output, f"{case.case_id}_seg.nii.gz")
            write_like(np.rint(on_source).astype(np.uint8), prepared.source_grid, path, reference=case.t2)
            written["files"].append(path)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a training run's workdir (holds checkpoints/)")
    parser.add_argument("--manifest", required=True, help="CSV of cases (the training manifest format)")
    parser.add_argument("--output", required=True, help="folder for the NIfTI predictions / probabilities.csv")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap")
    parser.add_argument("--batch-size", type=int, default=2, help="windows per model call")
    args = parser.parse_args(argv)
    result = predict(args.workdir, args.manifest, args.output, step=args.step, overlap=args.overlap,
                     batch_size=args.batch_size)
    where = result["probabilities"] or f"{len(result['files'])} file(s) in {args.output}"
    print(f"predicted with checkpoint step {result['step']}: {where}")


if __name__ == "__main__":
    main()
