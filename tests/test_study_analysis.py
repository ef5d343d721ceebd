"""Study statistics and report from synthetic run summaries (no training)."""
from __future__ import annotations

import csv
import itertools
import json
import math
import os

import numpy as np
import pytest
from scipy import stats

from transfer_jax.study import analysis, report
from transfer_jax.study.analysis import RunRecord


def write_summary(workdir, *, best, direction="max", steps_to_95=10, steps=40, alignment=None, init=None,
                  metric="score", task="segmentation", stopped_early=False, best_step=None):
    os.makedirs(workdir, exist_ok=True)
    summary = {"task": task, "backbone": "b", "primary_metric": metric, "direction": direction, "best": best,
               "best_step": steps if best_step is None else best_step, "final": {metric: best}, "steps": steps,
               "stopped_early": stopped_early,
               "history": [{"step": steps, "metrics": {metric: best}}], "steps_to_95pct_gain": steps_to_95,
               "wall_seconds": 1.0, "config": {"init": {"mode": init or "scratch"}, "total_steps": steps}}
    if init is not None:
        summary["init"] = init
    if alignment is not None:
        summary["alignment"] = alignment
    with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f)
    return workdir


def site(mmd2, p_value=0.01, cka=0.9, trajectory=None):
    return {"mmd2_unbiased": mmd2, "p_value": p_value, "cka_linear": cka,
            "trajectory": trajectory if trajectory is not None else [[0, 0.0], [20, mmd2 / 2], [40, mmd2]]}


def pair(tmp_path, backbone, task, *, pretrained=None, scratch=None):
    """Run records of one (backbone, task) pair; a None summary is a run that did not produce one."""
    records = []
    for init, fields in (("pretrained", pretrained), ("scratch", scratch)):
        workdir = os.path.join(tmp_path, "runs", f"{backbone}-{task}-{init}")
        if fields is not None:
            write_summary(workdir, **fields)
        records.append(RunRecord(backbone, task, init, workdir, "trained" if fields is not None else "skipped",
                                 "" if fields is not None else "no config"))
    return records


# Five backbone x task pairs: alignment (MMD²) goes down as gain and speed-up go up, with one tie in MMD².
MMD2 = [0.05, 0.10, 0.10, 0.30, 0.45]
PRETRAINED_BEST = [0.90, 0.80, 0.74, 0.66, 0.61]
SCRATCH_BEST = [0.60, 0.62, 0.60, 0.60, 0.60]
PRETRAINED_STEPS = [10, 20, 20, 30, 40]
SCRATCH_STEPS = [40, 40, 40, 40, 40]


def matrix_records(tmp_path):
    records = []
    for i, (mmd2, p, s, ps, ss) in enumerate(zip(MMD2, PRETRAINED_BEST, SCRATCH_BEST, PRETRAINED_STEPS,
                                                 SCRATCH_STEPS)):
        backbone, task = ("profound_conv", "profound_vit")[i % 2], ("seg", "cls", "sr", "distortion", "synthesis")[i]
        alignment = {"pooled": site(mmd2)}
        if i < 2:  # a site only two rows report: too few points for a correlation
            alignment["stage4"] = site(2 * mmd2)
        records += pair(tmp_path, backbone, task,
                        pretrained=dict(best=p, steps_to_95=ps, alignment=alignment, init="pretrained"),
                        scratch=dict(best=s, steps_to_95=ss, alignment={"pooled": site(1.0)}, init="scratch"))
    return records


def expected_relative_gains():
    return [(p - s) / abs(s) for p, s in zip(PRETRAINED_BEST, SCRATCH_BEST)]


# -- gains and rows -----------------------------------------------------------------------------------------------

def test_gains_are_positive_when_pretraining_helps_for_both_directions():
    assert analysis.gains(0.8, 0.5, "max") == pytest.approx((0.3, 0.6))
    assert analysis.gains(0.5, 0.8, "max") == pytest.approx((-0.3, -0.375))
    # "min" metric (e.g. an error): lower pretrained value is better -> positive gain.
    assert analysis.gains(0.2, 0.4, "min") == pytest.approx((0.2, 0.5))
    assert analysis.gains(0.6, 0.4, "min") == pytest.approx((-0.2, -0.5))
    # relative to |scratch|, so a negative scratch value does not flip the sign
    assert analysis.gains(-1.0, -2.0, "max") == pytest.approx((1.0, 0.5))
    absolute, relative = analysis.gains(0.3, 0.0, "max")
    assert absolute == pytest.approx(0.3) and relative is None
    assert analysis.gains(None, 0.5, "max") == (None, None)
    with pytest.raises(ValueError, match="direction"):
        analysis.gains(0.1, 0.2, "up")


@pytest.mark.parametrize("direction, values, expected", [
    ("max", [26.0, 26.5, 26.96, 27.0], 20),  # PSNR in dB: 95 % of the best (25.65 dB) is step 0's value already
    ("max", [0.5, 0.9, 0.98, 1.0], 20),  # AUROC from chance
    ("min", [1.0, 0.5, 0.1, 0.2], 20),  # a loss: the improvement is a decrease
    ("max", [0.8, 0.7, 0.8], None),  # never better than step 0
    ("max", [0.8], None),
])
def test_convergence_is_measured_on_the_improvement_over_step_0(direction, values, expected):
    from transfer_jax.train.convergence import steps_to_fraction_of_gain

    history = [{"step": 10 * i, "metrics": {"m": v}} for i, v in enumerate(values)]
    assert steps_to_fraction_of_gain(history, "m", direction) == expected


def test_summaries_without_the_convergence_step_get_it_from_their_history(tmp_path):
    from transfer_jax.study.analysis import run_outcome

    summary = {"primary_metric": "psnr", "direction": "max", "best": 27.0, "best_step": 30,
               "history": [{"step": 10 * i, "metrics": {"psnr": v}} for i, v in enumerate([26.0, 26.2, 26.97, 27.0])]}
    assert run_outcome(0, summary).steps_to_95 == 20
    assert run_outcome(0, dict(summary, steps_to_95pct_gain=10)).steps_to_95 == 10


def test_row_from_a_pretrained_and_a_scratch_summary(tmp_path):
    trajectory = [[40, 0.2], [0, 0.0], [20, 0.1]]
    records = pair(tmp_path, "profound_conv", "seg",
                   pretrained=dict(best=0.75, steps_to_95=10, init="pretrained",
                                   alignment={"pooled": site(0.2, p_value=0.003, cka=0.8, trajectory=trajectory)}),
                   scratch=dict(best=0.5, steps_to_95=30))
    (row,) = analysis.build_rows(records)
    assert (row.backbone, row.task, row.task_name, row.primary_metric, row.direction) == (
        "profound_conv", "seg", "segmentation", "score", "max")
    assert row.pretrained_best == 0.75 and row.scratch_best == 0.5
    assert row.absolute_gain == pytest.approx(0.25)
    assert row.relative_gain == pytest.approx(0.5)
    assert (row.pretrained_steps_to_95, row.scratch_steps_to_95) == (10, 30)
    assert row.convergence_speedup == pytest.approx(3.0)
    assert row.pretrained_init == "pretrained"
    pooled = row.alignment["pooled"]
    assert (pooled.mmd2, pooled.p_value, pooled.cka) == (0.2, 0.003, 0.8)
    assert pooled.trajectory == ((0, 0.0), (20, 0.1), (40, 0.2))  # sorted by step
    assert row.notes == []


def test_min_direction_metric_counts_a_lower_pretrained_value_as_a_gain(tmp_path):
    records = pair(tmp_path, "profound_conv", "sr",
                   pretrained=dict(best=0.03, direction="min", metric="mae", init="pretrained"),
                   scratch=dict(best=0.04, direction="min", metric="mae"))
    (row,) = analysis.build_rows(records)
    assert row.direction == "min"
    assert row.relative_gain == pytest.approx(0.25)
    assert row.absolute_gain == pytest.approx(0.01)


def test_missing_scratch_run_and_missing_alignment_give_na_not_errors(tmp_path):
    records = pair(tmp_path, "provicnet", "cls", pretrained=dict(best=0.7), scratch=None)
    (row,) = analysis.build_rows(records)
    assert row.scratch_best is None and row.relative_gain is None and row.convergence_speedup is None
    assert row.alignment == {}
    assert "no scratch run" in row.notes and "no alignment in the pretrained summary" in row.notes
    # The summary's missing `init` key falls back to the config snapshot, labelled as such.
    assert row.pretrained_init == "scratch (from config)"

    result = analysis.analyze(records, bootstrap=100, seed=0)
    assert result.sites == [] and result.correlations == []
    outputs = report.write_report(str(tmp_path / "study"), result)
    text = open(outputs["report.md"], encoding="utf-8").read()
    assert "Alignment: n/a" in text and "no scratch run" in text
    with open(outputs["results.csv"], encoding="utf-8") as f:
        (values,) = list(csv.DictReader(f))
    assert values["scratch_best"] == "n/a" and values["relative_gain"] == "n/a"
    assert float(values["pretrained_best"]) == 0.7
    assert not os.path.exists(os.path.join(tmp_path, "study", "plots", "scatter_mmd2_vs_relative_gain.png"))


def test_a_run_without_summary_file_counts_as_missing(tmp_path):
    records = pair(tmp_path, "profound_conv", "seg", pretrained=dict(best=0.7), scratch=dict(best=0.6))
    os.remove(os.path.join(records[1].workdir, "summary.json"))
    (row,) = analysis.build_rows(records)
    assert row.scratch_best is None and "no scratch run" in row.notes


def test_random_standin_and_mismatched_metrics_are_flagged(tmp_path):
    records = pair(tmp_path, "profound_vit", "seg",
                   pretrained=dict(best=0.7, init="pretrained-random-standin"),
                   scratch=dict(best=0.6, metric="other"))
    (row,) = analysis.build_rows(records)
    assert row.relative_gain is None
    assert any("random stand-in" in note for note in row.notes)
    assert any("primary_metric differs" in note for note in row.notes)


def test_non_finite_best_is_missing(tmp_path):
    records = pair(tmp_path, "profound_conv", "seg", pretrained=dict(best=float("nan")), scratch=dict(best=0.5))
    (row,) = analysis.build_rows(records)
    assert row.pretrained_best is None and row.relative_gain is None


# -- statistics against SciPy ------------------------------------------------------------------------------------

X_TIES = [0.3, 0.1, 0.1, 0.7, 0.5, 0.9, 0.5, 0.2]
Y_TIES = [2.0, 1.0, 3.0, 5.0, 5.0, 8.0, 4.0, 0.5]
REFERENCE = {"pearson": stats.pearsonr, "spearman": stats.spearmanr}


def reference_statistic(method):
    """SciPy's own coefficient, rounded to 12 decimals and 0 for a constant resample (the conventions of
    analysis.correlation_statistic)."""
    def statistic(x, y):
        return round(REFERENCE[method](x, y).statistic, 12) if np.ptp(x) > 0 and np.ptp(y) > 0 else 0.0
    return statistic


def exact_two_sided_p(x_blocks, y_blocks, method):
    """Brute force over every pairing of the points' blocks, as scipy's two-sided permutation test defines it."""
    x_blocks, y_blocks = np.asarray(x_blocks, float), np.asarray(y_blocks, float)
    statistic = reference_statistic(method)
    observed = statistic(x_blocks.ravel(), y_blocks.ravel())
    null = np.array([statistic(x_blocks[list(order)].ravel(), y_blocks.ravel())
                     for order in itertools.permutations(range(len(x_blocks)))])
    tolerance = 1e-14 * max(1.0, abs(observed))  # scipy's tolerance for ties with the observed value
    return min(1.0, 2 * min(np.mean(null <= observed + tolerance), np.mean(null >= observed - tolerance)))


@pytest.mark.parametrize("method", ["pearson", "spearman"])
def test_coefficients_match_scipy_with_ties(method):
    expected = REFERENCE[method](X_TIES, Y_TIES)
    assert analysis.correlation_coefficient(X_TIES, Y_TIES, method) == pytest.approx(expected.statistic, abs=1e-12)
    result = analysis.correlate(X_TIES, Y_TIES, site="pooled", target="relative_gain", method=method,
                                resamples=200, seed=1)
    assert result.n == result.points == len(X_TIES)
    assert result.coefficient == pytest.approx(expected.statistic, abs=1e-12)


@pytest.mark.parametrize("method", ["pearson", "spearman"])
@pytest.mark.parametrize("x, y", [([1.0, 2.0, 3.0], [1.0, 3.0, 2.0]),  # n = 3
                                  (X_TIES[:6], Y_TIES[:6])])  # ties in both variables
def test_permutation_p_value_is_exact_for_small_n(method, x, y):
    p_value, exact, pairings = analysis.permutation_p_value(x, y, method, permutations=99, seed=0)
    assert exact and pairings == math.factorial(len(x))
    assert p_value == pytest.approx(exact_two_sided_p(np.array(x)[:, None], np.array(y)[:, None], method),
                                    abs=1e-12)


@pytest.mark.parametrize("method", ["pearson", "spearman"])
def test_a_perfectly_monotone_example_has_the_minimal_exact_p_value(method):
    x = [0.01, 0.02, 0.04, 0.08, 0.16]
    y = [9.0, 5.0, 3.0, 2.0, 1.5]  # strictly decreasing: only the observed and the reversed pairing reach |r|
    result = analysis.correlate(x, y, site="s", target="relative_gain", method="spearman", resamples=0, seed=0)
    assert result.coefficient == -1.0 and result.exact and result.permutations == 120
    assert result.p_value == 2 / 120
    if method == "pearson":  # not perfectly linear: the same two pairings are still the most extreme
        assert analysis.correlate(x, y, site="s", target="relative_gain", method=method, resamples=0,
                                  seed=0).p_value == 2 / 120


def test_more_than_eight_points_use_the_configured_random_pairings():
    rng = np.random.default_rng(0)
    x = rng.normal(size=10)
    y = x + rng.normal(size=10)
    result = analysis.correlate(x, y, site="s", target="relative_gain", method="pearson", resamples=0,
                                permutations=999, seed=3)
    assert not result.exact and result.permutations == 999
    # with 999 random pairings the smallest two-sided p-value is 2 / 1000
    assert 2 / 1000 <= result.p_value <= 1.0
    reference = stats.permutation_test((x,), lambda a: stats.pearsonr(a, y).statistic, vectorized=False,
                                       permutation_type="pairings", n_resamples=999,
                                       rng=np.random.default_rng(3))
    assert result.p_value == pytest.approx(reference.pvalue, abs=1e-12)


@pytest.mark.parametrize("method", ["pearson", "spearman"])
@pytest.mark.parametrize("x, y", [(X_TIES, Y_TIES), ([1.0, 2.0, 3.0], [1.0, 3.0, 2.0])])
def test_bca_interval_matches_scipy(method, x, y):
    low, high = analysis.bootstrap_interval(x, y, method, resamples=400, seed=7)
    reference = stats.bootstrap((np.array(x), np.array(y)), reference_statistic(method), paired=True,
                                vectorized=False, n_resamples=400, method="BCa", rng=np.random.default_rng(7))
    expected = reference.confidence_interval
    if np.isfinite(expected.low):
        assert (low, high) == pytest.approx((expected.low, expected.high), abs=1e-12)
    else:
        assert (low, high) == (None, None)
    assert analysis.bootstrap_interval(x, y, method, resamples=400, seed=7) == (low, high)  # reproducible


def test_bca_interval_contains_the_estimate_and_depends_on_the_seed():
    point = analysis.correlation_coefficient(X_TIES, Y_TIES, "pearson")
    low, high = analysis.bootstrap_interval(X_TIES, Y_TIES, "pearson", resamples=2000, seed=7)
    assert -1.0 <= low < point < high <= 1.0
    assert analysis.bootstrap_interval(X_TIES, Y_TIES, "pearson", resamples=300, seed=2) != \
        analysis.bootstrap_interval(X_TIES, Y_TIES, "pearson", resamples=300, seed=1)


def test_cluster_bootstrap_and_permutation_resample_whole_points():
    # 4 points x 2 seeds: the seeds of a point move together
    x_blocks = np.array([[0.1, 0.12], [0.2, 0.18], [0.3, 0.35], [0.5, 0.4]])
    y_blocks = np.array([[0.30, 0.25], [0.2, 0.22], [0.15, 0.05], [0.0, 0.02]])
    result = analysis.correlate(x_blocks, y_blocks, site="s", target="relative_gain", method="pearson",
                                level="replicates", resamples=300, seed=5)
    assert (result.n, result.points, result.exact, result.permutations) == (8, 4, True, 24)
    assert result.coefficient == pytest.approx(stats.pearsonr(x_blocks.ravel(), y_blocks.ravel()).statistic)
    assert result.p_value == pytest.approx(exact_two_sided_p(x_blocks, y_blocks, "pearson"), abs=1e-12)
    statistic = reference_statistic("pearson")
    reference = stats.bootstrap((np.arange(4),), lambda i: statistic(x_blocks[i].ravel(), y_blocks[i].ravel()),
                                vectorized=False, n_resamples=300, method="BCa", rng=np.random.default_rng(5))
    assert (result.ci_low, result.ci_high) == pytest.approx(
        (reference.confidence_interval.low, reference.confidence_interval.high), abs=1e-12)


@pytest.mark.parametrize("pretrained, scratch", [([0.8, 0.7, 0.75], [0.6, 0.65, 0.5]),  # n = 3
                                                 ([0.8, 0.8, 0.7, 0.9], [0.7, 0.7, 0.7, 0.6])])  # ties
def test_paired_interval_matches_scipy(pretrained, scratch):
    paired = analysis.estimate(np.subtract(pretrained, scratch))
    expected = stats.ttest_rel(pretrained, scratch).confidence_interval(0.95)
    assert paired.mean == pytest.approx(np.mean(np.subtract(pretrained, scratch)))
    assert (paired.low, paired.high) == pytest.approx((expected.low, expected.high), abs=1e-12)
    assert paired.contains_zero == (expected.low <= 0 <= expected.high)
    assert analysis.estimate([0.2, 0.25, 0.22]).contains_zero is False
    assert analysis.estimate([0.1]).low is None and analysis.estimate([0.1]).contains_zero is None
    assert analysis.estimate([0.1, -0.1]).contains_zero is True


def test_too_few_points_and_constant_inputs_give_no_coefficient():
    two = analysis.correlate([0.1, 0.2], [1.0, 2.0], site="s", target="relative_gain", method="spearman",
                             resamples=100, seed=0)
    assert two.n == 2 and two.coefficient is None and two.ci_low is None and "n < 3" in two.note
    flat = analysis.correlate([0.1, 0.1, 0.1], [1.0, 2.0, 3.0], site="s", target="relative_gain",
                              method="pearson", resamples=100, seed=0)
    assert flat.coefficient is None and flat.note == "constant input"


def test_study_correlations_over_rows_per_site_and_target(tmp_path):
    result = analysis.analyze(matrix_records(tmp_path), bootstrap=1000, seed=3)
    assert result.sites == ["pooled", "stage4"]
    assert len(result.rows) == 5
    by_key = {(c.site, c.target, c.method): c for c in result.correlations}
    gains = expected_relative_gains()
    for method, reference in (("pearson", stats.pearsonr), ("spearman", stats.spearmanr)):
        gain = by_key[("pooled", "relative_gain", method)]
        assert gain.n == 5
        assert gain.coefficient == pytest.approx(reference(MMD2, gains).statistic, abs=1e-12)
        assert gain.coefficient < 0  # built so that better alignment goes with larger gains
        assert gain.ci_low <= gain.coefficient <= gain.ci_high
        speed = by_key[("pooled", "convergence_speedup", method)]
        speedups = [s / p for s, p in zip(SCRATCH_STEPS, PRETRAINED_STEPS)]
        assert speed.coefficient == pytest.approx(reference(MMD2, speedups).statistic, abs=1e-12)
        steps = by_key[("pooled", "pretrained_steps_to_95", method)]
        assert steps.coefficient == pytest.approx(reference(MMD2, PRETRAINED_STEPS).statistic, abs=1e-12)
        sparse = by_key[("stage4", "relative_gain", method)]
        assert sparse.n == 2 and sparse.coefficient is None
    # The scratch runs' alignment (drift from random init) never enters the correlations.
    assert all(row.mmd2("pooled") != 1.0 for row in result.rows)


def test_correlations_skip_rows_missing_the_target(tmp_path):
    records = matrix_records(tmp_path)
    os.remove(os.path.join(records[1].workdir, "summary.json"))  # first row loses its scratch run
    result = analysis.analyze(records, bootstrap=0, seed=0)
    gain = next(c for c in result.correlations if (c.site, c.target, c.method) == ("pooled", "relative_gain",
                                                                                   "pearson"))
    assert gain.n == 4
    assert gain.coefficient == pytest.approx(stats.pearsonr(MMD2[1:], expected_relative_gains()[1:]).statistic)
    assert gain.ci_low is None and "no bootstrap" in gain.note
    steps = next(c for c in result.correlations
                 if (c.site, c.target, c.method) == ("pooled", "pretrained_steps_to_95", "pearson"))
    assert steps.n == 5  # needs only the pretrained run


# -- report -------------------------------------------------------------------------------------------------------

def test_report_files_columns_and_sample_sizes(tmp_path):
    result = analysis.analyze(matrix_records(tmp_path), bootstrap=500, seed=0)
    study_dir = tmp_path / "study"
    run_configs = {"profound_conv-seg-pretrained": {"total_steps": 40, "init": {"mode": "pretrained"}}}
    outputs = report.write_report(str(study_dir), result, run_configs=run_configs,
                                  study_config={"study": {"tasks": ["seg"]}})
    with open(outputs["results.csv"], encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns, rows = reader.fieldnames, list(reader)
    assert columns == report.result_columns(["pooled", "stage4"])
    assert columns[:3] == ["backbone", "task", "task_name"]
    assert {"relative_gain", "convergence_speedup", "mmd2_pooled", "mmd2_p_pooled", "cka_pooled", "mmd2_stage4",
            "notes"} <= set(columns)
    assert len(rows) == 5
    assert [float(r["relative_gain"]) for r in rows] == pytest.approx(expected_relative_gains())
    assert [float(r["mmd2_pooled"]) for r in rows] == pytest.approx(MMD2)
    assert rows[2]["mmd2_stage4"] == "n/a"

    with open(outputs["correlations.csv"], encoding="utf-8") as f:
        correlations = list(csv.DictReader(f))
    assert len(correlations) == 2 * 3 * 2  # sites x targets x methods
    assert {r["n"] for r in correlations if r["site"] == "pooled"} == {"5"}

    markdown = open(outputs["report.md"], encoding="utf-8").read()
    page = open(outputs["report.html"], encoding="utf-8").read()
    for text in (markdown, page):
        assert "n = 5" in text and "n = 2" in text
        assert "How to read this" in text and "tiny" in text
        assert "profound_conv" in text and "bootstrap" in text
    assert page.count("data:image/png;base64,") == 5  # self-contained: every plot embedded
    for name in ("gain_by_task", "scatter_mmd2_vs_relative_gain", "scatter_mmd2_vs_convergence_speedup",
                 "scatter_mmd2_vs_pretrained_steps_to_95", "mmd2_trajectories"):
        path = study_dir / "plots" / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{name}.png" in markdown

    env = json.loads((study_dir / "environment.json").read_text())
    for package in ("jax", "flax", "optax", "numpy"):
        assert env["packages"][package] not in ("", None)
    assert env["python"].count(".") == 2 and env["platform"]
    assert json.loads((study_dir / "configs" / "profound_conv-seg-pretrained.json").read_text()) == \
        run_configs["profound_conv-seg-pretrained"]
    assert json.loads((study_dir / "configs" / "study.json").read_text())["study"]["tasks"] == ["seg"]


def test_a_second_report_removes_plots_the_data_no_longer_supports(tmp_path):
    study_dir = str(tmp_path / "study")
    report.write_report(study_dir, analysis.analyze(matrix_records(tmp_path), bootstrap=50, seed=0))
    assert os.path.exists(os.path.join(study_dir, "plots", "mmd2_trajectories.png"))
    no_alignment = pair(tmp_path / "other", "profound_conv", "seg", pretrained=dict(best=0.7),
                        scratch=dict(best=0.6))
    report.write_report(study_dir, analysis.analyze(no_alignment, bootstrap=50, seed=0))
    assert not os.path.exists(os.path.join(study_dir, "plots", "mmd2_trajectories.png"))
    assert os.path.exists(os.path.join(study_dir, "plots", "gain_by_task.png"))


def test_discover_runs_finds_run_folders_with_summaries(tmp_path):
    records = matrix_records(tmp_path)
    found = analysis.discover_runs(os.path.join(tmp_path, "runs"))
    assert sorted(r.name for r in found) == sorted(r.name for r in records)
    os.makedirs(os.path.join(tmp_path, "runs", "not-a-run"))
    assert len(analysis.discover_runs(os.path.join(tmp_path, "runs"))) == len(records)
    seeded = seeded_records(tmp_path / "seeded", seeds=2, probe=True)
    found = analysis.discover_runs(os.path.join(tmp_path, "seeded", "runs"))
    assert sorted((r.name, r.seed, r.arm) for r in found) == sorted((r.name, r.seed, r.arm) for r in seeded)
    assert "profound_conv-seg-pretrained-probe-seed1" in {r.name for r in found}


# -- seeds, did-not-learn rows and the probe arm --------------------------------------------------------------------

SEED_OFFSETS = [0.0, 0.02, -0.015]


def seeded_records(tmp_path, seeds=3, silent=(), probe=False):
    """The five-point matrix with `seeds` replicates (seed s shifts the pretrained values); the rows in `silent`
    never improve on step 0 in either run."""
    records = []
    for i, (mmd2, p, s, ps, ss) in enumerate(zip(MMD2, PRETRAINED_BEST, SCRATCH_BEST, PRETRAINED_STEPS,
                                                 SCRATCH_STEPS)):
        backbone, task = ("profound_conv", "profound_vit")[i % 2], ("seg", "cls", "sr", "distortion", "synthesis")[i]
        for seed in range(seeds):
            offset = SEED_OFFSETS[seed]
            step0 = dict(best_step=0, steps_to_95=0) if i in silent else {}
            runs = [("pretrained", "finetune", dict(dict(best=p + offset, steps_to_95=ps + 10 * seed, init="pretrained",
                                                         alignment={"pooled": site(mmd2 * (1 + offset))}), **step0)),
                    ("scratch", "finetune", dict(dict(best=s, steps_to_95=ss), **step0))]
            if probe:
                runs.append(("pretrained", "probe", dict(best=p + offset - 0.1, alignment={"pooled": site(0.0)})))
            for init, arm, fields in runs:
                workdir = os.path.join(tmp_path, "runs", analysis.run_name(backbone, task, init, seed, arm))
                write_summary(workdir, **fields)
                records.append(RunRecord(backbone, task, init, workdir, "trained", seed=seed, arm=arm))
    return records


def test_rows_aggregate_seeds_with_paired_intervals(tmp_path):
    result = analysis.analyze(seeded_records(tmp_path, probe=True), bootstrap=200, seed=0)
    row = result.rows[0]
    pretrained = [PRETRAINED_BEST[0] + o for o in SEED_OFFSETS]
    relative = [(p - SCRATCH_BEST[0]) / SCRATCH_BEST[0] for p in pretrained]
    assert row.seeds == 3 and row.pretrained.values == pytest.approx(pretrained)
    assert row.relative_gain == pytest.approx(np.mean(relative))
    expected = stats.ttest_1samp(relative, 0.0).confidence_interval(0.95)
    assert (row.gain.low, row.gain.high) == pytest.approx((expected.low, expected.high))
    paired = stats.ttest_rel(pretrained, [SCRATCH_BEST[0]] * 3).confidence_interval(0.95)
    assert (row.absolute.low, row.absolute.high) == pytest.approx((paired.low, paired.high))
    assert row.steps_to_95["pretrained"] == (10, 20, 30) and row.steps_to_95["scratch"] == (40, 40, 40)
    assert row.speedup.values == pytest.approx([4.0, 2.0, 40 / 30])
    assert row.mmd2("pooled") == pytest.approx(np.mean([MMD2[0] * (1 + o) for o in SEED_OFFSETS]))
    # probe gap: (fine-tuned - probe) / fine-tuned per seed; the probe's MMD² (0) never enters the row's MMD²
    assert row.probe_gap.values == pytest.approx([0.1 / p for p in pretrained])
    by_key = {(c.site, c.target, c.method, c.level): c for c in result.correlations}
    points = by_key[("pooled", "relative_gain", "spearman", "points")]
    replicates = by_key[("pooled", "relative_gain", "spearman", "replicates")]
    assert (points.n, points.points, points.exact) == (5, 5, True)
    assert (replicates.n, replicates.points, replicates.permutations) == (15, 5, 120)
    assert points.coefficient == pytest.approx(
        stats.spearmanr([r.mmd2("pooled") for r in result.rows], [r.relative_gain for r in result.rows]).statistic)


def test_rows_that_did_not_learn_say_so_and_leave_the_correlations(tmp_path):
    result = analysis.analyze(seeded_records(tmp_path, seeds=2, silent=(2,)), bootstrap=100, seed=0)
    row = result.rows[2]
    assert row.did_not_learn and row.relative_gain is None and row.convergence_speedup is None
    assert row.steps_to_95["pretrained"] == (None, None)
    assert any(note.startswith("did not learn") for note in row.notes)
    gain = next(c for c in result.correlations
                if (c.site, c.target, c.method, c.level) == ("pooled", "relative_gain", "pearson", "points"))
    assert gain.n == 4
    outputs = report.write_report(str(tmp_path / "study"), result)
    markdown = open(outputs["report.md"], encoding="utf-8").read()
    assert "| did not learn |" in markdown
    with open(outputs["results.csv"], encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert rows[2]["did_not_learn"] == "True" and rows[2]["relative_gain"] == "n/a"


def test_report_holds_the_table_and_the_figure_with_intervals(tmp_path):
    result = analysis.analyze(seeded_records(tmp_path, probe=True), bootstrap=200, seed=0)
    outputs = report.write_report(str(tmp_path / "study"), result)
    markdown = open(outputs["report.md"], encoding="utf-8").read()
    row = result.rows[0]
    gain = f"{100 * row.gain.mean:+.3g} % [{100 * row.gain.low:+.3g}, {100 * row.gain.high:+.3g}]"
    assert gain in markdown
    assert "probe gap" in markdown and "replicates" in markdown and "exact, 120 pairings" in markdown
    with open(outputs["results.csv"], encoding="utf-8") as f:
        first = next(csv.DictReader(f))
    assert float(first["relative_gain_low"]) == pytest.approx(row.gain.low)
    assert float(first["mmd2_high_pooled"]) == pytest.approx(row.mmd2_by_site["pooled"].high)
    with open(outputs["seeds.csv"], encoding="utf-8") as f:
        seeds = list(csv.DictReader(f))
    assert len(seeds) == 5 * 3 and [int(r["seed"]) for r in seeds[:3]] == [0, 1, 2]
    assert [float(r["relative_gain"]) for r in seeds[:3]] == pytest.approx(row.gain.values)
    assert [float(r["mmd2_pooled"]) for r in seeds[:3]] == pytest.approx(row.mmd2_by_site["pooled"].values)
    assert [int(r["pretrained_steps_to_95"]) for r in seeds[:3]] == [10, 20, 30]
    figure = tmp_path / "study" / "plots" / "scatter_mmd2_vs_relative_gain.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plots/scatter_mmd2_vs_relative_gain.png" in markdown
