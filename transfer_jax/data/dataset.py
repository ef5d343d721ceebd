"""From the `data` config block to checked, prepared train / val / test case lists."""
from __future__ import annotations

import dataclasses
import os

from transfer_jax.data.augment import AugmentConfig
from transfer_jax.data.errors import DataError
from transfer_jax.data.manifest import Case, read_manifest
from transfer_jax.data.phantom import PhantomConfig, default_phantom_manifest
from transfer_jax.data.preprocess import (PreparedCase, PreprocessConfig, default_cache_dir, label_map_problems,
                                         preprocess_cases)


@dataclasses.dataclass
class PreparedSplits:
    manifest: str
    paths: dict[str, list[str]]  # split -> prepared case files, manifest order
    case_ids: dict[str, list[str]]
    skipped: list[DataError]


def preprocess_config(data_config) -> PreprocessConfig:
    # .get: a run config saved before the label maps existed keeps the defaults it was trained with
    maps = {key: tuple(data_config.get(key, getattr(PreprocessConfig, key)))
            for key in ("gland_labels", "gland_background_labels", "lesion_labels", "lesion_background_labels")}
    problems = [p for name in ("gland", "lesion")
                for p in label_map_problems(name, maps[f"{name}_labels"], maps[f"{name}_background_labels"])]
    graded = tuple(data_config.get("graded_masks", ()))
    if set(graded) - {"gland", "lesion"}:
        problems.append(f"data.graded_masks {graded}: expected names among ('gland', 'lesion')")
    elif any(v > 255 for name in graded for v in maps[f"{name}_labels"]):
        problems.append(f"data.graded_masks {graded}: graded label values must be at most 255 (stored as uint8)")
    if problems:
        raise DataError("; ".join(problems))
    return PreprocessConfig(graded_masks=graded,
        spacing=None if data_config.spacing is None else tuple(data_config.spacing),
        crop_size=tuple(data_config.crop_size), region_margin=data_config.region_margin,
        channels=tuple(data_config.channels), **maps, intensity=data_config.get("intensity", "zscore_nonzero"),
        region_centre=data_config.get("region_centre", "gland"),
    )


def augment_config(data_config) -> AugmentConfig:
    return AugmentConfig(**data_config.augment.to_dict())


def resolve_manifest(data_config) -> str:
    """The configured manifest, or the embedded phantom dataset (generated on first use) when none is given."""
    if data_config.manifest:
        return data_config.manifest
    return default_phantom_manifest(PhantomConfig(**data_config.phantom.to_dict()))


def prepared_cache_dir(data_config) -> str:
    """The prepared-case cache every run shares: `data.cache_dir`, else `preprocess.default_cache_dir()`."""
    return os.path.abspath(os.path.expanduser(data_config.cache_dir or default_cache_dir()))


def prepare_splits(data_config, cache_dir: str, task, log=print, progress: bool = False) -> PreparedSplits:
    """Every case of the manifest prepared into `cache_dir` (those already there are reused) and checked."""
    manifest = resolve_manifest(data_config)
    cases: list[Case] = read_manifest(manifest, label_column=data_config.get("label_column", "label"))

    def validate(case: Case, path: str) -> None:
        task.validate_case(case, PreparedCase.load(path))

    report = preprocess_cases(cases, preprocess_config(data_config), cache_dir, on_bad_case=data_config.on_bad_case,
                              workers=data_config.preprocess_workers, validate=validate, progress=progress)
    log(f"prepared cases: {len(cases) - report.prepared} from the cache, {report.prepared} prepared now "
        f"({report.seconds:.1f}s), in {cache_dir}")
    for problem in report.problems:
        log(f"skipping bad case: {problem}")
    paths, ids = {}, {}
    for split in ("train", "val", "test"):
        chosen = [c for c in cases if c.split == split and c.case_id in report.paths]
        paths[split] = [report.paths[c.case_id] for c in chosen]
        ids[split] = [c.case_id for c in chosen]
    if not paths["train"]:
        raise DataError(f"no usable training cases in {manifest}")
    if not paths["val"]:
        raise DataError(f"no usable validation cases (split == 'val') in {manifest}")
    return PreparedSplits(manifest=os.path.abspath(manifest), paths=paths, case_ids=ids, skipped=report.problems)
