"""In-loop alignment: the same probe inputs embedded by the initial and by the current weights, compared on device.

The probe set is fixed for the run: centre crops of validation cases, extended with their mirror images (the 8
flip combinations) when more samples are asked for than there are cases. Its images stay on device, sharded over
the batch axes. Both device functions (the feature pass and the measurement) are compiled ahead of training,
when the reference features (initial weights) are computed once; they stay on device. At each evaluation the
current features are computed and every configured estimator runs inside one compiled call. Only the resulting
scalars are ever fetched, at the logging cadence.
"""
from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from transfer_jax.alignment import AlignmentSpec, compute_alignment
from transfer_jax.data.augment import center_crop
from transfer_jax.data.pipeline import PreparedCaseSource
from transfer_jax.train.mesh import batch_sharding, replicated
from transfer_jax.train.state import ModelGraph

FLIPS = list(itertools.product((False, True), repeat=3))


def alignment_spec(config) -> AlignmentSpec:
    bandwidth = config.bandwidth
    if not isinstance(bandwidth, str):
        bandwidth = tuple(float(b) for b in bandwidth)
    return AlignmentSpec(
        estimators=tuple(config.estimators), kernel=config.kernel, bandwidth=bandwidth,
        multipliers=tuple(config.multipliers), permutations=int(config.permutations), tests=tuple(config.tests),
        cka=bool(config.cka),
    )


def probe_images(paths: list[str], crop_size, size: int, multiple_of: int) -> np.ndarray:
    """(N, D, H, W, C) probe inputs; N = size rounded down to a multiple of the device count."""
    source = PreparedCaseSource(paths)
    available = len(paths) * len(FLIPS)
    count = min(size, available) // multiple_of * multiple_of
    if count < max(2, multiple_of):
        raise ValueError(f"alignment.probe_size={size}: {len(paths)} validation case(s) give at most {available} "
                         f"probe inputs, fewer than the {max(2, multiple_of)} needed for {multiple_of} devices")
    crops = [center_crop(source[i], tuple(crop_size))["image"] for i in range(len(paths))]
    images = []
    for flip, case in itertools.product(FLIPS, range(len(paths))):
        image = crops[case]
        axes = tuple(a for a, f in enumerate(flip) if f)
        images.append(np.flip(image, axis=axes) if axes else image)
        if len(images) == count:
            break
    return np.ascontiguousarray(np.stack(images))


class AlignmentProbe:
    def __init__(self, config, task, graph: ModelGraph, mesh, compute_dtype, images: np.ndarray, batch_size: int):
        self.spec = alignment_spec(config)
        self.sites = tuple(config.sites)
        self.mesh = mesh
        sharding = batch_sharding(mesh)
        if isinstance(images, jax.ShapeDtypeStruct):  # the probe model inputs, abstract: only `lower` applies
            self.images = images
        else:
            self.images = jax.device_put(task.probe_inputs(images), sharding)
        self.batch_size = batch_size
        self.reference = None
        self._features_compiled = self._measure_compiled = None

        def features(params, rest, images):
            model = graph.merge(params, rest, training=False)
            chunks = [task.probe_features(model, images[i:i + batch_size].astype(compute_dtype))
                      for i in range(0, images.shape[0], batch_size)]
            out = {site: jnp.concatenate([c[site] for c in chunks]) for site in chunks[0]}
            missing = [s for s in self.sites if s not in out]
            if missing:
                raise ValueError(f"alignment.sites {missing} are not produced by this backbone; it has {sorted(out)}")
            return {site: jax.lax.with_sharding_constraint(out[site], sharding) for site in self.sites}

        def measure(reference, current, key):
            return {site: compute_alignment(self.spec, reference[site], current[site], jax.random.fold_in(key, i))
                    for i, site in enumerate(self.sites)}

        self._features = jax.jit(features)
        self._measure = jax.jit(measure)

    @property
    def size(self) -> int:
        return int(self.images.shape[0])

    def set_reference(self, params: Any, rest: Any) -> None:
        """Compiles the probe's feature pass and measurement ahead of training, so that the in-loop cost
        (`alignment_share`) is the steady cost, as for the train step, and embeds the probe with the initial
        weights `params`, `rest` (the current weights passed later must have their shapes and shardings)."""
        self._features_compiled = self._features.lower(params, rest, self.images).compile()
        self.reference = self._features_compiled(params, rest, self.images)
        self._measure_compiled = self._measure.lower(self.reference, self.reference, jax.random.key(0)).compile()

    def lower(self, params: Any, rest: Any) -> tuple[jax.stages.Lowered, jax.stages.Lowered]:
        """The feature and measurement computations lowered for (abstract) weights without running anything:
        ahead-of-time compilation for another platform (transfer_jax/aot.py)."""
        features = self._features.lower(params, rest, self.images)
        sharding = batch_sharding(self.mesh)
        reference = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                                 jax.eval_shape(self._features, params, rest, self.images))
        key = jax.eval_shape(lambda: jax.random.key(0))
        key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated(self.mesh))
        return features, self._measure.lower(reference, reference, key)

    def __call__(self, params: Any, rest: Any, key: jax.Array) -> dict[str, dict[str, jax.Array]]:
        """{site: {measure: scalar device array}} for the current weights against the reference."""
        if self.reference is None:
            raise RuntimeError("AlignmentProbe.set_reference must run before the first measurement")
        return self._measure_compiled(self.reference, self._features_compiled(params, rest, self.images), key)
