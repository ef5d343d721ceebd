"""Writes a study's outputs into its directory.

    results.csv        one row per backbone x task (columns: RESULT_COLUMNS, then mmd2_/mmd2_p_/cka_ per site, notes)
    seeds.csv          one row per backbone x task x seed: bests, gain, steps to 95 %, speed-up, MMD² / CKA per site
    correlations.csv   one row per (site, target, method, level): coefficient, n, permutation p-value, BCa interval
    report.md          tables, correlations with n and intervals, how to read them, links to the plots
    report.html        the same, self-contained (plots embedded as base64 PNG)
    plots/*.png        gain per task; MMD² vs gain and vs convergence speed-up; MMD² over steps per run
    environment.json   python, platform, package versions, devices, git commit
    configs/           the exact config of every run (<backbone>-<task>-<init>.json) and of the study (study.json)

Missing numbers are written as "n/a" everywhere (pandas reads that as NaN).
"""
from __future__ import annotations

import base64
import csv
import datetime
import html
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from transfer_jax.study.analysis import CI_LEVEL, LEVELS, TARGETS, Estimate, Row, RunRecord, StudyAnalysis

NA = "n/a"
PLOTS_DIR = "plots"
CONFIGS_DIR = "configs"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "scipy", "matplotlib",
            "ml-collections", "absl-py")

# (column, description) of results.csv before the per-site columns. `_low` / `_high`: the 95 % interval over seeds
# (Student t of the mean; for gains and speed-ups the paired interval of the per-seed differences), n/a with one seed.
RESULT_COLUMNS = (
    ("backbone", "encoder name"),
    ("task", "task key (configs/<task>.py)"),
    ("task_name", "task class name reported by the trainer"),
    ("primary_metric", "validation metric the gain is measured on"),
    ("direction", "max: higher is better; min: lower is better"),
    ("pretrained_init", "initialisation the pretrained run reports (a random stand-in is no real pretraining)"),
    ("seeds", "seeds with a pretrained or scratch run"),
    ("pretrained_best", "best validation value of the primary metric, pretrained runs, mean over seeds"),
    ("pretrained_low", ""), ("pretrained_high", ""),
    ("scratch_best", "the same for the from-scratch runs"),
    ("scratch_low", ""), ("scratch_high", ""),
    ("pretrained_test", "the pretrained runs' best checkpoints on the test split (primary metric, once), mean"),
    ("scratch_test", "the same for the from-scratch runs"),
    ("absolute_gain", "pretrained - scratch (max) or scratch - pretrained (min), mean over seed pairs: positive = "
                      "pretraining helped"),
    ("relative_gain", "per seed pair absolute gain / |scratch|, mean (0.2 = 20 % better)"),
    ("relative_gain_low", ""), ("relative_gain_high", ""),
    ("did_not_learn", "true when no run of any seed pair improved on its step-0 value (no gain reported)"),
    ("pretrained_steps_to_95", "first evaluated step with 95 % of the run's improvement over step 0, "
                               "pretrained runs, mean"),
    ("scratch_steps_to_95", "the same for the from-scratch runs"),
    ("steps_to_95_per_seed", "pretrained / scratch steps to 95 % per seed (n/a: the run did not learn)"),
    ("convergence_speedup", "scratch / pretrained steps to 95 % per seed pair, mean (> 1: pretrained faster)"),
    ("convergence_speedup_low", ""), ("convergence_speedup_high", ""),
    ("probe_best", "best value of the linear probe (frozen pretrained backbone), mean over seeds"),
    ("probe_gap", "(fine-tuned - probe) / |fine-tuned| per seed, mean: what the frozen features miss"),
    ("probe_gap_low", ""), ("probe_gap_high", ""),
    ("pretrained_steps", "fewest training steps a pretrained run completed"),
    ("scratch_steps", "the same for the from-scratch runs"),
)
SITE_COLUMNS = (
    ("mmd2_{site}", "final unbiased MMD² between the site's features before and after fine-tuning (pretrained "
                    "runs), mean over seeds"),
    ("mmd2_low_{site}", ""), ("mmd2_high_{site}", ""),
    ("mmd2_p_{site}", "permutation p-value of the first seed's MMD² (H0: same feature distribution)"),
    ("cka_{site}", "linear CKA between the same features before and after fine-tuning, mean (1 = same geometry)"),
)


def result_columns(sites) -> list[str]:
    columns = [name for name, _ in RESULT_COLUMNS]
    for site in sites:
        columns += [pattern.format(site=site) for pattern, _ in SITE_COLUMNS]
    return columns + ["notes"]


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return NA
    if isinstance(value, float):
        return NA if not np.isfinite(value) else f"{value:.{digits}g}"
    return str(value)


def _interval_values(name: str, value: Optional[Estimate]) -> dict[str, Any]:
    return {f"{name}_low": None if value is None else value.low, f"{name}_high": None if value is None else value.high}


def _row_values(row: Row, sites) -> dict[str, Any]:
    values = {name: getattr(row, name) for name, _ in RESULT_COLUMNS if hasattr(row, name)}
    for name, value in (("pretrained", row.pretrained), ("scratch", row.scratch), ("relative_gain", row.gain),
                        ("convergence_speedup", row.speedup), ("probe_gap", row.probe_gap)):
        values.update(_interval_values(name, value))
    values["probe_gap"] = row.probe_gap.mean if row.probe_gap else None
    values["pretrained_test"] = _mean_of(row.pretrained_test)
    values["scratch_test"] = _mean_of(row.scratch_test)
    values["steps_to_95_per_seed"] = _steps_cell(row)
    for site in sites:
        entry, spread = row.alignment.get(site), row.mmd2_by_site.get(site)
        values[f"mmd2_{site}"] = row.mmd2(site)
        values[f"mmd2_low_{site}"] = spread.low if spread else None
        values[f"mmd2_high_{site}"] = spread.high if spread else None
        values[f"mmd2_p_{site}"] = entry.p_value if entry else None
        values[f"cka_{site}"] = row.cka_by_site[site].mean if site in row.cka_by_site else None
    values["notes"] = "; ".join(row.notes)
    return values


def write_results_csv(path: str, analysis: StudyAnalysis) -> None:
    columns = result_columns(analysis.sites)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in analysis.rows:
            values = _row_values(row, analysis.sites)
            # Full precision in the CSV (repr of floats); rounding is for the human-facing report only.
            writer.writerow([values[c] if c in ("notes", "steps_to_95_per_seed")
                             else (NA if values[c] is None else values[c]) for c in columns])


SEED_COLUMNS = ("pretrained_best", "scratch_best", "probe_best", "relative_gain", "pretrained_steps_to_95",
                "scratch_steps_to_95", "convergence_speedup", "probe_gap")


def write_seeds_csv(path: str, analysis: StudyAnalysis) -> None:
    """One line per backbone x task x seed: the per-seed numbers behind the means and intervals."""
    site_columns = [f"{name}:{site}" for site in analysis.sites for name in ("mmd2", "cka")]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["backbone", "task", "seed", *SEED_COLUMNS,
                         *(c.replace(":", "_") for c in site_columns)])
        for row in analysis.rows:
            for seed, values in sorted(row.replicates.items()):
                writer.writerow([row.backbone, row.task, seed] + [values.get(c, NA) for c in SEED_COLUMNS]
                                + [values.get(c, NA) for c in site_columns])


CORRELATION_COLUMNS = ("site", "target", "method", "level", "n", "points", "coefficient", "p_value", "exact",
                       "permutations", "ci_low", "ci_high", "ci_level", "bootstrap_resamples", "expected_sign",
                       "note")


def write_correlations_csv(path: str, analysis: StudyAnalysis) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CORRELATION_COLUMNS)
        for c in analysis.correlations:
            writer.writerow([c.site, c.target, c.method, c.level, c.n, c.points,
                             NA if c.coefficient is None else c.coefficient, NA if c.p_value is None else c.p_value,
                             c.exact, c.permutations, NA if c.ci_low is None else c.ci_low,
                             NA if c.ci_high is None else c.ci_high, CI_LEVEL, c.resamples, TARGETS[c.target][1],
                             c.note])


# ---------------------------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _grid(plt, panels: int, width: float = 4.2, height: float = 3.6):
    columns = min(3, panels)
    rows = int(np.ceil(panels / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    for ax in axes.flat[panels:]:
        ax.set_visible(False)
    return figure, list(axes.flat[:panels])


def _backbone_colors(rows) -> dict[str, Any]:
    import matplotlib

    backbones = sorted({row.backbone for row in rows})
    palette = matplotlib.colormaps["tab10"]
    return {b: palette(i % 10) for i, b in enumerate(backbones)}


def plot_gain_by_task(path: str, analysis: StudyAnalysis) -> bool:
    rows = [r for r in analysis.rows if r.relative_gain is not None]
    if not rows:
        return False
    plt = _pyplot()
    tasks = list(dict.fromkeys(r.task for r in analysis.rows))
    backbones = list(dict.fromkeys(r.backbone for r in analysis.rows))
    colors = _backbone_colors(analysis.rows)
    width = 0.8 / len(backbones)
    figure, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(tasks)), 3.8))
    for b_index, backbone in enumerate(backbones):
        offset = (b_index - (len(backbones) - 1) / 2) * width
        points = [(t_index + offset, r.gain) for t_index, task in enumerate(tasks)
                  for r in rows if r.backbone == backbone and r.task == task]
        if points:
            xs, gains = zip(*points)
            heights = [100 * g.mean for g in gains]
            ax.bar(xs, heights, width, color=colors[backbone], label=backbone, yerr=_error_bars(gains, 100.0),
                   capsize=3, ecolor="black")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("relative gain over scratch (%)")
    ax.set_title("Gain of pretraining per task (positive = better than scratch)")
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _error_bars(estimates: Sequence[Optional[Estimate]], scale: float = 1.0) -> np.ndarray:
    """(2, n) distances from the means to the interval ends, 0 where an estimate has no interval."""
    bars = [(0.0, 0.0) if e is None or e.low is None else (scale * (e.mean - e.low), scale * (e.high - e.mean))
            for e in estimates]
    return np.asarray(bars, float).T.reshape(2, len(bars))


def _correlation_text(analysis: StudyAnalysis, site: str, target: str) -> str:
    found = [c for c in analysis.correlations if c.site == site and c.target == target and c.level == "points"]
    if not found:
        return ""
    symbols = {"pearson": "r", "spearman": "ρ"}
    parts = [f"n={found[0].n}"] + [f"{symbols[c.method]}={c.coefficient:+.2f} (p={c.p_value:.3g})" for c in found
                                   if c.coefficient is not None]
    return " (" + ", ".join(parts) + ")"


def plot_scatter(path: str, analysis: StudyAnalysis, target: str) -> bool:
    """MMD² (x) against `target` (y), one panel per feature site, one labelled point per backbone x task with its
    interval over seeds in both directions."""
    sites = [s for s in analysis.sites
             if any(r.mmd2(s) is not None and getattr(r, target) is not None for r in analysis.rows)]
    if not sites:
        return False
    plt = _pyplot()
    colors = _backbone_colors(analysis.rows)
    figure, axes = _grid(plt, len(sites))
    scale = 100.0 if target == "relative_gain" else 1.0
    for ax, site in zip(axes, sites):
        for row in analysis.rows:
            x, y = row.mmd2(site), getattr(row, target)
            if x is None or y is None:
                continue
            ax.errorbar(x, scale * y, xerr=_error_bars([row.mmd2_by_site.get(site)]),
                        yerr=_error_bars([row.target(target)], scale), fmt="o", color=colors[row.backbone],
                        markersize=5, capsize=3, elinewidth=1)
            ax.annotate(row.label, (x, scale * y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if target == "relative_gain":
            ax.axhline(0, color="black", linewidth=0.6)  # a gain whose bar crosses this line is not one
        ax.set_title(f"{site}{_correlation_text(analysis, site, target)}", fontsize=8)
        ax.set_xlabel(f"MMD² ({site}), before vs after fine-tuning")
        ax.set_ylabel(TARGETS[target][0] + (" (%)" if scale != 1 else ""), fontsize=8)
        ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def plot_trajectories(path: str, analysis: StudyAnalysis) -> bool:
    """MMD² over training steps, one panel per site: pretrained runs solid, scratch runs (drift from the random
    init) dashed."""
    def curves(row: Row, site: str):
        for init, block, style in (("pretrained", row.alignment, dict(linestyle="-", marker=".")),
                                   ("scratch", row.scratch_alignment, dict(linestyle="--", marker="x"))):
            entry = block.get(site)
            if entry and entry.trajectory:
                yield init, entry.trajectory, style

    sites = [s for s in analysis.sites if any(True for r in analysis.rows for _ in curves(r, s))]
    if not sites:
        return False
    plt = _pyplot()
    colors = {row.label: color for row, color in zip(
        analysis.rows, (plt.get_cmap("tab10")(i % 10) for i in range(len(analysis.rows))))}
    figure, axes = _grid(plt, len(sites), width=4.8)
    for ax, site in zip(axes, sites):
        for row in analysis.rows:
            for init, trajectory, style in curves(row, site):
                steps, values = zip(*trajectory)
                ax.plot(steps, values, **style, color=colors[row.label], label=f"{row.label} ({init})")
        ax.set_title(site, fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel("MMD² to the initial features")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_plots(plots_dir: str, analysis: StudyAnalysis) -> dict[str, str]:
    """Writes the plots the data supports; returns {plot title: path}."""
    os.makedirs(plots_dir, exist_ok=True)
    plans = [("Relative gain per task (95 % paired interval over seeds)", "gain_by_task.png",
              lambda p: plot_gain_by_task(p, analysis))]
    for target in TARGETS:
        plans.append((f"MMD² vs {TARGETS[target][0]}", f"scatter_mmd2_vs_{target}.png",
                      lambda p, t=target: plot_scatter(p, analysis, t)))
    plans.append(("MMD² over training steps", "mmd2_trajectories.png", lambda p: plot_trajectories(p, analysis)))
    written = {}
    for title, filename, draw in plans:
        path = os.path.join(plots_dir, filename)
        if draw(path):
            written[title] = path
        elif os.path.exists(path):
            os.remove(path)  # a plot left from an earlier invocation would no longer match the data
    return written


# ---------------------------------------------------------------------------------------------------------------
# Environment and configs


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> dict[str, Any]:
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}
    return {"commit": commit, "uncommitted_changes": bool(dirty)}


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(),
        "packages": {p: _version(p) for p in PACKAGES}, "git": _git_commit(),
        "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    jax = sys.modules.get("jax")  # only when the study trained in this process: the report itself needs no JAX
    if jax is not None:
        devices = jax.devices()
        info["devices"] = {"backend": jax.default_backend(), "count": len(devices),
                           "kind": devices[0].device_kind if devices else None,
                           "process_count": jax.process_count()}
    return info


def write_configs(configs_dir: str, run_configs: Mapping[str, Mapping], study_config: Optional[Mapping]) -> None:
    os.makedirs(configs_dir, exist_ok=True)
    for name, config in run_configs.items():
        with open(os.path.join(configs_dir, f"{name}.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, default=str)
    if study_config is not None:
        with open(os.path.join(configs_dir, "study.json"), "w", encoding="utf-8") as f:
            json.dump(study_config, f, indent=2, default=str)


# ---------------------------------------------------------------------------------------------------------------
# Report text (markdown, then HTML from the same blocks)

HOW_TO_READ = [
    "Each row compares a backbone's fine-tuning from pretrained weights with the same run from random weights "
    "(same task config and step budget), repeated over seeds: seed s of the pretrained run shares its head "
    "initialisation, data order and augmentation with seed s of the scratch run. A positive gain means pretraining "
    "helped; for metrics to minimise the sign is flipped so that this holds for every task.",
    "Every number is a mean over seeds with its 95 % interval in brackets (Student t; for the gain and the "
    "speed-up the paired interval of the per-seed differences). With one seed there is no interval. A gain "
    "marked * has an interval that contains 0: it is not distinguishable from no gain.",
    "'did not learn': no run of any seed pair improved on its step-0 value (no later evaluation beat it), so there "
    "is no gain and no convergence step; such rows (and such seed pairs) are left out of the correlations.",
    "Alignment is the MMD² between the features of the same validation inputs before and after fine-tuning the "
    "pretrained encoder (unbiased estimator). Small MMD² = the task needed little change of the pretrained "
    "features = good alignment. The probe gap (frozen pretrained backbone, only the head trained, MMD² = 0 by "
    "construction) is the share of the fine-tuned performance that the unchanged features miss.",
    "The paper's claim predicts negative correlations of MMD² with the gain and with the convergence speed-up, and "
    "a positive one with the pretrained run's steps to 95 % of its improvement.",
    "Correlations: p-values are permutation tests (every pairing of the points enumerated, i.e. exact, for up to "
    "8 points); intervals are BCa bootstrap intervals over points. 'points' uses one point per backbone x task "
    "(means over seeds); 'replicates' uses every seed, resampled and permuted by point (cluster bootstrap). n is "
    "tiny (at most 15 points): read the intervals, and correct for the many (site x target x method) tests before "
    "reading any single p-value.",
    "Rows whose pretrained run reports a random stand-in (no pretrained checkpoint was given) measure nothing "
    "about pretraining; their gains are those of two random initialisations.",
    "Steps to 95 %: the first evaluation at which a run has made 95 % of its improvement over its step-0 value "
    "(on the improvement, so that it means the same for a Dice, an AUROC or a PSNR in dB). They are measured at the "
    "evaluation cadence, so they are multiples of eval_every; rows from tasks with different step budgets are not "
    "directly comparable on that column.",
]


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    escape = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(escape, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(escape, row)) + " |" for row in rows]
    return lines


def _value(value: Optional[Estimate], scale: float = 1.0, digits: int = 4, unit: str = "",
           signed: bool = False) -> str:
    """'mean [low, high]' of an estimate ('mean' alone with one seed)."""
    if value is None:
        return NA
    number = (lambda v: f"{scale * v:+.{digits}g}") if signed else (lambda v: f"{scale * v:.{digits}g}")
    interval = "" if value.low is None else f" [{number(value.low)}, {number(value.high)}]"
    return f"{number(value.mean)}{unit}{interval}"


def _gain_cell(row: Row) -> str:
    if row.did_not_learn:
        return "did not learn"
    if row.gain is None:
        return NA
    return _value(row.gain, 100.0, 3, " %", signed=True) + ("*" if row.gain.contains_zero else "")


def _mean_of(value: Optional[Estimate]) -> Optional[float]:
    return None if value is None else value.mean


def _steps_cell(row: Row) -> str:
    per_seed = lambda init: ", ".join(_fmt(s) for s in row.steps_to_95.get(init, ())) or NA  # noqa: E731
    return f"{per_seed('pretrained')} vs {per_seed('scratch')}"


def _results_table(analysis: StudyAnalysis) -> tuple[list[str], list[list[str]]]:
    """The paper's table: one row per backbone x task."""
    probe = any(row.probe is not None for row in analysis.rows)
    header = (["backbone", "task", "metric", "seeds", "pretrained", "scratch", "relative gain",
               "test (pre / scratch)", "steps to 95 % per seed (pre vs scratch)", "convergence ratio (scratch / pre)"]
              + [f"MMD² {s}" for s in analysis.sites] + (["probe", "probe gap"] if probe else []) + ["notes"])
    body = []
    for row in analysis.rows:
        metric = NA if row.primary_metric is None else f"{row.primary_metric} ({row.direction})"
        cells = [row.backbone, row.task, metric, str(row.seeds), _value(row.pretrained), _value(row.scratch),
                 _gain_cell(row), f"{_value(row.pretrained_test)} / {_value(row.scratch_test)}", _steps_cell(row),
                 _value(row.speedup, digits=3)]
        cells += [_value(row.mmd2_by_site.get(site)) for site in analysis.sites]
        if probe:
            cells += [_value(row.probe), _value(row.probe_gap, 100.0, 3, " %", signed=True)]
        cells.append("; ".join(row.notes))
        body.append(cells)
    return header, body


def _correlation_table(analysis: StudyAnalysis) -> tuple[list[str], list[list[str]]]:
    """One line per (site, target, level): Pearson and Spearman side by side, both on the same points."""
    ci = f"{int(100 * CI_LEVEL)} % BCa CI"
    header = ["site", "target", "level", "n", f"Pearson r [{ci}]", "p", f"Spearman ρ [{ci}]", "p",
              "expected sign"]

    def cell(c) -> str:
        if c.coefficient is None:
            return f"{NA} ({c.note})" if c.note else NA
        interval = "" if c.ci_low is None else f" [{c.ci_low:+.2f}, {c.ci_high:+.2f}]"
        return f"{c.coefficient:+.3f}{interval}" + (f" ({c.note})" if c.note else "")

    def p_cell(c) -> str:
        if c.p_value is None:
            return NA
        return f"{c.p_value:.3g} ({'exact, ' if c.exact else ''}{c.permutations} pairings)"

    by_key = {(c.site, c.target, c.level, c.method): c for c in analysis.correlations}
    levels = [level for level in LEVELS if any(c.level == level for c in analysis.correlations)]
    body = []
    for site in analysis.sites:
        for target in TARGETS:
            for level in levels:
                pearson = by_key[(site, target, level, "pearson")]
                spearman = by_key[(site, target, level, "spearman")]
                n = f"n = {pearson.n}" + (f" ({pearson.points} points)" if level == "replicates" else "")
                body.append([site, TARGETS[target][0], level, n, cell(pearson), p_cell(pearson), cell(spearman),
                             p_cell(spearman), TARGETS[target][1]])
    return header, body


def _runs_table(analysis: StudyAnalysis) -> tuple[list[str], list[list[str]]]:
    header = ["run", "status", "reason / workdir"]
    body = [[run.name, run.status, run.reason or os.path.relpath(run.workdir, os.path.dirname(os.path.dirname(
        run.workdir)))] for run in analysis.runs]
    return header, body


def _pretraining_table(records: Sequence[RunRecord]) -> tuple[list[str], list[list[str]]]:
    header = ["backbone", "objective", "status", "steps", "final validation loss", "wall (s)", "artifact"]
    body = []
    for record in records:
        summary = record.load_summary() or {}
        metric = summary.get("primary_metric")
        final = (summary.get("final") or {}).get(metric) if metric else None
        config = summary.get("config") or {}
        objective = (config.get("task") or {}).get("name", NA)
        variant = (config.get("task") or {}).get("variant")
        body.append([record.backbone, objective + (f" ({variant})" if variant else ""), record.status,
                     _fmt(summary.get("steps")), f"{metric} = {_fmt(final)}" if metric else NA,
                     _fmt(summary.get("wall_seconds"), 3), summary.get("pretrained_artifact") or NA])
    return header, body


def _column_docs(analysis: StudyAnalysis) -> tuple[list[str], list[list[str]]]:
    body = [[name, text or "interval of the column above"] for name, text in RESULT_COLUMNS]
    body += [[pattern.replace("{site}", "<site>"), text or "interval of the column above"]
             for pattern, text in SITE_COLUMNS]
    body.append(["notes", "why a number is missing or should be read with care"])
    sites = ", ".join(analysis.sites) or "none reported"
    return ["column", "meaning"], body + [["(sites)", f"feature sites in this study: {sites}"]]


def _summary_lines(analysis: StudyAnalysis) -> list[str]:
    complete = [r for r in analysis.rows if r.relative_gain is not None]
    silent = [r.label for r in analysis.rows if r.did_not_learn]
    seeds = sorted({r.seeds for r in analysis.rows})
    lines = [f"{len(analysis.runs)} planned runs: "
             + ", ".join(f"{sum(r.status == s for r in analysis.runs)} {s}" for s in ("trained", "reused", "skipped"))
             + f". {len(analysis.rows)} backbone x task rows ({'/'.join(map(str, seeds)) or 0} seed(s) each), "
             f"{len(complete)} with a gain (n = {len(complete)} for the gains)"
             + (f"; did not learn: {', '.join(silent)}." if silent else ".")]
    if any(r.gain.low is not None for r in complete):
        distinct = [r for r in complete if r.gain.contains_zero is False]
        lines.append(f"{len(distinct)} of {len(complete)} gains have a 95 % interval that excludes 0.")
    if not analysis.sites:
        lines.append("Alignment: n/a (no run summary reports an `alignment` block), so no MMD² correlations.")
    else:
        usable = [c for c in analysis.correlations if c.coefficient is not None]
        lines.append(f"Alignment sites: {', '.join(analysis.sites)}; {len(usable)} of {len(analysis.correlations)} "
                     f"correlations defined; BCa bootstrap: {analysis.bootstrap} resamples, seed {analysis.seed}, "
                     f"{int(100 * CI_LEVEL)} % intervals; permutation p-values exact up to 8 points, else "
                     f"{analysis.permutations} random pairings.")
    return lines


def _sections(analysis: StudyAnalysis, pretraining: Sequence[RunRecord] = (), extra: Sequence[tuple] = ()):
    """(title, kind, payload) blocks shared by the markdown and HTML writers; `extra` (e.g. the positive
    control's, `study/control.py`) go after the correlations."""
    yield "Summary", "paragraphs", _summary_lines(analysis)
    yield "How to read this", "bullets", HOW_TO_READ
    if pretraining:
        yield "Pretraining (JAX, initialises the pretrained runs)", "table", _pretraining_table(pretraining)
    yield "Results (one row per backbone x task; mean [95 % interval] over seeds)", "table", _results_table(analysis)
    yield "Correlations of MMD² with gain and convergence", "table", _correlation_table(analysis)
    yield from extra
    yield "Runs", "table", _runs_table(analysis)
    yield "Columns of results.csv", "table", _column_docs(analysis)


def write_markdown(path: str, analysis: StudyAnalysis, plots: Mapping[str, str], environment_info: Mapping,
                   pretraining: Sequence[RunRecord] = (), extra_sections: Sequence[tuple] = ()) -> None:
    lines = ["# Transfer study report", ""]
    for title, kind, payload in _sections(analysis, pretraining, extra_sections):
        lines += [f"## {title}", ""]
        if kind == "paragraphs":
            lines += [p + "\n" for p in payload]
        elif kind == "bullets":
            lines += [f"- {p}" for p in payload] + [""]
        else:
            lines += _md_table(*payload) + [""]
    lines += ["## Plots", ""]
    base = os.path.dirname(path)
    lines += [f"![{title}]({os.path.relpath(p, base)})\n" for title, p in plots.items()] or ["n/a (no data to plot)\n"]
    lines += ["## Environment", "", f"python {environment_info['python']} on {environment_info['platform']}; "
              + ", ".join(f"{k} {v}" for k, v in environment_info["packages"].items())
              + f"; git {environment_info['git'].get('commit') or NA}. Per-run configs: `configs/`.", ""]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def write_html(path: str, analysis: StudyAnalysis, plots: Mapping[str, str], environment_info: Mapping,
               pretraining: Sequence[RunRecord] = (), extra_sections: Sequence[tuple] = ()) -> None:
    e = html.escape
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>Transfer study report</title><style>",
             "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px;margin-bottom:1em}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}th{background:#f0f0f0}"
             "img{max-width:100%;border:1px solid #eee}",
             "</style></head><body><h1>Transfer study report</h1>"]
    for title, kind, payload in _sections(analysis, pretraining, extra_sections):
        parts.append(f"<h2>{e(title)}</h2>")
        if kind == "paragraphs":
            parts += [f"<p>{e(p)}</p>" for p in payload]
        elif kind == "bullets":
            parts.append("<ul>" + "".join(f"<li>{e(p)}</li>" for p in payload) + "</ul>")
        else:
            header, body = payload
            parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"
                         + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in body)
                         + "</table>")
    parts.append("<h2>Plots</h2>")
    if not plots:
        parts.append("<p>n/a (no data to plot)</p>")
    for title, plot_path in plots.items():
        with open(plot_path, "rb") as f:
            encoded = base64.b64encode(f.read()).decode("ascii")
        parts.append(f"<h3>{e(title)}</h3><img alt='{e(title)}' src='data:image/png;base64,{encoded}'>")
    parts.append("<h2>Environment</h2><pre>" + e(json.dumps(environment_info, indent=2)) + "</pre></body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))


def write_report(study_dir: str, analysis: StudyAnalysis, *, run_configs: Optional[Mapping[str, Mapping]] = None,
                 study_config: Optional[Mapping] = None, pretraining: Sequence[RunRecord] = (),
                 extra_sections: Sequence[tuple] = ()) -> dict[str, str]:
    """Writes every output listed in the module docstring; returns {output name: path}."""
    os.makedirs(study_dir, exist_ok=True)
    outputs = {name: os.path.join(study_dir, name) for name in (
        "results.csv", "seeds.csv", "correlations.csv", "report.md", "report.html", "environment.json")}
    write_results_csv(outputs["results.csv"], analysis)
    write_seeds_csv(outputs["seeds.csv"], analysis)
    write_correlations_csv(outputs["correlations.csv"], analysis)
    plots = write_plots(os.path.join(study_dir, PLOTS_DIR), analysis)
    environment_info = environment()
    with open(outputs["environment.json"], "w", encoding="utf-8") as f:
        json.dump(environment_info, f, indent=2)
    write_configs(os.path.join(study_dir, CONFIGS_DIR), run_configs or {}, study_config)
    write_markdown(outputs["report.md"], analysis, plots, environment_info, pretraining, extra_sections)
    write_html(outputs["report.html"], analysis, plots, environment_info, pretraining, extra_sections)
    outputs["configs"] = os.path.join(study_dir, CONFIGS_DIR)
    outputs.update({f"plot:{title}": p for title, p in plots.items()})
    return outputs


__all__ = ["write_report", "result_columns", "environment", "RESULT_COLUMNS", "SITE_COLUMNS", "CORRELATION_COLUMNS"]
