"""The trainer's data-wait clock: a fetch counts as device idle time only after the step it follows has finished."""
import json
import threading

import pytest

from helpers import FakeClock, FakeStepOutputs, SlowInput, smoke_config
from transfer_jax.train.input_wait import InputWaitClock


def _watchers() -> int:
    return sum(t.name == "input-wait-clock" for t in threading.enumerate())


def test_fetch_is_idle_time_only_after_the_step_finished():
    clock, before = FakeClock(), _watchers()
    wait = InputWaitClock(clock)
    assert _watchers() == before + 1
    try:
        running = FakeStepOutputs()  # still running when its batch arrives: the fetch hid behind it
        wait.dispatched(1, running)
        assert wait.idle_seconds(1, running, 0.0, 5.0) == 0.0
        clock.now = 6.0
        running.finish()
        clock.watched()

        finishing = FakeStepOutputs()  # finishes at t=10 in the middle of a fetch from t=9 to t=12
        wait.dispatched(2, finishing)
        clock.now = 10.0
        finishing.finish()
        assert wait.idle_seconds(2, finishing, 9.0, 12.0) == 2.0

        done = FakeStepOutputs()  # finished at t=20, before a fetch from t=21 to t=21.5: all of it is idle
        wait.dispatched(3, done)
        clock.now = 20.0
        done.finish()
        clock.watched()
        assert wait.idle_seconds(3, done, 21.0, 21.5) == 0.5
    finally:
        wait.close()
    assert _watchers() == before


@pytest.mark.slow
def test_trainer_reports_slow_input_and_hints(tmp_path, capsys):
    from transfer_jax.train.loop import train_and_evaluate

    config = smoke_config(total_steps=6, log_every=2, eval_every=6, checkpoint_every=6,
                          **{"alignment.enabled": False})
    train_and_evaluate(config, str(tmp_path / "run"), callbacks=[SlowInput(0.4)])
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        windows = [r for r in map(json.loads, f) if "train/data_wait_fraction" in r]
    assert [r["step"] for r in windows] == [2, 4, 6]
    for record in windows[1:]:  # after the warm-up window: each step waits ~0.4 s for a batch that takes ~0.03 s
        assert record["train/data_wait_fraction"] > 0.5
        assert record["train/input_fetch_fraction"] >= record["train/data_wait_fraction"]
    assert "the devices sat idle waiting for the next batch" in capsys.readouterr().out
