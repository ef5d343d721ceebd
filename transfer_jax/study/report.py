"""Writes a study's outputs into its directory.

    results.csv        one row per backbone x task (columns: RESULT_COLUMNS, then mmd2_/mmd2_p_/cka_ per site, notes)
    correlations.csv   one row per (site, target, method): coefficient, n, p-value, bootstrap interval
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

from transfer_jax.study.analysis import CI_LEVEL, TARGETS, Row, RunRecord, StudyAnalysis

NA = "n/a"
PLOTS_DIR = "plots"
CONFIGS_DIR = "configs"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "scipy", "matplotlib",
            "ml-collections", "absl-py")

# (column, description) of results.csv before the per-site columns.
RESULT_COLUMNS = (
    ("backbone", "encoder name"),
    ("task", "task key (configs/<task>.py)"),
    ("task_name", "task class name reported by the trainer"),
    ("primary_metric", "validation metric the gain is measured on"),
    ("direction", "max: higher is better; min: lower is better"),
    ("pretrained_init", "initialisation the pretrained run reports (a random stand-in is no real pretraining)"),
    ("pretrained_best", "best validation value of the primary metric, pretrained run"),
    ("scratch_best", "best validation value of the primary metric, from-scratch run"),
    ("pretrained_test", "the pretrained run's best checkpoint on the test split (primary metric, measured once)"),
    ("scratch_test", "the from-scratch run's best checkpoint on the test split"),
    ("absolute_gain", "pretrained - scratch (max) or scratch - pretrained (min): positive = pretraining helped"),
    ("relative_gain", "absolute_gain / |scratch_best| (0.2 = 20 % better)"),
    ("pretrained_steps_to_95", "first evaluated step within 95 % of the run's best, pretrained run"),
    ("scratch_steps_to_95", "the same for the from-scratch run"),
    ("convergence_speedup", "scratch_steps_to_95 / pretrained_steps_to_95 (> 1: pretrained converges faster)"),
    ("pretrained_steps", "training steps the pretrained run completed"),
    ("scratch_steps", "training steps the from-scratch run completed"),
)
SITE_COLUMNS = (
    ("mmd2_{site}", "final unbiased MMD² between the site's features before and after fine-tuning (pretrained run)"),
    ("mmd2_p_{site}", "permutation p-value of that MMD² (H0: same feature distribution)"),
    ("cka_{site}", "linear CKA between the same features before and after fine-tuning (1 = same geometry)"),
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


def _row_values(row: Row, sites) -> dict[str, Any]:
    values = {name: getattr(row, name) for name, _ in RESULT_COLUMNS}
    for site in sites:
        entry = row.alignment.get(site)
        values[f"mmd2_{site}"] = entry.mmd2 if entry else None
        values[f"mmd2_p_{site}"] = entry.p_value if entry else None
        values[f"cka_{site}"] = entry.cka if entry else None
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
            writer.writerow([values[c] if c == "notes" else (NA if values[c] is None else values[c])
                             for c in columns])


CORRELATION_COLUMNS = ("site", "target", "method", "n", "coefficient", "p_value", "ci_low", "ci_high",
                       "ci_level", "bootstrap_resamples", "degenerate_resamples", "expected_sign", "note")


def write_correlations_csv(path: str, analysis: StudyAnalysis) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CORRELATION_COLUMNS)
        for c in analysis.correlations:
            writer.writerow([c.site, c.target, c.method, c.n] +
                            [NA if v is None else v for v in (c.coefficient, c.p_value, c.ci_low, c.ci_high)] +
                            [CI_LEVEL, c.resamples, c.degenerate_resamples, TARGETS[c.target][1], c.note])


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
        points = [(t_index + offset, 100 * r.relative_gain) for t_index, task in enumerate(tasks)
                  for r in rows if r.backbone == backbone and r.task == task]
        if points:
            xs, heights = zip(*points)
            ax.bar(xs, heights, width, color=colors[backbone], label=backbone)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("relative gain over scratch (%)")
    ax.set_title("Gain of pretraining per task (positive = better than scratch)")
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _correlation_text(analysis: StudyAnalysis, site: str, target: str) -> str:
    found = [c for c in analysis.correlations if c.site == site and c.target == target]
    if not found:
        return ""
    symbols = {"pearson": "r", "spearman": "ρ"}
    parts = [f"n={found[0].n}"] + [f"{symbols[c.method]}={c.coefficient:+.2f}" for c in found
                                   if c.coefficient is not None]
    return " (" + ", ".join(parts) + ")"


def plot_scatter(path: str, analysis: StudyAnalysis, target: str) -> bool:
    """MMD² (x) against `target` (y), one panel per feature site, one labelled point per backbone x task."""
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
            ax.scatter(x, scale * y, color=colors[row.backbone], s=30)
            ax.annotate(row.label, (x, scale * y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(f"{site}{_correlation_text(analysis, site, target)}", fontsize=9)
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
    plans = [("Relative gain per task", "gain_by_task.png", lambda p: plot_gain_by_task(p, analysis))]
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
    "(same task config, data order and step budget). A positive gain means pretraining helped; for metrics to "
    "minimise the sign is flipped so that this holds for every task.",
    "Alignment is the MMD² between the features of the same validation inputs before and after fine-tuning the "
    "pretrained encoder (unbiased estimator; the p-value tests whether fine-tuning changed the feature "
    "distribution at all). Small MMD² = the task needed little change of the pretrained features = good "
    "alignment. CKA compares the geometry of the paired features (1 = unchanged).",
    "The paper's claim predicts negative correlations of MMD² with the gain and with the convergence speed-up, and "
    "a positive one with the pretrained run's steps to 95 % of its best.",
    "Caveat: n is tiny (at most backbones x tasks = 15 points, 10 in the paper). Read the intervals, not the "
    "point estimates; with so few points the percentile bootstrap tends to be too narrow, so even the intervals "
    "understate the uncertainty. Do not read anything into p-values of the many (site x target x method) "
    "correlations without a multiple-testing correction. With n < 3 no coefficient is reported. Bootstrap "
    "resamples in which all drawn points share one value have no correlation; they are skipped and counted.",
    "Rows whose pretrained run reports a random stand-in (no pretrained checkpoint was given) measure nothing "
    "about pretraining; their gains are those of two random initialisations.",
    "Steps to 95 % are measured at the evaluation cadence, so they are multiples of eval_every; rows from tasks "
    "with different step budgets are not directly comparable on that column.",
]


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    escape = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(escape, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(escape, row)) + " |" for row in rows]
    return lines


def _percent(value: Optional[float]) -> str:
    return NA if value is None else f"{100 * value:+.2f} %"


def _results_table(analysis: StudyAnalysis) -> tuple[list[str], list[list[str]]]:
    header = ["backbone", "task", "metric", "pretrained", "scratch", "relative gain", "test (pre / scratch)",
              "steps to 95 % (pre / scratch)", "speed-up"] + [f"MMD² {s} (p)" for s in analysis.sites] + ["notes"]
    body = []
    for row in analysis.rows:
        metric = NA if row.primary_metric is None else f"{row.primary_metric} ({row.direction})"
        cells = [row.backbone, row.task, metric, _fmt(row.pretrained_best), _fmt(row.scratch_best),
                 _percent(row.relative_gain), f"{_fmt(row.pretrained_test)} / {_fmt(row.scratch_test)}",
                 f"{_fmt(row.pretrained_steps_to_95)} / {_fmt(row.scratch_steps_to_95)}",
                 _fmt(row.convergence_speedup, 3)]
        for site in analysis.sites:
            entry = row.alignment.get(site)
            cells.append(NA if entry is None or entry.mmd2 is None
                         else f"{entry.mmd2:.4g} ({_fmt(entry.p_value, 3)})")
        cells.append("; ".join(row.notes))
        body.append(cells)
    return header, body


def _correlation_table(analysis: StudyAnalysis) -> tuple[list[str], list[list[str]]]:
    """One line per (site, target): Pearson and Spearman side by side, both on the same n rows."""
    level = f"{int(100 * CI_LEVEL)} % CI"
    header = ["site", "target", "n", f"Pearson r [{level}]", "p", f"Spearman ρ [{level}]", "p",
              "degenerate resamples (r / ρ)", "expected sign"]

    def cell(c) -> str:
        if c.coefficient is None:
            return f"{NA} ({c.note})" if c.note else NA
        interval = "" if c.ci_low is None else f" [{c.ci_low:+.2f}, {c.ci_high:+.2f}]"
        return f"{c.coefficient:+.3f}{interval}"

    by_key = {(c.site, c.target, c.method): c for c in analysis.correlations}
    body = []
    for site in analysis.sites:
        for target in TARGETS:
            pearson, spearman = by_key[(site, target, "pearson")], by_key[(site, target, "spearman")]
            body.append([site, TARGETS[target][0], f"n = {pearson.n}", cell(pearson), _fmt(pearson.p_value, 3),
                         cell(spearman), _fmt(spearman.p_value, 3),
                         f"{pearson.degenerate_resamples} / {spearman.degenerate_resamples} of {pearson.resamples}",
                         TARGETS[target][1]])
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
    body = [[name, text] for name, text in RESULT_COLUMNS]
    body += [[pattern.replace("{site}", "<site>"), text] for pattern, text in SITE_COLUMNS]
    body.append(["notes", "why a number is missing or should be read with care"])
    sites = ", ".join(analysis.sites) or "none reported"
    return ["column", "meaning"], body + [["(sites)", f"feature sites in this study: {sites}"]]


def _summary_lines(analysis: StudyAnalysis) -> list[str]:
    complete = [r for r in analysis.rows if r.relative_gain is not None]
    lines = [f"{len(analysis.runs)} planned runs: "
             + ", ".join(f"{sum(r.status == s for r in analysis.runs)} {s}" for s in ("trained", "reused", "skipped"))
             + f". {len(analysis.rows)} backbone x task rows, {len(complete)} with both a pretrained and a scratch "
             f"result (n = {len(complete)} for the gains)."]
    if not analysis.sites:
        lines.append("Alignment: n/a (no run summary reports an `alignment` block), so no MMD² correlations.")
    else:
        usable = [c for c in analysis.correlations if c.coefficient is not None]
        lines.append(f"Alignment sites: {', '.join(analysis.sites)}; {len(usable)} of {len(analysis.correlations)} "
                     f"correlations defined; bootstrap: {analysis.bootstrap} resamples, seed {analysis.seed}, "
                     f"percentile {int(100 * CI_LEVEL)} % intervals.")
    return lines


def _sections(analysis: StudyAnalysis, pretraining: Sequence[RunRecord] = ()):
    """(title, kind, payload) blocks shared by the markdown and HTML writers."""
    yield "Summary", "paragraphs", _summary_lines(analysis)
    yield "How to read this", "bullets", HOW_TO_READ
    if pretraining:
        yield "Pretraining (JAX, initialises the pretrained runs)", "table", _pretraining_table(pretraining)
    yield "Results (one row per backbone x task)", "table", _results_table(analysis)
    yield "Correlations of MMD² with gain and convergence", "table", _correlation_table(analysis)
    yield "Runs", "table", _runs_table(analysis)
    yield "Columns of results.csv", "table", _column_docs(analysis)


def write_markdown(path: str, analysis: StudyAnalysis, plots: Mapping[str, str], environment_info: Mapping,
                   pretraining: Sequence[RunRecord] = ()) -> None:
    lines = ["# Transfer study report", ""]
    for title, kind, payload in _sections(analysis, pretraining):
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
               pretraining: Sequence[RunRecord] = ()) -> None:
    e = html.escape
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>Transfer study report</title><style>",
             "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px;margin-bottom:1em}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}th{background:#f0f0f0}"
             "img{max-width:100%;border:1px solid #eee}",
             "</style></head><body><h1>Transfer study report</h1>"]
    for title, kind, payload in _sections(analysis, pretraining):
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
                 study_config: Optional[Mapping] = None, pretraining: Sequence[RunRecord] = ()) -> dict[str, str]:
    """Writes every output listed in the module docstring; returns {output name: path}."""
    os.makedirs(study_dir, exist_ok=True)
    outputs = {name: os.path.join(study_dir, name) for name in (
        "results.csv", "correlations.csv", "report.md", "report.html", "environment.json")}
    write_results_csv(outputs["results.csv"], analysis)
    write_correlations_csv(outputs["correlations.csv"], analysis)
    plots = write_plots(os.path.join(study_dir, PLOTS_DIR), analysis)
    environment_info = environment()
    with open(outputs["environment.json"], "w", encoding="utf-8") as f:
        json.dump(environment_info, f, indent=2)
    write_configs(os.path.join(study_dir, CONFIGS_DIR), run_configs or {}, study_config)
    write_markdown(outputs["report.md"], analysis, plots, environment_info, pretraining)
    write_html(outputs["report.html"], analysis, plots, environment_info, pretraining)
    outputs["configs"] = os.path.join(study_dir, CONFIGS_DIR)
    outputs.update({f"plot:{title}": p for title, p in plots.items()})
    return outputs


__all__ = ["write_report", "result_columns", "environment", "RESULT_COLUMNS", "SITE_COLUMNS", "CORRELATION_COLUMNS"]
