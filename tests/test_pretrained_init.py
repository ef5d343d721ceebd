"""Fine-tuning starts from a converted checkpoint: `--config.init.checkpoint=DIR` loads it, sizes included."""
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import fixture_path, smoke_config
from transfer_jax.convert.profound import convert_to_artifact
from transfer_jax.convert.table import flatten
from transfer_jax.train.loop import train_and_evaluate
from transfer_jax.train.pretrained import PretrainedMismatch

pytestmark = pytest.mark.slow  # every test is a training run


def _artifact(tmp_path, name="conv_fcmae.pth"):
    out = str(tmp_path / "artifact")
    convert_to_artifact(fixture_path("profound", name), out)
    return out


def _config(artifact, **overrides):
    return smoke_config(**{
        "init.mode": "pretrained", "init.checkpoint": artifact, "total_steps": 2, "eval_every": 2, "log_every": 2,
        "checkpoint_every": 2, "logging.tensorboard": False, "alignment.enabled": False, **overrides})


def test_frozen_backbone_keeps_the_pretrained_encoder(tmp_path):
    artifact = _artifact(tmp_path)
    config = _config(artifact, **{"optimizer.freeze_backbone": True})
    config.model.backbone_options.dims = (4, 4, 4, 4)  # wrong on purpose: the artifact's sizes win
    summary = train_and_evaluate(config, str(tmp_path / "run"))
    assert summary["init"] == "pretrained"
    assert summary["config"]["model"]["backbone_options"]["dims"] == [8, 16, 24, 32]

    saved = ocp.StandardCheckpointer().restore(os.path.join(str(tmp_path / "run"), "checkpoints", "2", "state"))
    trained = {k.removesuffix(".value"): np.asarray(v) for k, v in flatten(saved["params"]).items()}
    source = flatten(ocp.StandardCheckpointer().restore(os.path.join(artifact, "state")))
    encoder_keys = [k for k in source if k.startswith("encoder.") and not k.startswith("encoder.norm.")]
    assert len(encoder_keys) > 20
    for key in encoder_keys:
        np.testing.assert_array_equal(trained[key], np.asarray(source[key]), err_msg=key)
    # the head did train
    assert any(not np.allclose(trained[k], 0) for k in trained if k.startswith("decode_head."))


def test_shape_mismatch_lists_paths_and_suggests_dont_load(tmp_path):
    artifact = _artifact(tmp_path, "conv_upernet.pth.tar")  # a head for another number of classes
    config = _config(artifact)
    config.task.classes = ("gland", "lesion")
    with pytest.raises(PretrainedMismatch) as info:
        train_and_evaluate(config, str(tmp_path / "run"))
    assert "classifier" in str(info.value) and "init.dont_load" in str(info.value)
    config = _config(artifact, **{"init.dont_load": (r"classifier\.",)})
    summary = train_and_evaluate(config, str(tmp_path / "run2"))
    assert summary["steps"] == 2


def test_pretrained_without_checkpoint_is_an_error(tmp_path):
    config = smoke_config(**{"init.mode": "pretrained", "logging.tensorboard": False})
    with pytest.raises(ValueError, match=r"init.mode='pretrained' needs init.checkpoint .* init.allow_random=True"):
        train_and_evaluate(config, str(tmp_path / "run"))


def test_pretrained_without_checkpoint_is_a_loud_stand_in_when_allowed(tmp_path, capsys):
    config = smoke_config(**{"init.mode": "pretrained", "init.allow_random": True, "total_steps": 1,
                             "eval_every": 1, "log_every": 1, "checkpoint_every": 1, "logging.tensorboard": False,
                             "alignment.enabled": False})
    summary = train_and_evaluate(config, str(tmp_path / "run"))
    assert summary["init"] == "pretrained-random-standin"
    assert "RANDOM" in capsys.readouterr().out
