"""A run stopped hard after a checkpoint and restarted ends exactly where an uninterrupted run ends."""
import json
import os
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import HardStop, StopAfterCheckpoint, smoke_config
from transfer_jax.train.loop import train_and_evaluate

pytestmark = pytest.mark.slow  # whole training runs, interrupted and resumed


def _final_params(workdir: str, step: int):
    restored = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
    return restored


def _config(**overrides):
    config = smoke_config(**{"total_steps": 6, "checkpoint_every": 3, "eval_every": 3, "log_every": 3,
                             "logging.tensorboard": False, **overrides})
    config.model.backbone_options.drop_path_rate = 0.1
    return config


def test_interrupted_run_resumes_exactly(tmp_path):
    straight = str(tmp_path / "straight")
    summary = train_and_evaluate(_config(), straight)
    assert summary["steps"] == 6

    interrupted = str(tmp_path / "interrupted")
    with pytest.raises(HardStop):
        train_and_evaluate(_config(), interrupted, callbacks=[StopAfterCheckpoint(3)])
    assert sorted(os.listdir(os.path.join(interrupted, "checkpoints"))) == ["3"]
    assert not [t for t in threading.enumerate() if t.name == "input-wait-clock"]  # closed on the way out
    resumed = train_and_evaluate(_config(), interrupted)
    assert resumed["steps"] == 6

    a, b = _final_params(straight, 6), _final_params(interrupted, 6)
    a, b = (a["params"], a["opt_state"]), (b["params"], b["opt_state"])
    leaves_a = jax.tree_util.tree_leaves_with_path(a)
    leaves_b = dict(jax.tree_util.tree_leaves_with_path(b))
    assert leaves_a
    for path, value in leaves_a:
        np.testing.assert_allclose(np.asarray(leaves_b[path]), np.asarray(value), rtol=0, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
    # the data order is part of the contract: both runs saw the same losses at every logged step
    def losses(workdir):
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}

    assert losses(straight)[6] == pytest.approx(losses(interrupted)[6], abs=1e-6)


def test_finished_run_is_not_repeated(tmp_path):
    workdir = str(tmp_path / "run")
    first = train_and_evaluate(_config(total_steps=2, checkpoint_every=2, eval_every=2, log_every=2), workdir)
    again = train_and_evaluate(_config(total_steps=2, checkpoint_every=2, eval_every=2, log_every=2), workdir)
    assert again["steps"] == first["steps"] == 2
    assert again["history"] == first["history"]
