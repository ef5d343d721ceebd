"""Grain pipelines from prepared cases to host batches.

Training: source -> deterministic shuffle (new order every epoch) -> repeat -> random crop/zoom/flip/intensity jitter
(per-element seeds, so resuming reproduces the stream) -> task targets -> batch -> this process's rows of every
global batch -> optional worker processes. The iterator's state is a small dict saved with every checkpoint.

Evaluation: the centre crop of each case, in manifest order, batched with a `valid` flag so the last batch can be
padded to a fixed size (one compiled eval step).
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Iterator

import grain
import jax
import numpy as np

from transfer_jax.data.augment import AugmentConfig, center_crop, random_crop
from transfer_jax.data.errors import DataError
from transfer_jax.data.preprocess import PreparedCase
from transfer_jax.data.slices import slice_origin


def memory_cache_bytes(data_config) -> int:
    """`config.data.memory_cache_mb` in bytes, checked."""
    megabytes = data_config.memory_cache_mb
    if isinstance(megabytes, bool) or not isinstance(megabytes, (int, float)) or megabytes < 0:
        raise ValueError(f"config.data.memory_cache_mb must be a number of MiB >= 0 (0 = read every case from "
                         f"disk), got {megabytes!r}")
    return int(megabytes * 2 ** 20)


class PreparedCaseSource:
    """Random access over cached prepared cases, read from disk on demand.

    With `memory_cache_bytes`, cases stay in memory after their first read until that budget is used (the first
    ones read; no eviction, so under a random order every case has the same chance of being cached). Reading a
    case's .npz is a large share of a training element's host time (augment included). The budget is per source and
    process: the trainer's training and validation sources have one each, and every grain worker holds its own.
    Cached arrays are read-only, so a transform that wrote into its input would fail loudly instead of corrupting
    later epochs.
    """

    def __init__(self, paths: list[str], memory_cache_bytes: int = 0):
        self.paths = list(paths)
        self.memory_cache_bytes = int(memory_cache_bytes)
        self._init_cache()

    def _init_cache(self) -> None:
        self._cache: dict[int, dict] = {}
        self._cached_bytes = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # worker processes start with an empty cache of their own
        return {"paths": self.paths, "memory_cache_bytes": self.memory_cache_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_cache()

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def cached_cases(self) -> int:
        return len(self._cache)

    def __getitem__(self, index: int) -> dict:
        element = self._cache.get(index)
        if element is None:
            element = self._read(index)
            if self.memory_cache_bytes > 0:
                self._keep(index, element)
        return dict(element)

    def _read(self, index: int) -> dict:
        case = PreparedCase.load(self.paths[index])
        return {"image": case.image, "gland": case.gland, "lesion": case.lesion, "label": case.label,
                "case_index": np.int32(index), **slice_origin(case.region_grid, case.source_grid)}

    def _keep(self, index: int, element: dict) -> None:
        arrays = [v for v in element.values() if isinstance(v, np.ndarray)]
        size = sum(a.nbytes for a in arrays)
        with self._lock:
            if index in self._cache or self._cached_bytes + size > self.memory_cache_bytes:
                return
            for array in arrays:
                array.setflags(write=False)
            self._cache[index] = element
            self._cached_bytes += size


class EpochShuffle(grain.MapDataset):
    """A new order of the parent's elements every epoch, read by global index (epoch * len + position).

    Does what `MapDataset.shuffle` does before `.repeat()`. grain 0.2.18's per-index permutation is slowest on
    small cohorts, where it can cost more per element than the crop itself (benchmarks/RESULTS.md §3a). This
    permutes each epoch once.
    """

    def __init__(self, parent: grain.MapDataset, *, seed: int):
        super().__init__(parent)
        self._seed = int(seed)
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return f"EpochShuffle(seed={self._seed})"

    def _order(self, epoch: int) -> np.ndarray:
        order = self._orders.get(epoch)
        if order is None:
            order = np.random.default_rng([self._seed, epoch]).permutation(len(self._parent))
            self._orders = {epoch: order, **{e: o for e, o in self._orders.items() if e > epoch - 2}}
        return order

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, position = divmod(index, len(self._parent))
        return self._parent[int(self._order(epoch)[position])]


@dataclasses.dataclass(frozen=True)
class _Augment(grain.transforms.RandomMap):
    crop_size: tuple[int, int, int]
    config: AugmentConfig

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        return random_crop(element, self.crop_size, self.config, rng)


@dataclasses.dataclass(frozen=True)
class _CenterCrop(grain.transforms.Map):
    crop_size: tuple[int, int, int]

    def map(self, element: dict) -> dict:
        return center_crop(element, self.crop_size)


@dataclasses.dataclass(frozen=True)
class _TaskSample(grain.transforms.Map):
    task: object

    def map(self, element: dict) -> dict:
        sample = self.task.make_sample(element)
        sample["case_index"] = element["case_index"]
        return sample


def train_dataset(paths: list[str], task, *, crop_size, augment: AugmentConfig, per_process_batch: int,
                  seed: int, workers: int = 0, prefetch: int = 2,
                  memory_cache_bytes: int = 0) -> grain.IterDataset:
    process, processes = jax.process_index(), jax.process_count()
    source = grain.MapDataset.source(PreparedCaseSource(paths, memory_cache_bytes))
    if len(source) == 0:
        raise DataError("no training cases: the training split is empty")
    # One global stream (shuffle, augmentation seeds) for every process count: global batch b is the per-process
    # batches b * processes ... b * processes + processes - 1, and this process reads (and decodes) only its own
    # rows, so the global batch does not depend on how many processes share it.
    ds = (
        EpochShuffle(source, seed=seed)
        .repeat()
        .random_map(_Augment(tuple(crop_size), augment), seed=seed + 1)
        .map(_TaskSample(task))
        .batch(per_process_batch, drop_remainder=True)
    )[process::processes]
    threads = max(1, min(4, per_process_batch))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(prefetch, threads)))
    if workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=prefetch))
    return it


def eval_batches(cases: PreparedCaseSource, task, *, crop_size, per_process_batch: int) -> Iterator[dict]:
    """Centre-cropped evaluation batches of exactly `per_process_batch` rows for this process's slice of cases.

    Every process yields the same number of batches (collectives need it); padding rows have valid=False. Pass the
    same `cases` to every evaluation so that its memory cache saves the re-reads.
    """
    process, processes = jax.process_index(), jax.process_count()
    ds = grain.MapDataset.source(cases).map(_CenterCrop(tuple(crop_size))).map(_TaskSample(task))
    local = list(range(process, len(ds), processes))
    per_process = -(-len(ds) // processes)
    num_batches = -(-per_process // per_process_batch)
    template = None
    for b in range(num_batches):
        indices = local[b * per_process_batch:(b + 1) * per_process_batch]
        rows = [ds[i] for i in indices]
        if template is None:
            template = rows[0] if rows else ds[0]
        valid = np.zeros(per_process_batch, bool)
        valid[: len(rows)] = True
        rows += [template] * (per_process_batch - len(rows))
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        batch["valid"] = valid
        yield batch
