"""The study matrix: for every (backbone, task, init) one fine-tuning run, then the analysis and the report.

    result = run_study(config, study_dir)   # config = configs/study.py:<preset>

Every run is repeated for `study.seeds` seeds (names gain `-seed<s>` from seed 1 on) and, with
`study.arms = ("finetune", "probe")`, a linear-probe run (`-probe`: the pretrained backbone frozen) joins each
backbone x task x seed.

Layout of `study_dir`:

    pretraining/<backbone>/          the JAX pretraining run of a backbone (`study.pretraining`); its artifact
                                     `pretraining/<backbone>/pretrained` initialises that backbone's pretrained runs
    runs/<run name>/                 the trainer's workdir of each run (checkpoints, metrics, summary.json); the
                                     name is `<backbone>-<task>-<init>[-probe][-seed<s>]`
    runs.json                        the matrix: every planned run with its status and, if skipped, why
    control/                         the positive control (`study.control.enabled`, `study/control.py`): sources/
                                     (the aligned task run, the unrelated pretraining) and runs/ (fine-tuning)
    results.csv, report.md, ...      written by `transfer_jax.study.report`; control.csv by `study/control.py`

Where the pretrained weights come from, per backbone: `study.pretrained_checkpoints[backbone]` (converted release
weights or any artifact) if given; else `study.pretraining[backbone]`, a pretraining config
(`"pretrain_fcmae"`, `"pretrain_contrastive:both"`: `configs/<name>.py` built with `"<args>,<study.preset>"`, then
`study.pretraining_overrides`) that the study runs first, once per backbone; else the task config's own
`init.checkpoint` (a random stand-in, said loudly in the run's log, when that is empty too).

Each run's config is `configs/<task>.py` built with `"<backbone>,<study.preset>"`, then `init.mode` (and, for
pretrained runs, `init.checkpoint`) set by the study, then `study.overrides`. Every config is built and checked
before the first run starts, so a bad study config fails in seconds, not after hours of training.

Resuming: a run whose summary.json reports `steps >= total_steps` (or an early stop) is not run again (a
pretraining run also needs its artifact); any other run is handed to the trainer again with the same workdir, which
resumes it from its latest checkpoint.

Skipped, not fatal: a task whose config file does not exist yet, and a backbone the task config rejects. Both are
listed with the reason in runs.json and the report. Any error raised while training propagates.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
from typing import Any, Callable, Mapping, Optional

import ml_collections

from transfer_jax.study import BACKBONES, INITS, RUN_PRESETS, TASKS
from transfer_jax.study import analysis as study_analysis
from transfer_jax.study import control as study_control
from transfer_jax.study import report as study_report

CONFIGS_ENV = "TRANSFER_JAX_CONFIGS"
RUNS_DIR = "runs"
PRETRAINING_DIR = "pretraining"
CONTROL_DIR = "control"
STUDY_FIELDS = ("name", "tasks", "backbones", "inits", "arms", "seeds", "preset", "overrides", "task_overrides",
                "pretrained_checkpoints", "pretraining", "pretraining_overrides", "bootstrap", "permutations", "seed",
                "control")
CONTROL_FIELDS = ("enabled", "backbone", "task", "unrelated", "aligned_overrides")


class StudyConfigError(ValueError):
    """The `study` block of the config is invalid; the message names the field."""


@dataclasses.dataclass(frozen=True)
class StudySpec:
    """The validated `study` block."""

    tasks: tuple[str, ...]
    backbones: tuple[str, ...]
    inits: tuple[str, ...]
    arms: tuple[str, ...]  # "finetune" and optionally "probe" (frozen pretrained backbone)
    seeds: int  # replicates of every run; seed s adds s to the task config's seed
    preset: str
    overrides: dict[str, Any]  # dotted key -> value
    task_overrides: dict[str, dict[str, Any]]  # task -> dotted key -> value, after `overrides`
    pretrained_checkpoints: dict[str, str]  # backbone -> artifact dir
    pretraining: dict[str, str]  # backbone -> "<pretraining config name>[:<args>]"
    pretraining_overrides: dict[str, Any]  # dotted key -> value, for the pretraining runs
    bootstrap: int
    permutations: int
    seed: int
    control: Optional["ControlSpec"] = None  # None: no positive control


@dataclasses.dataclass(frozen=True)
class ControlSpec:
    """The validated `study.control` block (see `study/control.py`)."""

    backbone: str
    task: str
    unrelated: str  # pretraining config of the unrelated source, "<name>[:<args>]"
    aligned_overrides: dict[str, Any]  # the aligned source's task run, after `overrides` and `task_overrides`


@dataclasses.dataclass
class PlannedRun:
    backbone: str
    task: str
    init: str
    workdir: str
    config: Optional[ml_collections.ConfigDict]  # None when skipped
    skip_reason: str = ""
    seed: int = 0
    arm: str = "finetune"

    @property
    def name(self) -> str:
        return study_analysis.run_name(self.backbone, self.task, self.init, self.seed, self.arm)

    def record(self, status: str, reason: str = "") -> study_analysis.RunRecord:
        return study_analysis.RunRecord(self.backbone, self.task, self.init, self.workdir, status, reason,
                                        seed=self.seed, arm=self.arm)


@dataclasses.dataclass
class PlannedPretraining:
    backbone: str
    source: str  # "<config name>[:<args>]" as given in study.pretraining
    workdir: str
    config: ml_collections.ConfigDict

    @property
    def name(self) -> str:
        return f"{self.backbone}-pretraining"

    @property
    def artifact(self) -> str:
        from transfer_jax.train.export import EXPORT_DIR

        return os.path.join(self.workdir, EXPORT_DIR)


@dataclasses.dataclass
class StudyResult:
    runs: list[study_analysis.RunRecord]
    analysis: study_analysis.StudyAnalysis
    outputs: dict[str, str]  # output name -> path (empty on processes other than 0)
    control: Optional[study_control.ControlAnalysis] = None  # the positive control, when the study ran one


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
    pretraining = dict((study.get("pretraining") or {}).items())
    unknown = [b for b in pretraining if b not in BACKBONES]
    if unknown:
        raise StudyConfigError(f"study.pretraining: unknown backbone(s) {unknown}; known: {BACKBONES}")
    for backbone, source in pretraining.items():
        _pretraining_source(f"pretraining.{backbone}", source)
    pretraining_overrides = flatten_overrides(study.get("pretraining_overrides") or {})
    task_overrides = {}
    for task, values in (study.get("task_overrides") or {}).items():
        if task not in TASKS:
            raise StudyConfigError(f"study.task_overrides: unknown task {task!r}; known: {TASKS}")
        task_overrides[task] = flatten_overrides(values or {})
        if any(k == "init" or k.startswith("init.") for k in task_overrides[task]):
            raise StudyConfigError(f"study.task_overrides.{task}: the study sets init.* itself")
    arms = _names(study, "arms", study_analysis.ARMS)
    if "finetune" not in arms:
        raise StudyConfigError(f"study.arms must include 'finetune' (the gains compare fine-tuning runs), got {arms}")
    for field, minimum in (("bootstrap", 0), ("permutations", 1), ("seeds", 1), ("seed", 0)):
        value = study.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise StudyConfigError(f"study.{field} must be an integer >= {minimum}, got {value!r}")
    return StudySpec(
        control=parse_control(study.get("control"), study.get("pretraining") or {}),
        tasks=_names(study, "tasks", TASKS), backbones=_names(study, "backbones", BACKBONES),
        inits=_names(study, "inits", INITS), arms=arms, seeds=study.seeds, preset=preset, overrides=overrides,
        task_overrides=task_overrides,
        pretrained_checkpoints={b: p for b, p in checkpoints.items() if p},
        pretraining={b: v for b, v in pretraining.items() if v}, pretraining_overrides=pretraining_overrides,
        bootstrap=study.bootstrap, permutations=study.permutations, seed=study.seed)


def _pretraining_source(field: str, source) -> str:
    if not isinstance(source, str) or not source.split(":")[0].startswith("pretrain_"):
        raise StudyConfigError(f"study.{field} must name a pretraining config such as 'pretrain_fcmae' or "
                               f"'pretrain_contrastive:both', got {source!r}")
    return source


def parse_control(control, pretraining: Mapping) -> Optional[ControlSpec]:
    """None when `study.control` is absent or not enabled."""
    if control is None or not control.get("enabled", False):
        return None
    unknown = sorted(set(control.keys()) - set(CONTROL_FIELDS))
    if unknown:
        raise StudyConfigError(f"study.control.{unknown[0]} is not a control field; known fields: {CONTROL_FIELDS}")
    backbone, task = control.get("backbone"), control.get("task")
    if backbone not in BACKBONES:
        raise StudyConfigError(f"study.control.backbone must be one of {BACKBONES}, got {backbone!r}")
    if task not in TASKS:
        raise StudyConfigError(f"study.control.task must be one of {TASKS}, got {task!r}")
    if not pretraining.get(backbone):
        raise StudyConfigError(f"study.control: the related source is study.pretraining.{backbone}, which is empty")
    overrides = flatten_overrides(control.get("aligned_overrides") or {})
    if any(k == "init" or k.startswith("init.") for k in overrides):
        raise StudyConfigError("study.control.aligned_overrides: the study sets init.* itself")
    return ControlSpec(backbone, task, _pretraining_source("control.unrelated", control.get("unrelated")),
                       overrides)


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


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any], source: str,
                    field: str = "overrides") -> None:
    """Sets each dotted field, which must exist in the task config (a typo would otherwise be silently ignored)."""
    for dotted, value in overrides.items():
        target = config
        *parents, leaf = dotted.split(".")
        for depth, part in enumerate(parents):
            child = target.get(part) if isinstance(target, ml_collections.ConfigDict) else None
            if not isinstance(child, ml_collections.ConfigDict):
                raise StudyConfigError(f"study.{field}[{dotted!r}]: {source} has no config block "
                                       f"{'.'.join(parents[:depth + 1])!r}")
            target = child
        if leaf not in target:
            raise StudyConfigError(f"study.{field}[{dotted!r}]: {source} has no field {dotted!r}")
        try:
            target[leaf] = value
        except (TypeError, ValueError) as error:
            raise StudyConfigError(f"study.{field}[{dotted!r}] = {value!r}: {error}") from error


def plan_pretraining(spec: StudySpec, directory: str, study_dir: str, backbones: set[str]
                     ) -> dict[str, PlannedPretraining]:
    """backbone -> its pretraining run, for `backbones` (those with pretrained runs) without a given checkpoint."""
    planned = {}
    for backbone in spec.backbones:
        if backbone not in backbones or backbone in spec.pretrained_checkpoints or backbone not in spec.pretraining:
            continue
        planned[backbone] = pretraining_run(spec, directory, backbone, spec.pretraining[backbone],
                                            os.path.join(study_dir, PRETRAINING_DIR, backbone),
                                            f"pretraining.{backbone}")
    return planned


def pretraining_run(spec: StudySpec, directory: str, backbone: str, source: str, workdir: str, field: str
                    ) -> PlannedPretraining:
    """The pretraining run of `source` ("<config name>[:<args>]") for `backbone`; `field` names it in errors."""
    name, _, args = source.partition(":")
    path = os.path.join(directory, f"{name}.py")
    if not os.path.isfile(path):
        raise StudyConfigError(f"study.{field}: pretraining config {path} does not exist")
    config = _load_config_module(path, name).get_config(",".join(filter(None, (args, spec.preset))))
    built = config.get("model", {}).get("backbone")
    if built != backbone:
        raise StudyConfigError(f"study.{field}: {name}.py pretrains {built!r}, not {backbone!r}")
    apply_overrides(config, spec.pretraining_overrides, f"configs/{name}.py", field="pretraining_overrides")
    return PlannedPretraining(backbone, source, workdir, config)


def plan_run(spec: StudySpec, directory: str, runs_dir: str, backbone: str, task: str, init: str,
             modules: Optional[dict] = None, seed: int = 0, arm: str = "finetune") -> PlannedRun:
    """The run's config, or the reason it is skipped. `modules` caches loaded task config files by path.

    Seed s adds s to the config's `seed` (head initialisation, data order, augmentation); the pretrained weights
    and the phantom cohort stay the same. The probe arm fine-tunes the head on a frozen pretrained backbone.
    """
    workdir = os.path.join(runs_dir, study_analysis.run_name(backbone, task, init, seed, arm))
    planned = functools.partial(PlannedRun, backbone, task, init, workdir, seed=seed, arm=arm)
    path = os.path.join(directory, f"{task}.py")
    if not os.path.isfile(path):
        return planned(None, f"task config {path} does not exist yet")
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
        return planned(None, f"configs/{task}.py does not support {backbone}: {error}")
    built = config.get("model", {}).get("backbone")
    if built != backbone:
        return planned(None, f"configs/{task}.py built backbone {built!r} when asked for {backbone!r}")
    config.init.mode = init
    if init == "scratch":
        config.init.checkpoint = ""  # the snapshot then says exactly what the run used
    elif backbone in spec.pretrained_checkpoints:
        config.init.checkpoint = os.path.abspath(spec.pretrained_checkpoints[backbone])
    apply_overrides(config, spec.overrides, f"configs/{task}.py")
    apply_overrides(config, spec.task_overrides.get(task, {}), f"configs/{task}.py", field=f"task_overrides.{task}")
    config.seed = config.seed + seed
    if arm == "probe":
        config.optimizer.freeze_backbone = True
    return planned(config)


def plan_study(spec: StudySpec, study_dir: str) -> tuple[dict[str, PlannedPretraining], list[PlannedRun]]:
    directory = configs_dir()
    runs_dir = os.path.join(study_dir, RUNS_DIR)
    modules: dict = {}
    cells = [(init, "finetune") for init in spec.inits] + [("pretrained", "probe")] * ("probe" in spec.arms)
    plan = [plan_run(spec, directory, runs_dir, backbone, task, init, modules, seed, arm)
            for backbone in spec.backbones for task in spec.tasks for seed in range(spec.seeds)
            for init, arm in cells]
    # Pretraining only for backbones some fine-tuning run starts from (not those every task skipped).
    used = {run.backbone for run in plan if run.config is not None and run.init == "pretrained"}
    pretraining = plan_pretraining(spec, directory, study_dir, used)
    for run in plan:
        if run.config is not None and run.init == "pretrained" and run.backbone in pretraining:
            run.config.init.checkpoint = pretraining[run.backbone].artifact
        if run.config is not None and run.init == "pretrained" and not run.config.init.checkpoint:
            run.config.init.allow_random = True  # the stand-in this docstring describes, flagged in the report
    # Fail before training anything when a pretrained run would need weights that are not there.
    needed = {run.backbone for run in plan if run.config is not None and run.init == "pretrained"}
    for backbone in sorted(needed & set(spec.pretrained_checkpoints)):
        path = spec.pretrained_checkpoints[backbone]
        if not os.path.isdir(path):
            raise StudyConfigError(
                f"study.pretrained_checkpoints.{backbone}: {os.path.abspath(path)} is not a directory; convert the "
                "released weights there (python -m transfer_jax.convert profound|provicnet --output=...) or "
                "point the field at a pretraining artifact")
    return pretraining, plan


@dataclasses.dataclass
class PlannedControl:
    """The positive control: the runs that make its sources, then one fine-tuning run per source and seed."""

    aligned: PlannedRun  # the task run whose backbone becomes the aligned source
    related: PlannedPretraining  # the backbone's own pretraining (the matrix's, when it has one)
    unrelated: PlannedPretraining
    runs: list[tuple[str, PlannedRun]]  # (source, fine-tuning run)


def plan_control(spec: StudySpec, study_dir: str) -> Optional[PlannedControl]:
    """The control's runs and configs (None without `study.control`), built before anything trains."""
    from transfer_jax.train.export import EXPORT_DIR

    control = spec.control
    if control is None:
        return None
    directory = configs_dir()
    root = os.path.join(study_dir, CONTROL_DIR)

    def task_run(init: str, workdir: str, seed: int = 0) -> PlannedRun:
        run = plan_run(spec, directory, root, control.backbone, control.task, init, seed=seed)
        if run.config is None:
            raise StudyConfigError(f"study.control: {run.skip_reason}")
        run.workdir = workdir
        return run

    # Its own seed, past the fine-tuning runs' (`seeds`): otherwise it would be the random source's seed-0 run.
    aligned = task_run("scratch", os.path.join(root, "sources", "aligned"), seed=spec.seeds)
    apply_overrides(aligned.config, control.aligned_overrides, f"configs/{control.task}.py",
                    field="control.aligned_overrides")
    related = pretraining_run(spec, directory, control.backbone, spec.pretraining[control.backbone],
                              os.path.join(study_dir, PRETRAINING_DIR, control.backbone),
                              f"pretraining.{control.backbone}")
    unrelated = pretraining_run(spec, directory, control.backbone, control.unrelated,
                                os.path.join(root, "sources", "unrelated"), "control.unrelated")
    artifacts = {"aligned": os.path.join(aligned.workdir, EXPORT_DIR), "related": related.artifact,
                 "unrelated": unrelated.artifact}
    runs = []
    for seed in range(spec.seeds):
        for source in study_control.SOURCES:
            name = study_control.control_run_name(control.backbone, control.task, source, seed)
            run = task_run("pretrained" if source in artifacts else "scratch", os.path.join(root, RUNS_DIR, name),
                           seed)
            if source in artifacts:
                run.config.init.checkpoint = artifacts[source]
            runs.append((source, run))
    return PlannedControl(aligned, related, unrelated, runs)


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


def _changed_fields(summary: Mapping, config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> list[str]:
    """Study-controlled fields whose value differs from the finished run's snapshot.

    Only these: the trainer may legitimately rewrite others (e.g. adopt the checkpoint's architecture).
    """
    previous, current = _flat(summary.get("config") or {}), _flat(_snapshot(config))
    keys = ("task.name", "model.backbone", "init.mode", "init.checkpoint", "total_steps", "seed",
            "optimizer.freeze_backbone", *overrides)
    return [k for k in dict.fromkeys(keys) if k in current and previous.get(k) != current[k]]


def _write_runs_json(path: str, records: list[study_analysis.RunRecord]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump([dataclasses.asdict(r) | {"name": r.name} for r in records], f, indent=2)


def _train_or_reuse(label: str, workdir: str, config: ml_collections.ConfigDict, overrides: Mapping[str, Any],
                    loop, log, *, reusable: Callable[[], bool] = lambda: True) -> tuple[str, str]:
    """("reused", note) for a finished run (noting study-controlled fields that changed since), else trains or
    resumes it: ("trained", "")."""
    summary = study_analysis.read_summary(workdir)
    if is_finished(summary, config.total_steps) and reusable():
        changed = _changed_fields(summary, config, overrides)
        note = (f"finished earlier with a different config ({', '.join(changed[:5])}"
                f"{', ...' if len(changed) > 5 else ''}); delete {workdir} to redo it") if changed else ""
        log(f"{label}: finished earlier ({summary.get('steps')} steps), reused" + (f"; {note}" if note else ""))
        return "reused", note
    log(f"{label}: training" + (" (resuming)" if os.path.isdir(workdir) else ""))
    try:
        loop.train_and_evaluate(config, workdir)
    except BaseException as error:
        error.add_note(f"in study run {label} (workdir {workdir}); re-running the study resumes it")
        raise
    return "trained", ""


def _pretrain(run: PlannedPretraining, spec: StudySpec, loop, log) -> study_analysis.RunRecord:
    """Runs (or reuses) one backbone's pretraining; its artifact must exist afterwards."""
    from transfer_jax.convert.artifact import is_artifact

    status, note = _train_or_reuse(f"{run.name} ({run.source})", run.workdir, run.config,
                                   spec.pretraining_overrides, loop, log,
                                   reusable=lambda: is_artifact(run.artifact))
    if not is_artifact(run.artifact):
        raise RuntimeError(f"pretraining run {run.name} finished without writing its artifact {run.artifact}")
    return study_analysis.RunRecord(run.backbone, "pretraining", "scratch", run.workdir, status, note)


def _run_control(plan: PlannedControl, spec: StudySpec, loop, log) -> list[study_analysis.RunRecord]:
    """Makes the control's sources (reusing finished runs), then runs its fine-tuning runs; their records carry
    the source as `init`."""
    from transfer_jax.convert.artifact import is_artifact
    from transfer_jax.train.export import EXPORT_DIR, export_backbone

    control = spec.control
    overrides = {**spec.overrides, **spec.task_overrides.get(control.task, {})}
    aligned = plan.aligned
    status, _ = _train_or_reuse(f"control source aligned ({control.backbone} trained on {control.task})",
                                aligned.workdir, aligned.config, {**overrides, **control.aligned_overrides}, loop, log)
    if status == "trained" or not is_artifact(os.path.join(aligned.workdir, EXPORT_DIR)):
        log(f"control source aligned: backbone exported to {export_backbone(aligned.workdir)}")
    for source in (plan.related, plan.unrelated):
        _pretrain(source, spec, loop, log)
    records = []
    for index, (source, run) in enumerate(plan.runs, start=1):
        status, note = _train_or_reuse(f"[control {index}/{len(plan.runs)}] {os.path.basename(run.workdir)}",
                                       run.workdir, run.config, overrides, loop, log)
        records.append(study_analysis.RunRecord(run.backbone, run.task, source, run.workdir, status, note,
                                                seed=run.seed))
    return records


def run_study(config, study_dir: str, *, log: Callable[[str], None] = print) -> StudyResult:
    """Runs (or resumes) every run of the study, then writes the analysis and the report into `study_dir`."""
    spec = parse_study(config)
    study_dir = os.path.abspath(study_dir)
    os.makedirs(os.path.join(study_dir, RUNS_DIR), exist_ok=True)
    pretraining, plan = plan_study(spec, study_dir)
    control_plan = plan_control(spec, study_dir)
    active = [run for run in plan if run.config is not None]
    log(f"study: {len(pretraining)} pretraining and {len(plan)} fine-tuning runs planned ({len(active)} to run or "
        f"reuse, {len(plan) - len(active)} skipped) in {study_dir}")

    from transfer_jax.train import loop  # the study sits on top of the trainer, never the other way round

    pretraining_records = [_pretrain(run, spec, loop, log) for run in pretraining.values()]
    records = []
    for index, run in enumerate(plan, start=1):
        prefix = f"[{index}/{len(plan)}] {run.name}"
        if run.config is None:
            log(f"{prefix}: skipped: {run.skip_reason}")
            records.append(run.record("skipped", run.skip_reason))
            continue
        overrides = {**spec.overrides, **spec.task_overrides.get(run.task, {})}
        status, note = _train_or_reuse(prefix, run.workdir, run.config, overrides, loop, log)
        records.append(run.record(status, note))
    control_records = _run_control(control_plan, spec, loop, log) if control_plan else []

    analysis = study_analysis.analyze(records, bootstrap=spec.bootstrap, seed=spec.seed,
                                      permutations=spec.permutations)
    control = study_control.analyze_control(control_records, bootstrap=spec.bootstrap, seed=spec.seed,
                                            permutations=spec.permutations) if control_records else None
    import jax

    outputs: dict[str, str] = {}
    if jax.process_index() == 0:  # every process trains; one writes the report
        _write_runs_json(os.path.join(study_dir, "runs.json"), pretraining_records + records + control_records)
        run_configs = {run.name: _snapshot(run.config) for run in list(pretraining.values()) + active}
        if control_plan:
            run_configs.update({f"control-{os.path.basename(run.workdir)}": _snapshot(run.config)
                                for run in [control_plan.aligned, control_plan.unrelated]
                                + [run for _, run in control_plan.runs]})
        outputs = study_report.write_report(study_dir, analysis, run_configs=run_configs,
                                            study_config=_snapshot(config), pretraining=pretraining_records,
                                            extra_sections=study_control.sections(control))
        if control is not None:
            outputs["control.csv"] = os.path.join(study_dir, "control.csv")
            study_control.write_control_csv(outputs["control.csv"], control)
        outputs["runs.json"] = os.path.join(study_dir, "runs.json")
        log(f"study: report in {outputs['report.md']} and {outputs['report.html']}")
    return StudyResult(runs=records, analysis=analysis, outputs=outputs, control=control)


def run_study_command(config, study_dir: str, *, compilation_cache: bool = True) -> StudyResult:
    """The study as the command lines run it: XLA's compilation cache in `<study_dir>/xla_cache` (a backbone's
    pretrained and scratch runs compile the same programs), then `run_study`."""
    import jax

    if compilation_cache and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(study_dir), "xla_cache"))
    try:
        return run_study(config, study_dir)
    except StudyConfigError as error:  # a bad study block: its message names the field, a traceback adds nothing
        raise SystemExit(f"error: {error}") from None
