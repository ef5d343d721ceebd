"""The study runner: matrix planning, resuming, skips and errors (fake trainer), then one real end-to-end study."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap

import pytest
from helpers import REPO, load_config

from transfer_jax.study import report, runner
from transfer_jax.train import loop


def study_config(preset="smoke", pretraining=False, **study_fields):
    """The study config on seg x profound_conv; without the JAX pretraining stage unless `pretraining`."""
    config = load_config("study", preset)
    config.study.tasks = ("seg",)
    config.study.backbones = ("profound_conv",)
    config.study.bootstrap = 200
    if not pretraining:
        config.study.pretraining = {}
    config.study.update(study_fields)
    return config


class FakeTrainer:
    """Stands in for `train_and_evaluate`: records its calls and writes a summary like the trainer's."""

    def __init__(self, stop_after: int | None = None, error: Exception | None = None):
        self.calls: list[tuple[str, dict]] = []
        self.stop_after, self.error = stop_after, error

    def __call__(self, config, workdir):
        self.calls.append((os.path.basename(workdir), json.loads(config.to_json_best_effort())))
        if self.error is not None:
            raise self.error
        os.makedirs(workdir, exist_ok=True)
        pretrained = config.init.mode == "pretrained"
        steps = self.stop_after or config.total_steps
        summary = {
            "task": config.task.name, "backbone": config.model.backbone, "primary_metric": "dice_mean",
            "direction": "max", "best": 0.8 if pretrained else 0.6, "best_step": steps, "steps": steps,
            "stopped_early": False, "history": [{"step": steps, "metrics": {"dice_mean": 0.5}}],
            "steps_to_95pct_gain": 2 if pretrained else 4, "init": config.init.mode, "wall_seconds": 0.1,
            "config": json.loads(config.to_json_best_effort()),
            "alignment": {"pooled": {"mmd2_unbiased": 0.1 if pretrained else 0.5, "p_value": 0.02,
                                     "cka_linear": 0.9, "trajectory": [[0, 0.0], [steps, 0.1]]}},
        }
        if config.task.name.startswith("pretrain_"):  # the real trainer exports an artifact at the end
            summary["pretrained_artifact"] = os.path.join(workdir, "pretrained")
            os.makedirs(summary["pretrained_artifact"], exist_ok=True)
            with open(os.path.join(summary["pretrained_artifact"], "model.json"), "w", encoding="utf-8") as f:
                json.dump({"format_version": 1, "model": config.model.backbone, "config": {}}, f)
        with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f)
        return summary


@pytest.fixture
def fake_trainer(monkeypatch):
    trainer = FakeTrainer()
    monkeypatch.setattr(loop, "train_and_evaluate", trainer)
    return trainer


def run_names(calls):
    return [name for name, _ in calls]


# -- resuming -----------------------------------------------------------------------------------------------------

def test_second_invocation_does_not_retrain_finished_runs(tmp_path, fake_trainer):
    config = study_config()
    first = runner.run_study(config, str(tmp_path), log=lambda _: None)
    assert run_names(fake_trainer.calls) == ["profound_conv-seg-pretrained", "profound_conv-seg-scratch"]
    assert [r.status for r in first.runs] == ["trained", "trained"]
    assert first.analysis.rows[0].relative_gain == pytest.approx((0.8 - 0.6) / 0.6)

    second = runner.run_study(study_config(), str(tmp_path), log=lambda _: None)
    assert len(fake_trainer.calls) == 2
    assert [r.status for r in second.runs] == ["reused", "reused"]
    assert [r.reason for r in second.runs] == ["", ""]
    assert second.analysis.rows[0].relative_gain == pytest.approx(first.analysis.rows[0].relative_gain)


def test_half_finished_and_missing_summaries_are_handed_back_to_the_trainer(tmp_path, monkeypatch):
    interrupted = FakeTrainer(stop_after=2)  # writes summaries that stop short of total_steps (4 in smoke)
    monkeypatch.setattr(loop, "train_and_evaluate", interrupted)
    runner.run_study(study_config(), str(tmp_path), log=lambda _: None)

    resumed = FakeTrainer()
    monkeypatch.setattr(loop, "train_and_evaluate", resumed)
    os.remove(os.path.join(tmp_path, "runs", "profound_conv-seg-scratch", "summary.json"))
    result = runner.run_study(study_config(), str(tmp_path), log=lambda _: None)
    assert run_names(resumed.calls) == ["profound_conv-seg-pretrained", "profound_conv-seg-scratch"]
    assert [r.status for r in result.runs] == ["trained", "trained"]

    # An early stop counts as finished even short of total_steps.
    summary_path = os.path.join(tmp_path, "runs", "profound_conv-seg-pretrained", "summary.json")
    summary = json.load(open(summary_path, encoding="utf-8"))
    summary.update(steps=1, stopped_early=True)
    json.dump(summary, open(summary_path, "w", encoding="utf-8"))
    runner.run_study(study_config(), str(tmp_path), log=lambda _: None)
    assert len(resumed.calls) == 2


def test_raising_total_steps_resumes_and_a_changed_override_is_reported(tmp_path, fake_trainer):
    runner.run_study(study_config(), str(tmp_path), log=lambda _: None)
    longer = study_config()
    longer.study.overrides["total_steps"] = 8
    runner.run_study(longer, str(tmp_path), log=lambda _: None)
    assert len(fake_trainer.calls) == 4
    assert fake_trainer.calls[-1][1]["total_steps"] == 8

    shorter_lr = study_config()
    shorter_lr.study.overrides["optimizer.lr"] = 0.5
    result = runner.run_study(shorter_lr, str(tmp_path), log=lambda _: None)
    assert len(fake_trainer.calls) == 4  # finished runs are kept...
    assert all("different config (total_steps, optimizer.lr)" in r.reason for r in result.runs)  # ...and flagged
    assert "different config" in open(result.outputs["report.md"], encoding="utf-8").read()


# -- the JAX pretraining stage ------------------------------------------------------------------------------------

def test_pretraining_runs_first_and_initialises_the_pretrained_runs(tmp_path, fake_trainer):
    config = study_config(pretraining=True)
    config.study.pretraining_overrides = {"total_steps": 3}
    study_dir = tmp_path / "study"
    result = runner.run_study(config, str(study_dir), log=lambda _: None)
    assert run_names(fake_trainer.calls) == ["profound_conv", "profound_conv-seg-pretrained",
                                             "profound_conv-seg-scratch"]
    calls = [c for _, c in fake_trainer.calls]
    assert calls[0]["task"]["name"] == "pretrain_fcmae" and calls[0]["total_steps"] == 3
    assert calls[0]["model"]["backbone_options"]["dims"] == [8, 16, 16, 32]  # the study's smoke preset
    artifact = str(study_dir / "pretraining" / "profound_conv" / "pretrained")
    assert calls[1]["init"] == {"mode": "pretrained", "checkpoint": artifact, "allow_random": False, "dont_load": []}
    assert calls[2]["init"]["checkpoint"] == ""
    runs = json.load(open(result.outputs["runs.json"], encoding="utf-8"))
    assert runs[0]["task"] == "pretraining" and runs[0]["status"] == "trained"
    assert "Pretraining" in open(result.outputs["report.md"], encoding="utf-8").read()
    assert (study_dir / "configs" / "profound_conv-pretraining.json").exists()

    again = runner.run_study(config, str(study_dir), log=lambda _: None)
    assert len(fake_trainer.calls) == 3
    assert json.load(open(again.outputs["runs.json"], encoding="utf-8"))[0]["status"] == "reused"
    # a finished pretraining run whose artifact is gone goes back to the trainer (which re-exports it)
    import shutil

    shutil.rmtree(artifact)
    runner.run_study(config, str(study_dir), log=lambda _: None)
    assert run_names(fake_trainer.calls)[3:] == ["profound_conv"]


def test_given_checkpoints_and_scratch_only_studies_skip_pretraining(tmp_path, fake_trainer):
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    config = study_config(pretraining=True)
    config.study.pretrained_checkpoints["profound_conv"] = str(artifact)
    runner.run_study(config, str(tmp_path / "a"), log=lambda _: None)
    assert run_names(fake_trainer.calls) == ["profound_conv-seg-pretrained", "profound_conv-seg-scratch"]
    runner.run_study(study_config(pretraining=True, inits=("scratch",)), str(tmp_path / "b"), log=lambda _: None)
    assert run_names(fake_trainer.calls)[2:] == ["profound_conv-seg-scratch"]


@pytest.mark.parametrize("field, value, message", [
    ("pretraining", {"profound_conv": "seg"}, r"study\.pretraining\.profound_conv must name a pretraining config"),
    ("pretraining", {"profound_conv": "pretrain_nothing"}, r"pretraining config .*pretrain_nothing\.py does not"),
    ("pretraining", {"profound_conv": "pretrain_mae"}, r"pretrain_mae\.py pretrains 'profound_vit'"),
    ("pretraining", {"resnet": "pretrain_mae"}, r"study\.pretraining: unknown backbone"),
    ("pretraining_overrides", {"totl_steps": 1},
     r"study\.pretraining_overrides\['totl_steps'\]: configs/pretrain_fcmae\.py has no field"),
])
def test_bad_pretraining_fields_are_named(tmp_path, fake_trainer, field, value, message):
    config = study_config(pretraining=True)
    config.study[field] = value
    with pytest.raises(runner.StudyConfigError, match=message):
        runner.run_study(config, str(tmp_path), log=lambda _: None)
    assert fake_trainer.calls == []


# -- seeds and arms -----------------------------------------------------------------------------------------------

def test_seeds_repeat_every_run_and_adding_one_trains_only_the_new_runs(tmp_path, fake_trainer):
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    config = study_config(seeds=2)
    config.study.pretrained_checkpoints["profound_conv"] = str(artifact)
    result = runner.run_study(config, str(tmp_path / "study"), log=lambda _: None)
    assert run_names(fake_trainer.calls) == ["profound_conv-seg-pretrained", "profound_conv-seg-scratch",
                                             "profound_conv-seg-pretrained-seed1", "profound_conv-seg-scratch-seed1"]
    configs = dict(fake_trainer.calls)
    base = load_config("seg", "profound_conv,smoke").seed
    assert [configs[name]["seed"] for name in run_names(fake_trainer.calls)] == [base, base, base + 1, base + 1]
    # the same pretrained artifact for every seed; only the seed (head init, data order, augmentation) differs
    assert configs["profound_conv-seg-pretrained"]["init"] == configs["profound_conv-seg-pretrained-seed1"]["init"]
    assert result.analysis.rows[0].seeds == 2

    config.study.seeds = 3
    again = runner.run_study(config, str(tmp_path / "study"), log=lambda _: None)
    assert run_names(fake_trainer.calls)[4:] == ["profound_conv-seg-pretrained-seed2",
                                                 "profound_conv-seg-scratch-seed2"]
    assert [r.status for r in again.runs] == ["reused"] * 4 + ["trained"] * 2
    assert again.analysis.rows[0].seeds == 3


def test_the_probe_arm_freezes_the_pretrained_backbone(tmp_path, fake_trainer):
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    config = study_config(arms=("finetune", "probe"))
    config.study.pretrained_checkpoints["profound_conv"] = str(artifact)
    result = runner.run_study(config, str(tmp_path / "study"), log=lambda _: None)
    configs = dict(fake_trainer.calls)
    assert list(configs) == ["profound_conv-seg-pretrained", "profound_conv-seg-scratch",
                             "profound_conv-seg-pretrained-probe"]
    probe = configs["profound_conv-seg-pretrained-probe"]
    assert probe["optimizer"]["freeze_backbone"] and probe["init"]["checkpoint"] == str(artifact)
    assert not configs["profound_conv-seg-pretrained"]["optimizer"]["freeze_backbone"]
    row = result.analysis.rows[0]
    assert row.probe.mean == 0.8 and row.probe_gap.mean == 0.0  # the fake trainer's probe scores as fine-tuning
    with pytest.raises(runner.StudyConfigError, match=r"study\.arms must include 'finetune'"):
        runner.run_study(study_config(arms=("probe",)), str(tmp_path / "other"), log=lambda _: None)


# -- the matrix, configs and outputs ------------------------------------------------------------------------------

def test_run_configs_carry_init_and_overrides_and_are_saved(tmp_path, fake_trainer):
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    config = study_config()
    config.study.overrides["total_steps"] = 3
    config.study.overrides["optimizer.lr"] = 0.25
    config.study.pretrained_checkpoints["profound_conv"] = str(artifact)
    result = runner.run_study(config, str(tmp_path / "study"), log=lambda _: None)
    configs = dict(fake_trainer.calls)
    pretrained, scratch = configs["profound_conv-seg-pretrained"], configs["profound_conv-seg-scratch"]
    assert (pretrained["init"]["mode"], scratch["init"]["mode"]) == ("pretrained", "scratch")
    assert pretrained["init"]["checkpoint"] == str(artifact) and scratch["init"]["checkpoint"] == ""
    for run_config in (pretrained, scratch):
        assert run_config["total_steps"] == 3 and run_config["optimizer"]["lr"] == 0.25
        assert run_config["model"]["backbone_options"]["dims"] == [8, 16, 16, 32]  # the smoke preset
    saved = json.load(open(tmp_path / "study" / "configs" / "profound_conv-seg-pretrained.json", encoding="utf-8"))
    assert saved == pretrained
    runs = json.load(open(result.outputs["runs.json"], encoding="utf-8"))
    assert [(r["name"], r["status"]) for r in runs] == [("profound_conv-seg-pretrained", "trained"),
                                                        ("profound_conv-seg-scratch", "trained")]


def test_missing_task_configs_and_unsupported_backbones_are_skipped_with_reasons(tmp_path, monkeypatch,
                                                                                 fake_trainer):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "seg.py").write_text(textwrap.dedent("""
        import ml_collections
        from transfer_jax.config import base_config

        def get_config(arg):
            backbone, preset = arg.split(",")
            if backbone != "profound_conv":
                raise ValueError(f"backbone {backbone!r} is not supported here")
            c = base_config()
            c.task = ml_collections.ConfigDict(dict(name="segmentation"))
            c.model = ml_collections.ConfigDict(dict(backbone=backbone))
            return c
        """))
    monkeypatch.setenv(runner.CONFIGS_ENV, str(configs))
    config = study_config(tasks=("seg", "cls"), backbones=("profound_conv", "provicnet"))
    result = runner.run_study(config, str(tmp_path / "study"), log=lambda _: None)
    assert run_names(fake_trainer.calls) == ["profound_conv-seg-pretrained", "profound_conv-seg-scratch"]
    status = {r.name: (r.status, r.reason) for r in result.runs}
    assert len(status) == 8
    assert status["provicnet-seg-scratch"][0] == "skipped"
    assert "does not support provicnet" in status["provicnet-seg-scratch"][1]
    assert status["profound_conv-cls-pretrained"][0] == "skipped"
    assert "cls.py does not exist yet" in status["profound_conv-cls-pretrained"][1]
    text = open(result.outputs["report.md"], encoding="utf-8").read()
    assert "does not support provicnet" in text and "cls.py does not exist yet" in text
    assert [row.label for row in result.analysis.rows] == ["profound_conv/seg"]


def test_a_config_bug_that_is_not_about_the_backbone_propagates(tmp_path, monkeypatch, fake_trainer):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "seg.py").write_text("def get_config(arg):\n    raise ValueError('task.classes is wrong')\n")
    monkeypatch.setenv(runner.CONFIGS_ENV, str(configs))
    with pytest.raises(ValueError, match="task.classes is wrong"):
        runner.run_study(study_config(), str(tmp_path / "study"), log=lambda _: None)
    assert fake_trainer.calls == []


def test_a_training_failure_is_raised_naming_the_run(tmp_path, monkeypatch):
    failing = FakeTrainer(error=FloatingPointError("loss is NaN"))
    monkeypatch.setattr(loop, "train_and_evaluate", failing)
    with pytest.raises(FloatingPointError, match="loss is NaN") as caught:
        runner.run_study(study_config(), str(tmp_path), log=lambda _: None)
    assert any("profound_conv-seg-pretrained" in note for note in caught.value.__notes__)
    assert len(failing.calls) == 1  # stops at the first failure
    assert not os.path.exists(tmp_path / "report.md")


@pytest.mark.parametrize("field, value, message", [
    ("tasks", ("seg", "segmentation"), r"study\.tasks: unknown \['segmentation'\]"),
    ("backbones", ("resnet",), r"study\.backbones: unknown \['resnet'\]"),
    ("inits", ("pretrained", "imagenet"), r"study\.inits: unknown \['imagenet'\]"),
    ("inits", (), r"study\.inits is empty"),
    ("tasks", ("seg", "seg"), r"study\.tasks lists a name twice"),
    ("preset", "huge", r"study\.preset must be one of"),
    ("bootstrap", -1, r"study\.bootstrap must be an integer >= 0"),
    ("seeds", 0, r"study\.seeds must be an integer >= 1"),
    ("arms", ("finetune", "frozen"), r"study\.arms: unknown \['frozen'\]"),
])
def test_bad_study_fields_are_named(tmp_path, fake_trainer, field, value, message):
    config = study_config()
    config.study[field] = value
    with pytest.raises(runner.StudyConfigError, match=message):
        runner.run_study(config, str(tmp_path), log=lambda _: None)
    assert fake_trainer.calls == []


def test_task_overrides_change_only_that_tasks_runs(tmp_path, fake_trainer):
    config = study_config(tasks=("seg", "cls"), inits=("scratch",))
    config.study.overrides["total_steps"] = 3
    config.study.task_overrides = {"cls": {"total_steps": 5, "data": {"phantom": {"num_val": 7}}}}
    runner.run_study(config, str(tmp_path / "study"), log=lambda _: None)
    configs = dict(fake_trainer.calls)
    assert configs["profound_conv-seg-scratch"]["total_steps"] == 3
    assert configs["profound_conv-cls-scratch"]["total_steps"] == 5
    assert configs["profound_conv-cls-scratch"]["data"]["phantom"]["num_val"] == 7
    config.study.task_overrides = {"cls": {"totl_steps": 5}}
    with pytest.raises(runner.StudyConfigError, match=r"study\.task_overrides\.cls\['totl_steps'\]"):
        runner.run_study(config, str(tmp_path / "other"), log=lambda _: None)
    config.study.task_overrides = {"classification": {"total_steps": 5}}
    with pytest.raises(runner.StudyConfigError, match=r"study\.task_overrides: unknown task 'classification'"):
        runner.run_study(config, str(tmp_path / "other"), log=lambda _: None)


@pytest.mark.parametrize("key, message", [
    ("totl_steps", r"study\.overrides\['totl_steps'\]: configs/seg\.py has no field 'totl_steps'"),
    ("optimiser.lr", r"study\.overrides\['optimiser\.lr'\]: configs/seg\.py has no config block 'optimiser'"),
    ("init.mode", r"study\.overrides\['init\.mode'\]: the study sets init\.\* itself"),
])
def test_bad_overrides_are_named(tmp_path, fake_trainer, key, message):
    config = study_config()
    config.study.overrides[key] = 1
    with pytest.raises(runner.StudyConfigError, match=message):
        runner.run_study(config, str(tmp_path), log=lambda _: None)
    assert fake_trainer.calls == []


def test_unknown_study_field_and_missing_checkpoint_fail_before_training(tmp_path, fake_trainer):
    config = study_config()
    config.study.boostrap = 10
    with pytest.raises(runner.StudyConfigError, match=r"study\.boostrap is not a study field"):
        runner.run_study(config, str(tmp_path), log=lambda _: None)
    config = study_config()
    config.study.pretrained_checkpoints["profound_conv"] = str(tmp_path / "not-converted-yet")
    with pytest.raises(runner.StudyConfigError, match=r"study\.pretrained_checkpoints\.profound_conv: .* is not a"):
        runner.run_study(config, str(tmp_path), log=lambda _: None)
    # ...but not when only scratch runs are asked for
    config.study.inits = ("scratch",)
    runner.run_study(config, str(tmp_path), log=lambda _: None)
    assert run_names(fake_trainer.calls) == ["profound_conv-seg-scratch"]


def test_study_presets():
    smoke, cpu, full = (load_config("study", preset) for preset in ("smoke", "cpu", "full"))
    for config in (smoke, cpu, full):
        spec = runner.parse_study(config)
        assert spec.tasks == ("seg", "cls", "sr", "distortion", "synthesis")
        assert spec.backbones == ("profound_conv", "profound_vit", "provicnet")
        assert spec.inits == ("pretrained", "scratch") and spec.bootstrap == 2000
    assert runner.parse_study(smoke).preset == "smoke" and runner.parse_study(smoke).overrides == {}
    assert runner.parse_study(cpu).overrides["total_steps"] == 60
    assert runner.parse_study(cpu).task_overrides["cls"]["data.phantom.num_val"] == 12
    assert runner.parse_study(cpu).task_overrides["sr"] == {"task.gland_loss_weight": 4.0}
    full_spec = runner.parse_study(full)
    assert full_spec.preset == "full"
    assert set(full_spec.pretrained_checkpoints) == set(full_spec.backbones)
    with pytest.raises(ValueError, match="not a study preset"):
        load_config("study", "gpu")


@pytest.mark.slow
def test_command_line_entry_reports_skips_and_names_bad_fields(tmp_path):
    env = dict(os.environ, **{runner.CONFIGS_ENV: str(tmp_path / "no-task-configs-yet"), "JAX_PLATFORMS": "cpu"})
    os.makedirs(env[runner.CONFIGS_ENV])
    command = [sys.executable, "-m", "transfer_jax.study", f"--config={REPO}/configs/study.py:smoke",
               f"--workdir={tmp_path / 'study'}", "--config.study.tasks=('seg','cls')",
               "--config.study.overrides.total_steps=2"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "seg.py does not exist yet" in open(tmp_path / "study" / "report.md", encoding="utf-8").read()
    study = json.load(open(tmp_path / "study" / "configs" / "study.json", encoding="utf-8"))["study"]
    assert study["tasks"] == ["seg", "cls"] and study["overrides"] == {"total_steps": 2}

    done = subprocess.run(command[:-2] + ["--config.study.tasks=('seg','segmentation')"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "study.tasks: unknown ['segmentation']" in done.stderr


# -- end to end with the real trainer -----------------------------------------------------------------------------

@pytest.mark.slow
def test_smoke_study_end_to_end_with_the_real_trainer(tmp_path):
    config = study_config(pretraining=True, seeds=2)
    # Two steps with an evaluation after each: enough for a best value, a convergence step and a trajectory.
    config.study.overrides.update({"total_steps": 2, "eval_every": 1, "log_every": 1, "checkpoint_every": 2,
                                   "logging.tensorboard": False})
    config.study.pretraining_overrides = {"total_steps": 2, "logging": {"tensorboard": False}}
    study_dir = tmp_path / "study"
    result = runner.run_study(config, str(study_dir), log=lambda _: None)
    assert [r.status for r in result.runs] == ["trained"] * 4
    artifact = str(study_dir / "pretraining" / "profound_conv" / "pretrained")
    step0 = []
    for run in ("profound_conv-seg-pretrained", "profound_conv-seg-pretrained-seed1"):
        pretrained_summary = json.load(open(study_dir / "runs" / run / "summary.json", encoding="utf-8"))
        assert pretrained_summary["init"] == "pretrained"  # the JAX pretraining artifact, not a random stand-in
        assert pretrained_summary["config"]["init"]["checkpoint"] == artifact
        step0.append(pretrained_summary["history"][0])
    # the same backbone weights, another head initialisation: the untrained step-0 predictions differ
    assert step0[0]["step"] == step0[1]["step"] == 0 and step0[0]["metrics"] != step0[1]["metrics"]

    for run in ("profound_conv-seg-pretrained", "profound_conv-seg-scratch", "profound_conv-seg-scratch-seed1"):
        summary = json.load(open(study_dir / "runs" / run / "summary.json", encoding="utf-8"))
        assert summary["steps"] == 2
        assert json.load(open(study_dir / "configs" / f"{run}.json", encoding="utf-8"))["init"]["mode"] == run.split("-")[2]
    for name in ("results.csv", "correlations.csv", "report.md", "report.html", "environment.json", "runs.json"):
        assert (study_dir / name).stat().st_size > 0, name
    assert (study_dir / "configs" / "study.json").exists()

    with open(study_dir / "results.csv", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns, rows = reader.fieldnames, list(reader)
    assert columns == report.result_columns(result.analysis.sites)
    (row,) = rows
    assert (row["backbone"], row["task"], row["task_name"], row["primary_metric"], row["direction"]) == (
        "profound_conv", "seg", "segmentation", "dice_mean", "max")
    assert 0.0 <= float(row["pretrained_best"]) <= 1.0 and 0.0 <= float(row["scratch_best"]) <= 1.0
    assert int(row["pretrained_steps"]) == 2 and int(row["scratch_steps"]) == 2

    markdown = open(study_dir / "report.md", encoding="utf-8").read()
    assert "How to read this" in markdown and "mean [95 % interval] over seeds" in markdown
    analysis_row = result.analysis.rows[0]
    plots = study_dir / "plots"
    assert (plots / "gain_by_task.png").exists() == (analysis_row.relative_gain is not None)
    if result.analysis.sites:  # the trainer measures alignment: every site reaches the csv and the plots
        assert all(row[f"mmd2_{site}"] != "n/a" for site in result.analysis.sites)
        assert (plots / "scatter_mmd2_vs_relative_gain.png").exists() == (analysis_row.relative_gain is not None)
        assert (plots / "mmd2_trajectories.png").exists()
    else:
        assert "Alignment: n/a" in markdown
    env = json.load(open(study_dir / "environment.json", encoding="utf-8"))
    assert env["devices"]["backend"] == "cpu" and env["packages"]["jax"] == __import__("jax").__version__

    assert "Pretraining" in open(study_dir / "report.md", encoding="utf-8").read()

    again = runner.run_study(config, str(study_dir), log=lambda _: None)
    assert [r.status for r in again.runs] == ["reused"] * 4
