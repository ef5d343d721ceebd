"""The study's positive control (transfer_jax/study/control.py): analysis on fixed summaries, its config, and
(slow) the smoke control end to end."""
import json
import os

import pytest
from helpers import load_config

from transfer_jax.study import control as study_control
from transfer_jax.study.analysis import RunRecord

# source -> (best dice, steps to 95 %, pooled MMD²) per seed, in the expected order.
ORDERED = {"aligned": [(0.80, 10, 0.01), (0.82, 10, 0.02)], "related": [(0.70, 20, 0.05), (0.71, 20, 0.06)],
           "unrelated": [(0.62, 30, 0.10), (0.61, 40, 0.12)], "random": [(0.60, 40, 0.20), (0.58, 50, 0.25)]}


def _records(tmp_path, values):
    records = []
    for source, seeds in values.items():
        for seed, (best, steps, mmd2) in enumerate(seeds):
            workdir = tmp_path / f"{source}-{seed}"
            workdir.mkdir()
            summary = {"task": "segmentation", "primary_metric": "dice_mean", "direction": "max", "best": best,
                       "best_step": steps, "steps_to_95pct_gain": steps, "steps": 60,
                       "alignment": {"pooled": {"mmd2_unbiased": mmd2, "p_value": 0.01, "cka_linear": 0.9,
                                                "trajectory": [[0, 0.0], [steps, mmd2]]}}}
            (workdir / "summary.json").write_text(json.dumps(summary))
            records.append(RunRecord("profound_conv", "seg", source, str(workdir), "trained", seed=seed))
    return records


def _checks(control):
    return {c.measure: c for c in control.checks}


def test_expected_order_holds_with_exact_p_value(tmp_path):
    control = study_control.analyze_control(_records(tmp_path, ORDERED), bootstrap=0)
    by_source = {r.source: r for r in control.sources}
    assert [r.source for r in control.sources] == list(study_control.SOURCES)
    # gain vs random, paired by seed: (0.80 - 0.60) / 0.60 and (0.82 - 0.58) / 0.58
    assert by_source["aligned"].gain.mean == pytest.approx(((0.2 / 0.6) + (0.24 / 0.58)) / 2)
    assert by_source["random"].gain.mean == 0.0
    assert by_source["unrelated"].steps_to_95.mean == 35
    checks = _checks(control)
    assert set(checks) == {"mmd2:pooled", "relative_gain", "steps_to_95"}
    assert checks["mmd2:pooled"].correlation.coefficient == pytest.approx(1.0)
    assert checks["relative_gain"].correlation.coefficient == pytest.approx(-1.0)
    assert all(c.holds for c in checks.values())
    # a perfect order of 4 points: 2 of the 24 pairings are as extreme (two-sided)
    assert checks["mmd2:pooled"].correlation.exact
    assert checks["mmd2:pooled"].correlation.p_value == pytest.approx(2 / 24)


def test_a_swapped_pair_breaks_the_order(tmp_path):
    swapped = dict(ORDERED, aligned=ORDERED["related"], related=ORDERED["aligned"])
    control = study_control.analyze_control(_records(tmp_path, swapped), bootstrap=0)
    checks = _checks(control)
    assert checks["mmd2:pooled"].correlation.coefficient == pytest.approx(0.8)
    assert checks["mmd2:pooled"].holds is False
    assert checks["relative_gain"].holds is False
    header, rows = study_control.order_table(control)
    assert [row[header.index("order holds")] for row in rows] == ["no", "no", "no"]
    assert "0 of 3" in study_control.summary_line(control)


def test_missing_sources_and_unknown_source(tmp_path):
    two = {k: ORDERED[k] for k in ("aligned", "random")}
    control = study_control.analyze_control(_records(tmp_path, two), bootstrap=0)
    assert all(c.holds is None for c in control.checks)  # two points: no correlation
    assert study_control.analyze_control([], bootstrap=0) is None
    (tmp_path / "bad").mkdir()
    bad = _records(tmp_path / "bad", {"noise": [(0.5, 1, 0.1)]})
    with pytest.raises(ValueError, match="source 'noise' is not one of"):
        study_control.analyze_control(bad, bootstrap=0)


def test_control_config_is_validated():
    from transfer_jax.study import runner

    config = load_config("study", "smoke,control")
    assert runner.parse_study(config).control.backbone == "profound_conv"
    assert runner.parse_study(load_config("study", "smoke")).control is None
    config.study.control.unrelated = "seg"
    with pytest.raises(runner.StudyConfigError, match="study.control.unrelated must name a pretraining config"):
        runner.parse_study(config)
    with pytest.raises(ValueError, match="is not a study preset"):
        load_config("study", "smoke,cpu")


def test_control_runs_its_sources_then_one_run_per_source(tmp_path, monkeypatch):
    """The plumbing, with the fake trainer of the runner's tests: which runs start from which artifact."""
    from test_study_runner import FakeTrainer

    from transfer_jax.study import runner
    from transfer_jax.train import export, loop

    trainer = FakeTrainer()
    monkeypatch.setattr(loop, "train_and_evaluate", trainer)
    exported = []
    monkeypatch.setattr(export, "export_backbone", lambda workdir: exported.append(workdir) or workdir)
    config = load_config("study", "smoke,control")
    config.study.bootstrap = 0
    result = runner.run_study(config, str(tmp_path), log=lambda message: None)
    names = [name for name, _ in trainer.calls]
    assert names == ["profound_conv", "profound_conv-seg-pretrained", "profound_conv-seg-scratch", "aligned",
                     "unrelated", *(f"profound_conv-seg-control-{s}" for s in study_control.SOURCES)]
    calls = dict(trainer.calls)
    assert calls["aligned"]["init"]["mode"] == "scratch" and calls["aligned"]["task"]["name"] == "segmentation"
    assert calls["aligned"]["seed"] == calls["profound_conv-seg-control-random"]["seed"] + 1  # not the same run
    assert exported == [str(tmp_path / "control" / "sources" / "aligned")]
    assert calls["unrelated"]["task"] == {"name": "pretrain_fcmae", "target": "noise"}
    checkpoints = {s: calls[f"profound_conv-seg-control-{s}"]["init"]["checkpoint"] for s in study_control.SOURCES}
    assert checkpoints == {"aligned": str(tmp_path / "control" / "sources" / "aligned" / "pretrained"),
                           "related": str(tmp_path / "pretraining" / "profound_conv" / "pretrained"),
                           "unrelated": str(tmp_path / "control" / "sources" / "unrelated" / "pretrained"),
                           "random": ""}
    assert [r.source for r in result.control.sources] == list(study_control.SOURCES)
    assert "Positive control: expected order" in open(result.outputs["report.md"], encoding="utf-8").read()
    # a second invocation reuses every run (the related pretraining is the matrix's, trained once)
    runner.run_study(config, str(tmp_path), log=lambda message: None)
    assert len(trainer.calls) == len(names)


@pytest.mark.slow
def test_smoke_control_end_to_end(tmp_path):
    from transfer_jax.study import runner

    config = load_config("study", "smoke,control")
    config.study.bootstrap = 0
    result = runner.run_study(config, str(tmp_path), log=lambda message: None)
    assert [r.source for r in result.control.sources] == list(study_control.SOURCES)
    assert os.path.isdir(tmp_path / "control" / "sources" / "aligned" / "pretrained")
    assert os.path.isfile(result.outputs["control.csv"])
    report = open(result.outputs["report.md"], encoding="utf-8").read()
    assert "Positive control: expected order" in report
    aligned = json.load(open(tmp_path / "control" / "runs" / "profound_conv-seg-control-aligned" / "summary.json"))
    assert aligned["init"] == "pretrained"


def test_noise_target_pretraining_regresses_noise():
    """The unrelated source's objective: the hidden patches regress per-sample noise, not the image."""
    import numpy as np

    from transfer_jax.tasks.pretraining import FCMAEPretrainTask

    config = load_config("pretrain_fcmae", "smoke,noise_target")
    task = FCMAEPretrainTask(config)
    image = np.random.default_rng(0).random((*task.crop_size, len(task.channels)), dtype=np.float32)
    sample = task.make_sample({"image": image, "case_index": 1})
    assert sample["target"].shape == image.shape
    assert abs(float(np.corrcoef(sample["target"].ravel(), image.ravel())[0, 1])) < 0.05
    assert "target" not in FCMAEPretrainTask(load_config("pretrain_fcmae", "smoke")).make_sample({"image": image})
    config.task.target = "labels"
    with pytest.raises(ValueError, match="task.target must be one of"):
        FCMAEPretrainTask(config)
