"""From run summaries to the study's numbers: one row per (backbone, task) and the alignment correlations.

Pure numpy/scipy on the `summary.json` files the trainer writes; no JAX, so a finished study can be re-analysed
anywhere.

Per row (definitions used throughout the report):

* `pretrained_best`, `scratch_best`: the best validation value of the task's primary metric in each run (the best
  checkpoint, measured at the end of the run as the summary reports it); `pretrained_test`, `scratch_test`: the
  same checkpoint's value on the test split (measured once), when the manifest has one.
* `absolute_gain` = pretrained - scratch for metrics to maximise, scratch - pretrained for metrics to minimise, so a
  positive gain always means pretraining helped.
* `relative_gain` = absolute_gain / |scratch_best| (undefined when scratch_best is 0): the "relative performance
  gain" of the paper, as a fraction (0.2 = 20 % better than training from scratch).
* `pretrained_steps_to_95`, `scratch_steps_to_95`: the first evaluated step within 95 % of that run's own best
  (the trainer's `steps_to_95pct_best`, the convergence speed); `convergence_speedup` = scratch / pretrained steps,
  > 1 when the pretrained run converges faster.
* alignment per feature site, from the *pretrained* run (features of the same inputs before and after
  fine-tuning): the final unbiased MMD² with its permutation p-value, linear CKA, and the MMD² trajectory.

Correlations: for every feature site and every target (relative gain, convergence speed-up, pretrained steps to
95 %), Pearson and Spearman (average ranks for ties) over the rows that have both numbers, with the sample size n,
scipy's p-value, and a percentile bootstrap confidence interval: rows are resampled with replacement; a resample in
which either variable is constant has no correlation and is skipped and counted.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from scipy import stats

SUMMARY_FILE = "summary.json"
CI_LEVEL = 0.95
MIN_N_FOR_CORRELATION = 3  # with two points any correlation is +-1
METHODS = ("pearson", "spearman")
# Targets of the alignment correlations: row attribute -> (label, the sign the paper's claim predicts).
# Lower MMD² (better alignment) should go with a larger gain, a larger speed-up and fewer steps.
TARGETS = {
    "relative_gain": ("relative gain", "-"),
    "convergence_speedup": ("convergence speed-up (scratch / pretrained steps to 95 %)", "-"),
    "pretrained_steps_to_95": ("pretrained steps to 95 % of best", "+"),
}
_SITE_ORDER = ("pooled", "stage1", "stage2", "stage3", "stage4", "cls", "mean_patch")


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """One cell of the study matrix and what happened to it in this invocation."""

    backbone: str
    task: str  # the study's task key, i.e. the config file name ("seg")
    init: str  # "pretrained" | "scratch"
    workdir: str
    status: str  # "trained" (this invocation), "reused" (finished before), "skipped"
    reason: str = ""  # why it was skipped

    @property
    def name(self) -> str:
        return run_name(self.backbone, self.task, self.init)

    def load_summary(self) -> Optional[dict[str, Any]]:
        return None if self.status == "skipped" else read_summary(self.workdir)


def run_name(backbone: str, task: str, init: str) -> str:
    return f"{backbone}-{task}-{init}"


def read_summary(workdir: str) -> Optional[dict[str, Any]]:
    """The run's summary.json, or None when it is absent or unreadable (an interrupted write)."""
    path = os.path.join(workdir, SUMMARY_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return summary if isinstance(summary, dict) else None


@dataclasses.dataclass(frozen=True)
class SiteAlignment:
    mmd2: Optional[float]
    p_value: Optional[float]
    cka: Optional[float]
    trajectory: tuple[tuple[int, float], ...]


@dataclasses.dataclass
class Row:
    backbone: str
    task: str
    task_name: Optional[str]  # the task class name from the summary ("segmentation")
    primary_metric: Optional[str]
    direction: Optional[str]
    pretrained_init: Optional[str]  # as the pretrained run reports it, e.g. "pretrained-random-standin"
    pretrained_best: Optional[float]
    scratch_best: Optional[float]
    absolute_gain: Optional[float]
    relative_gain: Optional[float]
    pretrained_steps_to_95: Optional[int]
    scratch_steps_to_95: Optional[int]
    convergence_speedup: Optional[float]
    pretrained_steps: Optional[int]
    scratch_steps: Optional[int]
    alignment: dict[str, SiteAlignment]  # from the pretrained run
    scratch_alignment: dict[str, SiteAlignment]  # drift from the random init, for the trajectory plots
    notes: list[str]
    pretrained_test: Optional[float] = None
    scratch_test: Optional[float] = None

    @property
    def label(self) -> str:
        return f"{self.backbone}/{self.task}"

    def mmd2(self, site: str) -> Optional[float]:
        entry = self.alignment.get(site)
        return entry.mmd2 if entry else None


@dataclasses.dataclass(frozen=True)
class Correlation:
    site: str
    target: str
    method: str  # "pearson" | "spearman"
    n: int
    coefficient: Optional[float]
    p_value: Optional[float]
    ci_low: Optional[float]
    ci_high: Optional[float]
    resamples: int  # bootstrap resamples drawn
    degenerate_resamples: int  # of which skipped: a variable was constant in the resample
    note: str = ""


@dataclasses.dataclass
class StudyAnalysis:
    runs: list[RunRecord]
    rows: list[Row]
    sites: list[str]
    correlations: list[Correlation]
    bootstrap: int
    seed: int

    @property
    def skipped(self) -> list[RunRecord]:
        return [r for r in self.runs if r.status == "skipped"]


# ---------------------------------------------------------------------------------------------------------------
# Rows


def _finite(value: Any) -> Optional[float]:
    """A float, or None for missing / non-numeric / NaN / inf (JSON has no NaN, json.dump writes it anyway)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _int_or_none(value: Any) -> Optional[int]:
    number = _finite(value)
    return None if number is None else int(number)


def gains(pretrained: Optional[float], scratch: Optional[float], direction: str
          ) -> tuple[Optional[float], Optional[float]]:
    """(absolute, relative) gain of pretrained over scratch, signed so that positive = pretraining is better."""
    if pretrained is None or scratch is None:
        return None, None
    if direction not in ("max", "min"):
        raise ValueError(f"metric direction must be 'max' or 'min', got {direction!r}")
    absolute = pretrained - scratch if direction == "max" else scratch - pretrained
    relative = absolute / abs(scratch) if scratch != 0 else None
    return absolute, relative


def speedup(pretrained_steps: Optional[int], scratch_steps: Optional[int]) -> Optional[float]:
    if not pretrained_steps or not scratch_steps or pretrained_steps <= 0 or scratch_steps <= 0:
        return None
    return scratch_steps / pretrained_steps


def parse_alignment(summary: Optional[dict]) -> dict[str, SiteAlignment]:
    """The summary's `alignment` block; sites with malformed entries are dropped, missing numbers become None."""
    block = (summary or {}).get("alignment")
    if not isinstance(block, dict):
        return {}
    sites = {}
    for site, entry in block.items():
        if not isinstance(entry, dict):
            continue
        trajectory = []
        for point in entry.get("trajectory") or ():
            if isinstance(point, (list, tuple)) and len(point) == 2:
                step, value = _int_or_none(point[0]), _finite(point[1])
                if step is not None and value is not None:
                    trajectory.append((step, value))
        sites[str(site)] = SiteAlignment(mmd2=_finite(entry.get("mmd2_unbiased")),
                                         p_value=_finite(entry.get("p_value")),
                                         cka=_finite(entry.get("cka_linear")),
                                         trajectory=tuple(sorted(trajectory)))
    return sites


def _reported_init(summary: Optional[dict]) -> Optional[str]:
    if not summary:
        return None
    if summary.get("init"):
        return str(summary["init"])
    mode = ((summary.get("config") or {}).get("init") or {}).get("mode")
    return f"{mode} (from config)" if mode else None


def build_row(backbone: str, task: str, pretrained: Optional[dict], scratch: Optional[dict]) -> Row:
    notes = []
    reference = pretrained or scratch or {}
    metric, direction = reference.get("primary_metric"), reference.get("direction")
    if pretrained and scratch:
        for key in ("primary_metric", "direction"):
            if pretrained.get(key) != scratch.get(key):
                notes.append(f"{key} differs: pretrained {pretrained.get(key)!r}, scratch {scratch.get(key)!r}; "
                             "no gain computed")
    comparable = not notes and direction in ("max", "min")
    if direction not in ("max", "min"):
        notes.append(f"unknown metric direction {direction!r}; no gain computed")
    if pretrained is None:
        notes.append("no pretrained run")
    if scratch is None:
        notes.append("no scratch run")

    pretrained_best = _finite((pretrained or {}).get("best"))
    scratch_best = _finite((scratch or {}).get("best"))
    absolute, relative = gains(pretrained_best, scratch_best, direction) if comparable else (None, None)
    if comparable and absolute is not None and relative is None:
        notes.append("scratch best is 0: relative gain undefined")
    pretrained_steps = _int_or_none((pretrained or {}).get("steps_to_95pct_best"))
    scratch_steps = _int_or_none((scratch or {}).get("steps_to_95pct_best"))
    init = _reported_init(pretrained)
    if init and "standin" in init:
        notes.append("pretrained run used a random stand-in, not real pretrained weights")
    alignment = parse_alignment(pretrained)
    if pretrained is not None and not alignment:
        notes.append("no alignment in the pretrained summary")
    return Row(
        backbone=backbone, task=task, task_name=reference.get("task"), primary_metric=metric, direction=direction,
        pretrained_init=init, pretrained_best=pretrained_best, scratch_best=scratch_best,
        absolute_gain=absolute, relative_gain=relative,
        pretrained_steps_to_95=pretrained_steps, scratch_steps_to_95=scratch_steps,
        convergence_speedup=speedup(pretrained_steps, scratch_steps),
        pretrained_steps=_int_or_none((pretrained or {}).get("steps")),
        scratch_steps=_int_or_none((scratch or {}).get("steps")),
        alignment=alignment, scratch_alignment=parse_alignment(scratch), notes=notes,
        pretrained_test=_test_value(pretrained, metric), scratch_test=_test_value(scratch, metric),
    )


def _test_value(summary: Optional[dict], metric: Optional[str]) -> Optional[float]:
    """The primary metric on the test split (summaries written before the test split was scored have none)."""
    return _finite(((summary or {}).get("test") or {}).get(metric)) if metric else None


def build_rows(runs: Sequence[RunRecord]) -> list[Row]:
    """One row per (backbone, task) with at least one summary, in the order the runs were planned."""
    summaries: dict[tuple[str, str, str], dict] = {}
    order: list[tuple[str, str]] = []
    for run in runs:
        summary = run.load_summary()
        if summary is None:
            continue
        summaries[(run.backbone, run.task, run.init)] = summary
        if (run.backbone, run.task) not in order:
            order.append((run.backbone, run.task))
    return [build_row(backbone, task, summaries.get((backbone, task, "pretrained")),
                      summaries.get((backbone, task, "scratch"))) for backbone, task in order]


def site_names(rows: Iterable[Row]) -> list[str]:
    """Feature sites seen in any row: the known ones in network order, then the rest alphabetically."""
    seen = {site for row in rows for site in (*row.alignment, *row.scratch_alignment)}

    def key(site: str):
        return (_SITE_ORDER.index(site), "") if site in _SITE_ORDER else (len(_SITE_ORDER), site)

    return sorted(seen, key=key)


# ---------------------------------------------------------------------------------------------------------------
# Correlations


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pearson r of each row pair of (B, n) arrays; `defined` is False where a row is constant."""
    defined = (np.ptp(x, axis=-1) > 0) & (np.ptp(y, axis=-1) > 0)
    xc = x - x.mean(axis=-1, keepdims=True)
    yc = y - y.mean(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.sum(xc * yc, axis=-1) / np.sqrt(np.sum(xc * xc, axis=-1) * np.sum(yc * yc, axis=-1))
    return np.clip(np.where(defined, r, np.nan), -1.0, 1.0), defined


def correlation_coefficient(x: Sequence[float], y: Sequence[float], method: str) -> Optional[float]:
    """Pearson r, or Spearman rho (= Pearson r of the average ranks); None when a variable is constant."""
    x2, y2 = np.asarray(x, float)[None], np.asarray(y, float)[None]
    if method == "spearman":
        x2, y2 = stats.rankdata(x2, axis=-1), stats.rankdata(y2, axis=-1)
    elif method != "pearson":
        raise ValueError(f"correlation method must be one of {METHODS}, got {method!r}")
    r, defined = _pearson_rows(x2, y2)
    return float(r[0]) if defined[0] else None


def bootstrap_interval(x: Sequence[float], y: Sequence[float], method: str, resamples: int, seed: int,
                       level: float = CI_LEVEL) -> tuple[Optional[float], Optional[float], int]:
    """Percentile bootstrap interval of the correlation: (low, high, number of degenerate resamples skipped).

    The same seed draws the same resampled index sets, so the interval is reproducible and Pearson and Spearman
    are computed on identical resamples.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    if resamples <= 0 or len(x) < MIN_N_FOR_CORRELATION:
        return None, None, 0
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(x), size=(resamples, len(x)))
    xs, ys = x[index], y[index]
    if method == "spearman":
        xs, ys = stats.rankdata(xs, axis=-1), stats.rankdata(ys, axis=-1)
    r, defined = _pearson_rows(xs, ys)
    degenerate = int(resamples - defined.sum())
    if not defined.any():
        return None, None, degenerate
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(r[defined], [tail, 100.0 - tail])
    return float(low), float(high), degenerate


def _scipy_p_value(x, y, method: str) -> Optional[float]:
    test = stats.pearsonr if method == "pearson" else stats.spearmanr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: reported as an undefined coefficient instead
        p = test(np.asarray(x, float), np.asarray(y, float)).pvalue
    return _finite(p)


def correlate(x: Sequence[float], y: Sequence[float], *, site: str, target: str, method: str,
              resamples: int, seed: int) -> Correlation:
    n = len(x)
    if n < MIN_N_FOR_CORRELATION:
        return Correlation(site, target, method, n, None, None, None, None, 0, 0,
                           note=f"n < {MIN_N_FOR_CORRELATION}")
    coefficient = correlation_coefficient(x, y, method)
    if coefficient is None:
        return Correlation(site, target, method, n, None, None, None, None, 0, 0, note="constant input")
    low, high, degenerate = bootstrap_interval(x, y, method, resamples, seed)
    note = "" if resamples > 0 else "no bootstrap (study.bootstrap = 0)"
    return Correlation(site, target, method, n, coefficient, _scipy_p_value(x, y, method), low, high,
                       resamples, degenerate, note=note)


def alignment_correlations(rows: Sequence[Row], sites: Sequence[str], resamples: int, seed: int
                           ) -> list[Correlation]:
    results = []
    for site in sites:
        for target in TARGETS:
            pairs = [(row.mmd2(site), getattr(row, target)) for row in rows]
            pairs = [(m, t) for m, t in pairs if m is not None and t is not None]
            x, y = [float(m) for m, _ in pairs], [float(t) for _, t in pairs]
            for method in METHODS:
                results.append(correlate(x, y, site=site, target=target, method=method, resamples=resamples,
                                         seed=seed))
    return results


def analyze(runs: Sequence[RunRecord], *, bootstrap: int = 2000, seed: int = 0) -> StudyAnalysis:
    rows = build_rows(runs)
    sites = site_names(rows)
    return StudyAnalysis(runs=list(runs), rows=rows, sites=sites,
                         correlations=alignment_correlations(rows, sites, bootstrap, seed),
                         bootstrap=bootstrap, seed=seed)


def discover_runs(runs_dir: str) -> list[RunRecord]:
    """Runs found on disk as `<backbone>-<task>-<init>` folders (for re-analysing a study without its config)."""
    pattern = re.compile(r"^(?P<backbone>[^-]+)-(?P<task>[^-]+)-(?P<init>pretrained|scratch)$")
    found = []
    for entry in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else ():
        match = pattern.match(entry)
        workdir = os.path.join(runs_dir, entry)
        if match and os.path.isfile(os.path.join(workdir, SUMMARY_FILE)):
            found.append(RunRecord(match["backbone"], match["task"], match["init"], workdir, status="reused"))
    return found
