"""The study matrix: for every (backbone, task, init) one fine-tuning run, then the analysis and the report.

    result = run_study(config, study_dir)   # config = configs/study.py:<preset>

Layout of `study_dir`:

    runs/<backbone>-<task>-<init>/   the trainer's workdir of each run (checkpoints, metrics, summary.json)
    runs.json                        the matrix: every planned run with its status and, if skipped, why
    results.csv, report.md, ...      written by `transfer_jax.study.report`

Each run's config is `configs/<task>.py` built with `"<backbone>,<study.preset>"`, then `init.mode` (and, for
pretrained runs listed in `study.pretrained_checkpoints`, `init.checkpoint`) set by the study, then
`study.overrides`. Every config is built and checked before the first run starts, so a bad study config fails in
seconds, not after hours of training.

Resuming: a run whose summary.json reports `steps >= total_steps` (or an early stop) is not run again; any other
run is handed to the trainer again with the same workdir, which resumes it from its latest checkpoint.

Skipped, not fatal: a task whose config file does not exist yet, and a backbone the task config rejects. Both are
listed with the reason in runs.json and the report. Any error raised while training propagates.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Any, Callable, Mapping, Optional

import ml_collections

from transfer_jax.study import BACKBONES, INITS, RUN_PRESETS, TASKS
from transfer_jax.study import analysis as study_analysis
from transfer_jax.study import report as study_report

CONFIGS_ENV = "TRANSFER_JAX_CONFIGS"
RUNS_DIR = "runs"
STUDY_FIELDS = ("name", "tasks", "backbones", "inits", "preset", "overrides", "pretrained_checkpoints",
                "bootstrap", "seed")


class StudyConfigError(ValueError):
    """The `study` block of the config is invalid; the message names the field."""


@dataclasses.dataclass(frozen=True)
class StudySpec:
    """The validated `study` block."""

    tasks: tuple[str, ...]
    backbones: tuple[str, ...]
    inits: tuple[str, ...]
    preset: str
    overrides: dict[str, Any]  # dotted key -> value
    pretrained_checkpoints: dict[str, str]  # backbone -> artifact dir
    bootstrap: int
    seed: int


@dataclasses.dataclass
class PlannedRun:
    backbone: str
    task: str
    init: str
    workdir: str
    config: Optional[ml_collections.ConfigDict]  # None when skipped
    skip_reason: str = ""

    @property
    def name(self) -> str:
        return study_analysis.run_name(self.backbone, self.task, self.init)


@dataclasses.dataclass
class StudyResult:
    runs: list[study_analysis.RunRecord]
    analysis: study_analysis.StudyAnalysis
    outputs: dict[str, str]  # output name -> path (empty on processes other than 0)


# ---------------------------------------------------------------------------------------------------------------
# The study block


def _names(study, field: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    value = study.get(field)
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
        raise StudyConfigError(f"study.{field} must be a tuple of names from {allowed}, got {value!r}")
    unknown = [v for v in value if v not in allowed]
    if unknown:
        raise StudyConfigError(f"study.{field}: unknown {unknown}; choose from {allowed}")
    if not value:
        raise StudyConfigError(f"study.{field} is empty; choose from {allowed}")
    if len(set(value)) != len(value):
        raise StudyConfigError(f"study.{field} lists a name twice: {tuple(value)}")
    return tuple(value)


def flatten_overrides(overrides: Mapping, prefix: str = "") -> dict[str, Any]:
    """{'optimizer': {'lr': 1}, 'data.crop_size': (8, 8, 8)} -> {'optimizer.lr': 1, 'data.crop_size': (8, 8, 8)}."""
    flat = {}
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, (Mapping, ml_collections.ConfigDict)):
            flat.update(flatten_overrides(value, prefix=f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def parse_study(config) -> StudySpec:
    study = config.get("study") if hasattr(config, "get") else None
    if not isinstance(study, ml_collections.ConfigDict):
        raise StudyConfigError("the config has no `study` block (use configs/study.py)")
    unknown = sorted(set(study.keys()) - set(STUDY_FIELDS))
    if unknown:
        raise StudyConfigError(f"study.{unknown[0]} is not a study field; known fields: {STUDY_FIELDS}")
    preset = study.get("preset")
    if preset not in RUN_PRESETS:
        raise StudyConfigError(f"study.preset must be one of {RUN_PRESETS}, got {preset!r}")
    overrides = flatten_overrides(study.get("overrides") or {})
    owned = [k for k in overrides if k == "init" or k.startswith("init.")]
    if owned:
        raise StudyConfigError(f"study.overrides[{owned[0]!r}]: the study sets init.* itself; use study.inits and "
                               "study.pretrained_checkpoints")
    checkpoints = dict((study.get("pretrained_checkpoints") or {}).items())
    unknown = [b for b in checkpoints if b not in BACKBONES]
    if unknown:
        raise StudyConfigError(f"study.pretrained_checkpoints: unknown backbone(s) {unknown}; known: {BACKBONES}")
    for backbone, path in checkpoints.items():
        if not isinstance(path, str):
            raise StudyConfigError(f"study.pretrained_checkpoints.{backbone} must be a directory path, got {path!r}")
    for field, minimum in (("bootstrap", 0), ("seed", 0)):
        value = study.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise StudyConfigError(f"study.{field} must be an integer >= {minimum}, got {value!r}")
    return StudySpec(
        tasks=_names(study, "tasks", TASKS), backbones=_names(study, "backbones", BACKBONES),
        inits=_names(study, "inits", INITS), preset=preset, overrides=overrides,
        pretrained_checkpoints={b: p for b, p in checkpoints.items() if p}, bootstrap=study.bootstrap,
        seed=study.seed)


# ---------------------------------------------------------------------------------------------------------------
# Per-run configs


def configs_dir() -> str:
    """Folder of the task configs: $TRANSFER_JAX_CONFIGS, else `configs/` next to the package."""
    directory = os.environ.get(CONFIGS_ENV) or os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"task config folder {directory} not found; set {CONFIGS_ENV} to the repository's "
                                "configs/ folder")
    return directory


def _load_config_module(path: str, task: str):
    spec = importlib.util.spec_from_file_location(f"transfer_jax_study_config_{task}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any], source: str) -> None:
    """Sets each dotted field, which must exist in the task config (a typo would otherwise be silently ignored)."""
    for dotted, value in overrides.items():
        target = config
        *parents, leaf = dotted.split(".")
        for depth, part in enumerate(parents):
            child = target.get(part) if isinstance(target, ml_collections.ConfigDict) else None
            if not isinstance(child, ml_collections.ConfigDict):
                raise StudyConfigError(f"study.overrides[{dotted!r}]: {source} has no config block "
                                       f"{'.'.join(parents[:depth + 1])!r}")
            target = child
        if leaf not in target:
            raise StudyConfigError(f"study.overrides[{dotted!r}]: {source} has no field {dotted!r}")
        try:
            target[leaf] = value
        except (TypeError, ValueError) as error:
            raise StudyConfigError(f"study.overrides[{dotted!r}] = {value!r}: {error}") from error


def plan_run(spec: StudySpec, directory: str, runs_dir: str, backbone: str, task: str, init: str,
             modules: Optional[dict] = None) -> PlannedRun:
    """The run's config, or the reason it is skipped. `modules` caches loaded task config files by path."""
    workdir = os.path.join(runs_dir, study_analysis.run_name(backbone, task, init))
    path = os.path.join(directory, f"{task}.py")
    if not os.path.isfile(path):
        return PlannedRun(backbone, task, init, workdir, None, f"task config {path} does not exist yet")
    modules = {} if modules is None else modules
    if path not in modules:
        modules[path] = _load_config_module(path, task)
    module = modules[path]
    try:
        config = module.get_config(f"{backbone},{spec.preset}")
    except ValueError as error:
        # Task configs reject a backbone they cannot build with a ValueError naming it (transfer_jax.config
        # .parse_arg); any other error in a config is a bug and propagates.
        if backbone not in str(error):
            error.add_note(f"while building {path} with argument {backbone + ',' + spec.preset!r}")
            raise
        return PlannedRun(backbone, task, init, workdir, None, f"configs/{task}.py does not support {backbone}: "
                                                               f"{error}")
    built = config.get("model", {}).get("backbone")
    if built != backbone:
        return PlannedRun(backbone, task, init, workdir, None,
                          f"configs/{task}.py built backbone {built!r} when asked for {backbone!r}")
    config.init.mode = init
    if init == "scratch":
        config.init.checkpoint = ""  # the snapshot then says exactly what the run used
    elif backbone in spec.pretrained_checkpoints:
        config.init.checkpoint = os.path.abspath(spec.pretrained_checkpoints[backbone])
    apply_overrides(config, spec.overrides, f"configs/{task}.py")
    return PlannedRun(backbone, task, init, workdir, config)


def plan_study(spec: StudySpec, study_dir: str) -> list[PlannedRun]:
    directory = configs_dir()
    runs_dir = os.path.join(study_dir, RUNS_DIR)
    modules: dict = {}
    plan = [plan_run(spec, directory, runs_dir, backbone, task, init, modules)
            for backbone in spec.backbones for task in spec.tasks for init in spec.inits]
    # Fail before training anything when a pretrained run would need weights that are not there.
    needed = {run.backbone for run in plan if run.config is not None and run.init == "pretrained"}
    for backbone in sorted(needed & set(spec.pretrained_checkpoints)):
        path = spec.pretrained_checkpoints[backbone]
        if not os.path.isdir(path):
            raise StudyConfigError(
                f"study.pretrained_checkpoints.{backbone}: {os.path.abspath(path)} is not a directory; convert the "
                "released weights there (scripts/convert_profound.py / scripts/convert_provicnet.py --output) or "
                "point the field at a pretraining artifact")
    return plan


# ---------------------------------------------------------------------------------------------------------------
# Running


def _snapshot(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort())


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def is_finished(summary: Optional[Mapping], total_steps: int) -> bool:
    if not summary:
        return False
    steps = summary.get("steps")
    return bool(summary.get("stopped_early")) or (isinstance(steps, int) and steps >= total_steps)


def _changed_fields(summary: Mapping, config: ml_collections.ConfigDict, spec: StudySpec) -> list[str]:
    """Study-controlled fields whose value differs from the finished run's snapshot.

    Only these: the trainer may legitimately rewrite others (e.g. adopt the checkpoint's architecture).
    """
    previous, current = _flat(summary.get("config") or {}), _flat(_snapshot(config))
    keys = ("task.name", "model.backbone", "init.mode", "init.checkpoint", "total_steps", *spec.overrides)
    return [k for k in dict.fromkeys(keys) if k in current and previous.get(k) != current[k]]


def _write_runs_json(path: str, records: list[study_analysis.RunRecord]) -> None:
    with open(path, "w") as f:
        json.dump([dataclasses.asdict(r) | {"name": r.name} for r in records], f, indent=2)


def run_study(config, study_dir: str, *, log: Callable[[str], None] = print) -> StudyResult:
    """Runs (or resumes) every run of the study, then writes the analysis and the report into `study_dir`."""
    spec = parse_study(config)
    study_dir = os.path.abspath(study_dir)
    os.makedirs(os.path.join(study_dir, RUNS_DIR), exist_ok=True)
    plan = plan_study(spec, study_dir)
    active = [run for run in plan if run.config is not None]
    log(f"study: {len(plan)} runs planned ({len(active)} to run or reuse, {len(plan) - len(active)} skipped) "
        f"in {study_dir}")

    from transfer_jax.train import loop  # the study sits on top of the trainer, never the other way round

    records = []
    for index, run in enumerate(plan, start=1):
        prefix = f"[{index}/{len(plan)}] {run.name}"
        if run.config is None:
            log(f"{prefix}: skipped: {run.skip_reason}")
            records.append(study_analysis.RunRecord(run.backbone, run.task, run.init, run.workdir, "skipped",
                                                    run.skip_reason))
            continue
        summary = study_analysis.read_summary(run.workdir)
        if is_finished(summary, run.config.total_steps):
            changed = _changed_fields(summary, run.config, spec)
            note = (f"finished earlier with a different config ({', '.join(changed[:5])}"
                    f"{', ...' if len(changed) > 5 else ''}); delete {run.workdir} to redo it") if changed else ""
            log(f"{prefix}: finished earlier ({summary.get('steps')} steps), reused" + (f"; {note}" if note else ""))
            records.append(study_analysis.RunRecord(run.backbone, run.task, run.init, run.workdir, "reused", note))
            continue
        log(f"{prefix}: training" + (" (resuming)" if os.path.isdir(run.workdir) else ""))
        try:
            loop.train_and_evaluate(run.config, run.workdir)
        except BaseException as error:
            error.add_note(f"in study run {run.name} (workdir {run.workdir}); re-running the study resumes it")
            raise
        records.append(study_analysis.RunRecord(run.backbone, run.task, run.init, run.workdir, "trained"))

    analysis = study_analysis.analyze(records, bootstrap=spec.bootstrap, seed=spec.seed)
    import jax

    outputs: dict[str, str] = {}
    if jax.process_index() == 0:  # every process trains; one writes the report
        _write_runs_json(os.path.join(study_dir, "runs.json"), records)
        outputs = study_report.write_report(
            study_dir, analysis, run_configs={run.name: _snapshot(run.config) for run in active},
            study_config=_snapshot(config))
        outputs["runs.json"] = os.path.join(study_dir, "runs.json")
        log(f"study: report in {outputs['report.md']} and {outputs['report.html']}")
    return StudyResult(runs=records, analysis=analysis, outputs=outputs)
