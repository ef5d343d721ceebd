"""The study's positive control: whether MMD², gain and convergence order sources whose alignment is known.

One backbone is fine-tuned on one task from four sources of weights, whose alignment with that task is known by
construction (`SOURCES`, in the expected order):

* aligned: the backbone of a run trained on the task itself (`train.export.export_backbone`), from scratch with
  a seed none of the fine-tuning runs uses;
* related: the backbone's own pretraining objective (`study.pretraining`, the study's pretrained runs);
* unrelated: the same objective regressing noise instead of the images (`configs/pretrain_fcmae.py:noise_target`);
* random: the scratch initialisation, the reference of every gain.

Expected: MMD² (features before vs after fine-tuning) rises along that order, the gain over random falls (random's
is 0 by definition) and the steps to 95 % of the improvement rise. Each is tested as the Spearman correlation of the
sources' means with their expected rank (`analysis.correlate`: exact permutation p-value over the 4! pairings,
BCa interval); the order holds when ρ is +1 (-1 for the gain). Pure numpy/scipy, like `analysis`.
"""
from __future__ import annotations

import csv
import dataclasses
from typing import Optional, Sequence

from transfer_jax.study import analysis as study_analysis
from transfer_jax.study.analysis import Correlation, Estimate, RunRecord, estimate

SOURCES = ("aligned", "related", "unrelated", "random")
REFERENCE = "random"
# measure -> sign of its Spearman correlation with the expected rank (0 aligned ... 3 random) when the order holds.
EXPECTED_SIGN = {"relative_gain": -1, "steps_to_95": +1}  # and +1 for every "mmd2:<site>"


@dataclasses.dataclass(frozen=True)
class SourceResult:
    source: str
    best: Optional[Estimate]  # the fine-tuned run's best validation value, over seeds
    gain: Optional[Estimate]  # relative gain over the random source, paired by seed
    steps_to_95: Optional[Estimate]  # of runs that learned
    mmd2_by_site: dict[str, Estimate]


@dataclasses.dataclass(frozen=True)
class OrderCheck:
    measure: str  # "mmd2:<site>", "relative_gain" or "steps_to_95"
    expected_sign: int
    correlation: Correlation  # Spearman of the measure with the expected rank

    @property
    def holds(self) -> Optional[bool]:
        """Whether the sources fall exactly in the expected order (None: too few sources with the measure)."""
        rho = self.correlation.coefficient
        return None if rho is None else rho == float(self.expected_sign)


@dataclasses.dataclass
class ControlAnalysis:
    backbone: str
    task: str
    primary_metric: Optional[str]
    sources: list[SourceResult]
    checks: list[OrderCheck]


def control_run_name(backbone: str, task: str, source: str, seed: int = 0) -> str:
    return f"{backbone}-{task}-control-{source}" + (f"-seed{seed}" if seed else "")


def _outcomes(records: Sequence[RunRecord]) -> tuple[dict[str, dict[int, study_analysis.RunOutcome]], dict]:
    """source -> seed -> outcome of the records with a summary, and one summary (for the metric's direction)."""
    outcomes: dict[str, dict[int, study_analysis.RunOutcome]] = {}
    reference: dict = {}
    for record in records:
        summary = record.load_summary()
        if summary is None:
            continue
        if record.init not in SOURCES:
            raise ValueError(f"control run {record.name}: source {record.init!r} is not one of {SOURCES}")
        outcomes.setdefault(record.init, {})[record.seed] = study_analysis.run_outcome(record.seed, summary)
        reference = reference or summary
    return outcomes, reference


def _source_result(source: str, runs: dict[int, study_analysis.RunOutcome],
                   random: dict[int, study_analysis.RunOutcome], direction: str) -> SourceResult:
    gains = [study_analysis.gains(o.best, random[s].best, direction)[1] for s, o in runs.items() if s in random]
    sites = {site for o in runs.values() for site in o.alignment}
    return SourceResult(
        source=source, best=estimate(o.best for o in runs.values()), gain=estimate(gains),
        steps_to_95=estimate(o.convergence_step for o in runs.values()),
        mmd2_by_site={site: e for site in sorted(sites)
                      if (e := estimate(o.alignment[site].mmd2 for o in runs.values() if site in o.alignment))})


def _value(result: SourceResult, measure: str) -> Optional[float]:
    if measure.startswith("mmd2:"):
        value = result.mmd2_by_site.get(measure[len("mmd2:"):])
    else:
        value = {"relative_gain": result.gain, "steps_to_95": result.steps_to_95}[measure]
    return None if value is None else value.mean


def order_check(results: Sequence[SourceResult], measure: str, *, bootstrap: int, permutations: int,
                seed: int) -> OrderCheck:
    """Spearman of the sources' `measure` with their expected rank (position in SOURCES)."""
    sign = 1 if measure.startswith("mmd2:") else EXPECTED_SIGN[measure]
    pairs = [(SOURCES.index(r.source), v) for r in results if (v := _value(r, measure)) is not None]
    correlation = study_analysis.correlate([float(p[0]) for p in pairs], [p[1] for p in pairs], site=measure,
                                           target="expected rank", method="spearman", resamples=bootstrap,
                                           permutations=permutations, seed=seed)
    return OrderCheck(measure, sign, correlation)


def analyze_control(records: Sequence[RunRecord], *, bootstrap: int = 2000, permutations: int = 9999,
                    seed: int = 0) -> Optional[ControlAnalysis]:
    """The control's table and order checks from its fine-tuning runs (RunRecord.init = the source); None when
    no run has a summary."""
    outcomes, reference = _outcomes(records)
    if not outcomes:
        return None
    direction = reference.get("direction") or "max"
    random = outcomes.get(REFERENCE, {})
    results = [_source_result(source, outcomes[source], random, direction) for source in SOURCES
               if source in outcomes]
    sites = sorted({site for r in results for site in r.mmd2_by_site}, key=study_analysis.site_key)
    measures = [f"mmd2:{site}" for site in sites] + ["relative_gain", "steps_to_95"]
    checks = [order_check(results, m, bootstrap=bootstrap, permutations=permutations, seed=seed) for m in measures]
    first = records[0]
    return ControlAnalysis(first.backbone, first.task, reference.get("primary_metric"), results, checks)


# ---------------------------------------------------------------------------------------------------------------
# Report


def _cell(value: Optional[Estimate], signed: bool = False) -> str:
    if value is None:
        return "n/a"
    number = (lambda v: f"{v:+.4g}") if signed else (lambda v: f"{v:.4g}")
    interval = "" if value.low is None else f" [{number(value.low)}, {number(value.high)}]"
    return number(value.mean) + interval


def sites(control: ControlAnalysis) -> list[str]:
    return [c.measure[len("mmd2:"):] for c in control.checks if c.measure.startswith("mmd2:")]


def source_table(control: ControlAnalysis) -> tuple[list[str], list[list[str]]]:
    header = ["source", f"best {control.primary_metric or ''}".strip(), "relative gain vs random", "steps to 95 %",
              *(f"MMD² {site}" for site in sites(control))]
    rows = [[r.source, _cell(r.best), _cell(r.gain, signed=True), _cell(r.steps_to_95),
             *(_cell(r.mmd2_by_site.get(site)) for site in sites(control))] for r in control.sources]
    return header, rows


def order_table(control: ControlAnalysis) -> tuple[list[str], list[list[str]]]:
    header = ["measure", "expected", "Spearman ρ with expected rank", "p (permutation)", "n", "order holds", "note"]
    rows = []
    for check in control.checks:
        c = check.correlation
        rows.append([check.measure, "rises" if check.expected_sign > 0 else "falls",
                     "n/a" if c.coefficient is None else f"{c.coefficient:+.3f}",
                     "n/a" if c.p_value is None else f"{c.p_value:.3g}" + (" (exact)" if c.exact else ""),
                     str(c.n), {True: "yes", False: "no", None: "n/a"}[check.holds], c.note])
    return header, rows


def summary_line(control: ControlAnalysis) -> str:
    verdicts = {c.measure: c.holds for c in control.checks}
    held = [m for m, v in verdicts.items() if v]
    return (f"{control.backbone} fine-tuned on {control.task} from {len(control.sources)} sources of known "
            f"alignment ({' < '.join(SOURCES)}): the expected order holds for {len(held)} of {len(verdicts)} "
            f"measures ({', '.join(held) or 'none'}). MMD² should rise and the gain over random fall along that "
            "order; with all 4 sources the smallest exact two-sided p-value is 2/24 = 0.083.")


def sections(control: Optional[ControlAnalysis]):
    """(title, kind, payload) blocks for `report.write_report`."""
    if control is None:
        return []
    return [("Positive control (alignment known by construction)", "paragraphs", [summary_line(control)]),
            ("Positive control: per source (mean [95 % interval] over seeds)", "table", source_table(control)),
            ("Positive control: expected order", "table", order_table(control))]


def write_control_csv(path: str, control: ControlAnalysis) -> None:
    header, rows = source_table(control)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
        writer.writerow([])
        header, rows = order_table(control)
        writer.writerow(header)
        writer.writerows(rows)
