"""From run summaries to the study's numbers: one row per (backbone, task) and the alignment correlations.

Pure numpy/scipy on the `summary.json` files the trainer writes; no JAX, so a finished study can be re-analysed
anywhere.

A row aggregates the seeds of a backbone x task cell (`study.seeds`: seed s of the pretrained run is paired with
seed s of the scratch run, they share data order, augmentation and head initialisation):

* `pretrained`, `scratch`, `probe`: the best validation value of the task's primary metric per seed (the best
  checkpoint, measured at the end of the run as the summary reports it), as an `Estimate` (mean over seeds and a
  two-sided Student-t interval; no interval with one seed); `pretrained_test`, `scratch_test`: the same
  checkpoints on the test split (measured once), when the manifest has one.
* absolute gain per seed = pretrained - scratch for metrics to maximise, scratch - pretrained for metrics to
  minimise, so a positive gain always means pretraining helped; relative gain = absolute / |scratch| (the paper's
  "relative performance gain", as a fraction). Their estimates are over the per-seed differences, i.e. the paired
  interval of pretrained seed s against scratch seed s.
* steps to 95 %: the first evaluated step at which a run has made 95 % of its own improvement over its step-0
  evaluation (`steps_to_fraction_of_gain`; the trainer's `steps_to_95pct_gain`). Measured on the improvement, not
  as 95 % of the best value, so that it means the same on every metric: 95 % of a PSNR in dB, or of an AUROC that
  starts at 0.5, is reached at step 0 by any run; convergence speed-up per seed = scratch / pretrained steps, > 1
  when the pretrained run converges faster.
* did not learn: a run that never improved on its step-0 evaluation (`best_step == 0`, or no later evaluation
  better than step 0's) has no gain and no convergence step to speak of. A seed pair in which neither run learned
  is left out of the gains and the correlations (a 0 % gain there measures nothing); steps to 95 % of a run that
  did not learn are left out as well.
* alignment per feature site, from the *pretrained* fine-tuning runs (features of the same inputs before and after
  fine-tuning): MMD² and linear CKA per seed; p-value and trajectory of the first seed.
* probe gap per seed = (fine-tuned pretrained - linear probe) / |fine-tuned pretrained|, signed like the gain: the
  share of the fine-tuned performance the frozen pretrained features miss. MMD² of a frozen backbone is 0 by
  construction, so this gap is the other measure of how far the task needed to move the features.

Correlations of MMD² with each target (relative gain, convergence speed-up, pretrained steps to 95 %), Pearson and
Spearman, at two levels:

* `points`: one point per backbone x task (means over seeds), n = the points with both numbers;
* `replicates`: seeds as replicates, every (point, seed) pair, resampled and permuted by point (a cluster
  bootstrap), with as many seeds per point as the point with fewest has (only when the study has several seeds).

The p-value is a permutation test (`scipy.stats.permutation_test`: the pairing of the x values of points with the y
values of points is permuted), exact over all k! pairings when k <= 8 points, else `permutations` random ones. The
interval is a BCa bootstrap (`scipy.stats.bootstrap`) over points. A resample (or leave-one-out sample) in which a
variable is constant has no correlation and counts as 0, which widens the interval towards 0 rather than dropping
the resample.
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

from transfer_jax.train.convergence import steps_to_fraction_of_gain

SUMMARY_FILE = "summary.json"
CI_LEVEL = 0.95
MIN_N_FOR_CORRELATION = 3  # with two points any correlation is +-1
ROUND_DECIMALS = 12  # of a resampled correlation coefficient (see correlation_statistic)
EXACT_MAX_POINTS = 8  # up to 8! = 40320 pairings: the permutation test enumerates them all
METHODS = ("pearson", "spearman")
LEVELS = ("points", "replicates")
ARMS = ("finetune", "probe")
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
    seed: int = 0  # replicate index (added to the task config's seed)
    arm: str = "finetune"  # "finetune" | "probe" (frozen backbone)

    @property
    def name(self) -> str:
        return run_name(self.backbone, self.task, self.init, self.seed, self.arm)

    def load_summary(self) -> Optional[dict[str, Any]]:
        return None if self.status == "skipped" else read_summary(self.workdir)


def run_name(backbone: str, task: str, init: str, seed: int = 0, arm: str = "finetune") -> str:
    """`<backbone>-<task>-<init>[-probe][-seed<s>]`: seed 0 of the fine-tuning arm keeps the plain name, so a
    study that adds seeds or arms reuses its finished runs."""
    return f"{backbone}-{task}-{init}" + ("" if arm == "finetune" else f"-{arm}") + (f"-seed{seed}" if seed else "")


def read_summary(workdir: str) -> Optional[dict[str, Any]]:
    """The run's summary.json, or None when it is absent or unreadable (an interrupted write)."""
    path = os.path.join(workdir, SUMMARY_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return summary if isinstance(summary, dict) else None


# ---------------------------------------------------------------------------------------------------------------
# Estimates over seeds


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Values over seeds, their mean and a two-sided Student-t interval of the mean (None with one value)."""

    values: tuple[float, ...]
    mean: float
    low: Optional[float]
    high: Optional[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def contains_zero(self) -> Optional[bool]:
        """Whether the interval contains 0 (None without an interval): such a gain is not distinguishable from 0."""
        return None if self.low is None else self.low <= 0.0 <= self.high


def estimate(values: Iterable[Optional[float]], level: float = CI_LEVEL) -> Optional[Estimate]:
    """Mean and t-interval of the finite values; for per-seed differences this is the paired interval
    (`scipy.stats.ttest_rel(a, b).confidence_interval()` of a - b)."""
    kept = tuple(float(v) for v in values if v is not None and math.isfinite(v))
    if not kept:
        return None
    mean = float(np.mean(kept))
    if len(kept) == 1:
        return Estimate(kept, mean, None, None)
    if np.ptp(kept) == 0:
        return Estimate(kept, mean, mean, mean)
    interval = stats.ttest_1samp(kept, 0.0).confidence_interval(level)
    return Estimate(kept, mean, float(interval.low), float(interval.high))


def _mean(value: Optional[Estimate]) -> Optional[float]:
    return None if value is None else value.mean


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


@dataclasses.dataclass(frozen=True)
class SiteAlignment:
    mmd2: Optional[float]
    p_value: Optional[float]
    cka: Optional[float]
    trajectory: tuple[tuple[int, float], ...]


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


@dataclasses.dataclass(frozen=True)
class RunOutcome:
    """What one run's summary says, as the row needs it."""

    seed: int
    best: Optional[float]
    best_step: Optional[int]
    steps_to_95: Optional[int]
    steps: Optional[int]
    alignment: dict[str, SiteAlignment]
    test: Optional[float] = None  # the best checkpoint's primary metric on the test split, measured once

    @property
    def learned(self) -> bool:
        """False when training never improved on the step-0 evaluation: the best value is the step-0 one, or no
        later evaluation beat it (the best checkpoint is chosen among the steps after 0, so a run that only got
        worse still reports a best step)."""
        return self.best_step != 0 and self.steps_to_95 is not None

    @property
    def convergence_step(self) -> Optional[int]:
        return self.steps_to_95 if self.learned else None


def _steps_to_95(summary: dict) -> Optional[int]:
    """The trainer's convergence step; for summaries written before it was recorded, the same from the history."""
    if "steps_to_95pct_gain" in summary:
        return _int_or_none(summary["steps_to_95pct_gain"])
    if summary.get("history") and summary.get("primary_metric"):
        return steps_to_fraction_of_gain(summary["history"], summary["primary_metric"],
                                         summary.get("direction", "max"))
    return None


def run_outcome(seed: int, summary: dict) -> RunOutcome:
    return RunOutcome(seed=seed, best=_finite(summary.get("best")), best_step=_int_or_none(summary.get("best_step")),
                      steps_to_95=_steps_to_95(summary),
                      steps=_int_or_none(summary.get("steps")), alignment=parse_alignment(summary),
                      test=_test_value(summary))


def _test_value(summary: dict) -> Optional[float]:
    """The primary metric on the test split (summaries written before the test split was scored have none)."""
    metric = summary.get("primary_metric")
    return _finite((summary.get("test") or {}).get(metric)) if metric else None


@dataclasses.dataclass
class Row:
    backbone: str
    task: str
    task_name: Optional[str]  # the task class name from the summary ("segmentation")
    primary_metric: Optional[str]
    direction: Optional[str]
    pretrained_init: Optional[str]  # as the pretrained run reports it, e.g. "pretrained-random-standin"
    pretrained: Optional[Estimate]  # best value over seeds
    scratch: Optional[Estimate]
    probe: Optional[Estimate]  # frozen pretrained backbone (the probe arm)
    pretrained_test: Optional[Estimate]  # the best checkpoints on the test split, over seeds (None: no test split)
    scratch_test: Optional[Estimate]
    gain: Optional[Estimate]  # relative gain over the seed pairs that learned
    absolute: Optional[Estimate]
    speedup: Optional[Estimate]
    probe_gap: Optional[Estimate]
    steps_to_95: dict[str, tuple[Optional[int], ...]]  # init -> per seed (None: did not learn / not reached)
    pretrained_steps: Optional[int]  # fewest steps any seed's run completed
    scratch_steps: Optional[int]
    alignment: dict[str, SiteAlignment]  # first seed's pretrained run (p-value, trajectory)
    scratch_alignment: dict[str, SiteAlignment]  # drift from the random init, for the trajectory plots
    mmd2_by_site: dict[str, Estimate]  # over the pretrained runs' seeds
    cka_by_site: dict[str, Estimate]
    # seed -> {"<init>_best", "<init>_steps_to_95", "relative_gain", "convergence_speedup", "probe_gap",
    # "mmd2:<site>", "cka:<site>": value}, missing values left out
    replicates: dict[int, dict[str, float]]
    did_not_learn: bool  # no seed pair in which either run improved on its step-0 value
    notes: list[str]

    @property
    def label(self) -> str:
        return f"{self.backbone}/{self.task}"

    @property
    def seeds(self) -> int:
        return max((e.n for e in (self.pretrained, self.scratch) if e is not None), default=0)

    # Means over seeds, under the names the correlations and the CSV use.
    pretrained_best = property(lambda self: _mean(self.pretrained))
    scratch_best = property(lambda self: _mean(self.scratch))
    relative_gain = property(lambda self: _mean(self.gain))
    absolute_gain = property(lambda self: _mean(self.absolute))
    convergence_speedup = property(lambda self: _mean(self.speedup))
    probe_best = property(lambda self: _mean(self.probe))

    @property
    def pretrained_steps_to_95(self) -> Optional[float]:
        return _mean(estimate(self.steps_to_95.get("pretrained", ())))

    @property
    def scratch_steps_to_95(self) -> Optional[float]:
        return _mean(estimate(self.steps_to_95.get("scratch", ())))

    def target(self, name: str) -> Optional[Estimate]:
        """The estimate behind a correlation target."""
        if name == "pretrained_steps_to_95":
            return estimate(self.steps_to_95.get("pretrained", ()))
        return {"relative_gain": self.gain, "convergence_speedup": self.speedup}[name]

    def mmd2(self, site: str) -> Optional[float]:
        return _mean(self.mmd2_by_site.get(site))


def _reported_init(summary: Optional[dict]) -> Optional[str]:
    if not summary:
        return None
    if summary.get("init"):
        return str(summary["init"])
    mode = ((summary.get("config") or {}).get("init") or {}).get("mode")
    return f"{mode} (from config)" if mode else None


def _signed(value: Optional[float], direction: str) -> Optional[float]:
    return None if value is None else (value if direction == "max" else -value)


def build_row(backbone: str, task: str, pretrained: dict[int, dict], scratch: dict[int, dict],
              probe: Optional[dict[int, dict]] = None) -> Row:
    """The row of one backbone x task from its summaries, each {seed: summary}."""
    probe = probe or {}
    notes = []
    first = lambda runs: runs[min(runs)] if runs else None  # noqa: E731
    reference = first(pretrained) or first(scratch) or first(probe) or {}
    metric, direction = reference.get("primary_metric"), reference.get("direction")
    for label, runs in (("pretrained", pretrained), ("scratch", scratch), ("probe", probe)):
        for key in ("primary_metric", "direction"):
            differing = sorted({repr(s.get(key)) for s in runs.values()} - {repr(reference.get(key))})
            if differing:
                notes.append(f"{key} differs: {reference.get(key)!r} vs {label} {', '.join(differing)}; "
                             "no gain computed")
    comparable = not notes and direction in ("max", "min")
    if direction not in ("max", "min"):
        notes.append(f"unknown metric direction {direction!r}; no gain computed")
    if not pretrained:
        notes.append("no pretrained run")
    if not scratch:
        notes.append("no scratch run")

    outcomes = {label: {seed: run_outcome(seed, s) for seed, s in runs.items()}
                for label, runs in (("pretrained", pretrained), ("scratch", scratch), ("probe", probe))}
    pre, scr, prb = outcomes["pretrained"], outcomes["scratch"], outcomes["probe"]
    replicates: dict[int, dict[str, float]] = {}
    absolute, relative, speedups, gaps = [], [], [], []
    pairs = sorted(set(pre) & set(scr))
    silent = [seed for seed in pairs if not pre[seed].learned and not scr[seed].learned]
    for seed in pairs:
        values = replicates.setdefault(seed, {})
        if seed in silent or not comparable:
            continue
        a, r = gains(pre[seed].best, scr[seed].best, direction)
        if comparable and a is not None and r is None:
            notes.append(f"seed {seed}: scratch best is 0, relative gain undefined")
        absolute.append(a)
        relative.append(r)
        speedups.append(speedup(pre[seed].convergence_step, scr[seed].convergence_step))
        values.update(relative_gain=r, convergence_speedup=speedups[-1])
    for label, runs in outcomes.items():
        for seed, outcome in runs.items():
            replicates.setdefault(seed, {}).update({f"{label}_best": outcome.best,
                                                    f"{label}_steps_to_95": outcome.convergence_step})
    for seed, outcome in pre.items():
        values = replicates[seed]
        values.update({f"mmd2:{site}": entry.mmd2 for site, entry in outcome.alignment.items()})
        values.update({f"cka:{site}": entry.cka for site, entry in outcome.alignment.items()})
        if comparable and seed in prb and outcome.best is not None and prb[seed].best is not None and outcome.best:
            gaps.append(_signed(outcome.best - prb[seed].best, direction) / abs(outcome.best))
            values["probe_gap"] = gaps[-1]
    replicates = {seed: {k: v for k, v in values.items() if v is not None} for seed, values in replicates.items()}
    did_not_learn = bool(pairs) and len(silent) == len(pairs)
    if did_not_learn:
        notes.append("did not learn: no run improved on its step-0 value")
    elif silent:
        notes.append(f"did not learn in seed(s) {silent}: left out")
    for label, runs in outcomes.items():
        alone = [seed for seed, o in runs.items() if not o.learned and seed not in silent]
        if alone:
            notes.append(f"{label} run did not learn in seed(s) {alone}")

    init = _reported_init(first(pretrained))
    if init and "standin" in init:
        notes.append("pretrained run used a random stand-in, not real pretrained weights")
    alignment = first(pre).alignment if pre else {}
    if pretrained and not alignment:
        notes.append("no alignment in the pretrained summary")
    sites = {site for o in pre.values() for site in o.alignment}
    return Row(
        backbone=backbone, task=task, task_name=reference.get("task"), primary_metric=metric, direction=direction,
        pretrained_init=init,
        pretrained=estimate(o.best for o in pre.values()), scratch=estimate(o.best for o in scr.values()),
        probe=estimate(o.best for o in prb.values()),
        pretrained_test=estimate(o.test for o in pre.values() if o.test is not None),
        scratch_test=estimate(o.test for o in scr.values() if o.test is not None),
        gain=estimate(relative), absolute=estimate(absolute), speedup=estimate(speedups), probe_gap=estimate(gaps),
        steps_to_95={label: tuple(runs[s].convergence_step for s in sorted(runs)) for label, runs in outcomes.items()
                     if runs},
        pretrained_steps=min((o.steps for o in pre.values() if o.steps is not None), default=None),
        scratch_steps=min((o.steps for o in scr.values() if o.steps is not None), default=None),
        alignment=alignment, scratch_alignment=first(scr).alignment if scr else {},
        mmd2_by_site={site: e for site in sites
                      if (e := estimate(o.alignment[site].mmd2 for o in pre.values() if site in o.alignment))},
        cka_by_site={site: e for site in sites
                     if (e := estimate(o.alignment[site].cka for o in pre.values() if site in o.alignment))},
        replicates=replicates, did_not_learn=did_not_learn, notes=notes,
    )


def build_rows(runs: Sequence[RunRecord]) -> list[Row]:
    """One row per (backbone, task) with at least one summary, in the order the runs were planned."""
    summaries: dict[tuple[str, str, str], dict[int, dict]] = {}
    order: list[tuple[str, str]] = []
    for run in runs:
        summary = run.load_summary()
        if summary is None:
            continue
        label = "probe" if run.arm == "probe" else run.init
        summaries.setdefault((run.backbone, run.task, label), {})[run.seed] = summary
        if (run.backbone, run.task) not in order:
            order.append((run.backbone, run.task))
    return [build_row(backbone, task, *(summaries.get((backbone, task, label), {})
                                        for label in ("pretrained", "scratch", "probe")))
            for backbone, task in order]


def site_names(rows: Iterable[Row]) -> list[str]:
    """Feature sites seen in any row: the known ones in network order, then the rest alphabetically."""
    seen = {site for row in rows for site in (*row.alignment, *row.scratch_alignment, *row.mmd2_by_site)}
    return sorted(seen, key=site_key)


def site_key(site: str) -> tuple[int, str]:
    """Sort key of feature sites: the known ones in network order, then the rest alphabetically."""
    return (_SITE_ORDER.index(site), "") if site in _SITE_ORDER else (len(_SITE_ORDER), site)


# ---------------------------------------------------------------------------------------------------------------
# Correlations


@dataclasses.dataclass(frozen=True)
class Correlation:
    site: str
    target: str
    method: str  # "pearson" | "spearman"
    level: str  # "points" (means over seeds) | "replicates" (every seed, clustered by point)
    n: int  # pairs the coefficient is computed on
    points: int  # clusters that are resampled and permuted (= n at the points level)
    coefficient: Optional[float]
    p_value: Optional[float]
    exact: bool  # the p-value enumerates every pairing of the points
    permutations: int  # pairings the p-value is computed over
    ci_low: Optional[float]
    ci_high: Optional[float]
    resamples: int  # bootstrap resamples drawn
    note: str = ""


@dataclasses.dataclass
class StudyAnalysis:
    runs: list[RunRecord]
    rows: list[Row]
    sites: list[str]
    correlations: list[Correlation]
    bootstrap: int
    seed: int
    permutations: int = 9999

    @property
    def skipped(self) -> list[RunRecord]:
        return [r for r in self.runs if r.status == "skipped"]


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"correlation method must be one of {METHODS}, got {method!r}")


def correlation_statistic(x: np.ndarray, y: np.ndarray, method: str, axis: int = -1) -> np.ndarray:
    """Pearson r or Spearman ρ (Pearson r of average ranks) along `axis`, vectorised over the other axes.

    0 where a variable is constant: the statistic resampling and permutation tests evaluate (see the module
    docstring); `correlation_coefficient` reports such data as undefined instead.
    """
    _check_method(method)
    x, y = np.moveaxis(np.asarray(x, float), axis, -1), np.moveaxis(np.asarray(y, float), axis, -1)
    x, y = np.broadcast_arrays(x, y)
    if method == "spearman":
        x, y = stats.rankdata(x, axis=-1), stats.rankdata(y, axis=-1)
    xc, yc = x - x.mean(axis=-1, keepdims=True), y - y.mean(axis=-1, keepdims=True)
    sxx, syy = np.sum(xc * xc, axis=-1), np.sum(yc * yc, axis=-1)
    defined = (np.ptp(x, axis=-1) > 0) & (np.ptp(y, axis=-1) > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.sum(xc * yc, axis=-1) / np.sqrt(sxx * syy)
    # Rounded so that resamples holding the same points in another order tie exactly with the observed value:
    # BCa counts the resamples below it, and summation order would otherwise decide ties at the last bit.
    return np.where(defined, np.round(np.clip(r, -1.0, 1.0), ROUND_DECIMALS), 0.0)


def correlation_coefficient(x: Sequence[float], y: Sequence[float], method: str) -> Optional[float]:
    """Pearson r, or Spearman ρ; None when a variable is constant."""
    _check_method(method)
    if np.ptp(np.asarray(x, float)) == 0 or np.ptp(np.asarray(y, float)) == 0:
        return None
    return float(correlation_statistic(x, y, method))


def _blocks(x, y) -> tuple[np.ndarray, np.ndarray]:
    """(k, m) float blocks: a 1-D sequence is one value per point (m = 1)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.shape != y.shape or x.ndim not in (1, 2):
        raise ValueError(f"correlation inputs must be two equal-shaped 1-D or (points, seeds) arrays, got "
                         f"{x.shape} and {y.shape}")
    return (x[:, None], y[:, None]) if x.ndim == 1 else (x, y)


def _clustered(x_blocks: np.ndarray, y_blocks: np.ndarray, method: str):
    """Statistic of cluster indices (…, k) -> the correlation of the indexed (k, m) blocks, flattened."""
    def statistic(x_index, y_index, axis=-1):
        xs = x_blocks[np.moveaxis(x_index, axis, -1)]
        ys = y_blocks[np.moveaxis(y_index, axis, -1)]
        return correlation_statistic(xs.reshape(*xs.shape[:-2], -1), ys.reshape(*ys.shape[:-2], -1), method)
    return statistic


def permutation_p_value(x_blocks, y_blocks, method: str, permutations: int, seed: int
                        ) -> tuple[float, bool, int]:
    """Two-sided permutation p-value of the correlation of (k, m) blocks, permuting which point's x block goes
    with which point's y block: (p, exact, pairings). Exact over all k! pairings when k <= EXACT_MAX_POINTS."""
    x_blocks, y_blocks = _blocks(x_blocks, y_blocks)
    k = len(x_blocks)
    index = np.arange(k)
    statistic = _clustered(x_blocks, y_blocks, method)
    exact = k <= EXACT_MAX_POINTS
    resamples = math.factorial(k) if exact else permutations
    result = stats.permutation_test((index,), lambda i, axis=-1: statistic(i, index, axis),
                                    permutation_type="pairings", vectorized=True, n_resamples=resamples,
                                    alternative="two-sided", rng=np.random.default_rng(seed))
    return float(result.pvalue), exact, resamples


def bootstrap_interval(x_blocks, y_blocks, method: str, resamples: int, seed: int, level: float = CI_LEVEL
                       ) -> tuple[Optional[float], Optional[float]]:
    """BCa bootstrap interval of the correlation, resampling whole points (rows of the (k, m) blocks) with
    replacement: with m = 1 the ordinary paired bootstrap, with m seeds a cluster bootstrap."""
    x_blocks, y_blocks = _blocks(x_blocks, y_blocks)
    if resamples <= 0 or len(x_blocks) < MIN_N_FOR_CORRELATION:
        return None, None
    statistic = _clustered(x_blocks, y_blocks, method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate BCa: reported as no interval
        result = stats.bootstrap((np.arange(len(x_blocks)),), lambda i, axis=-1: statistic(i, i, axis),
                                 vectorized=True, n_resamples=resamples, confidence_level=level, method="BCa",
                                 rng=np.random.default_rng(seed))
    low, high = _finite(result.confidence_interval.low), _finite(result.confidence_interval.high)
    return (low, high) if low is not None and high is not None else (None, None)


def correlate(x_blocks, y_blocks, *, site: str, target: str, method: str, level: str = "points",
              resamples: int, permutations: int = 9999, seed: int, note: str = "") -> Correlation:
    """Coefficient, permutation p-value and BCa interval of MMD² (x) against a target (y), both as (k, m) blocks
    (or 1-D sequences: one value per point)."""
    x_blocks, y_blocks = _blocks(x_blocks, y_blocks)
    k, n = len(x_blocks), x_blocks.size
    empty = dict(coefficient=None, p_value=None, exact=False, permutations=0, ci_low=None, ci_high=None,
                 resamples=0)
    if k < MIN_N_FOR_CORRELATION:
        return Correlation(site, target, method, level, n, k, **empty,
                           note="; ".join(filter(None, (note, f"n < {MIN_N_FOR_CORRELATION} points"))))
    coefficient = correlation_coefficient(x_blocks.ravel(), y_blocks.ravel(), method)
    if coefficient is None:
        return Correlation(site, target, method, level, n, k, **empty,
                           note="; ".join(filter(None, (note, "constant input"))))
    p_value, exact, pairings = permutation_p_value(x_blocks, y_blocks, method, permutations, seed)
    low, high = bootstrap_interval(x_blocks, y_blocks, method, resamples, seed)
    if resamples <= 0:
        note = "; ".join(filter(None, (note, "no bootstrap (study.bootstrap = 0)")))
    elif low is None:
        note = "; ".join(filter(None, (note, "BCa interval undefined")))
    return Correlation(site, target, method, level, n, k, coefficient, p_value, exact, pairings, low, high,
                       resamples, note=note)


def _replicate_blocks(rows: Sequence[Row], site: str, target: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(k, m) blocks of (MMD², target) per seed for the points with at least one seed, m = their fewest seeds."""
    blocks = []
    for row in rows:
        pairs = [(values[f"mmd2:{site}"], values[target]) for _, values in sorted(row.replicates.items())
                 if f"mmd2:{site}" in values and target in values]
        if pairs:
            blocks.append(pairs)
    if not blocks:
        return np.zeros((0, 1)), np.zeros((0, 1)), ""
    m = min(map(len, blocks))
    note = f"the first {m} seed(s) of each point (some have more)" if max(map(len, blocks)) > m else ""
    array = np.array([pairs[:m] for pairs in blocks], float)
    return array[..., 0], array[..., 1], note


def alignment_correlations(rows: Sequence[Row], sites: Sequence[str], resamples: int, seed: int,
                           permutations: int = 9999) -> list[Correlation]:
    replicated = any(len(row.replicates) > 1 for row in rows)
    results = []
    for site in sites:
        for target in TARGETS:
            pairs = [(row.mmd2(site), getattr(row, target)) for row in rows]
            pairs = [(m, t) for m, t in pairs if m is not None and t is not None]
            x, y = [float(m) for m, _ in pairs], [float(t) for _, t in pairs]
            blocks = _replicate_blocks(rows, site, target) if replicated else None
            for method in METHODS:
                common = dict(site=site, target=target, method=method, resamples=resamples,
                              permutations=permutations, seed=seed)
                results.append(correlate(x, y, level="points", **common))
                if blocks is not None:
                    results.append(correlate(blocks[0], blocks[1], level="replicates", note=blocks[2], **common))
    return results


def analyze(runs: Sequence[RunRecord], *, bootstrap: int = 2000, seed: int = 0,
            permutations: int = 9999) -> StudyAnalysis:
    rows = build_rows(runs)
    sites = site_names(rows)
    return StudyAnalysis(runs=list(runs), rows=rows, sites=sites,
                         correlations=alignment_correlations(rows, sites, bootstrap, seed, permutations),
                         bootstrap=bootstrap, seed=seed, permutations=permutations)


def discover_runs(runs_dir: str) -> list[RunRecord]:
    """Runs found on disk as `run_name` folders (for re-analysing a study without its config)."""
    pattern = re.compile(r"^(?P<backbone>[^-]+)-(?P<task>[^-]+)-(?P<init>pretrained|scratch)"
                         r"(?:-(?P<arm>probe))?(?:-seed(?P<seed>\d+))?$")
    found = []
    for entry in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else ():
        match = pattern.match(entry)
        workdir = os.path.join(runs_dir, entry)
        if match and os.path.isfile(os.path.join(workdir, SUMMARY_FILE)):
            found.append(RunRecord(match["backbone"], match["task"], match["init"], workdir, status="reused",
                                   seed=int(match["seed"] or 0), arm=match["arm"] or "finetune"))
    return found
