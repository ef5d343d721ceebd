"""The trainer's data-wait clock: a fetch counts as device idle time only after the step it follows has finished."""
import json
import time

import jax
import jax.numpy as jnp
import pytest

from transfer_jax.train.input_wait import InputWaitClock


def test_fetch_is_idle_time_only_after_the_step_finished():
    step = jax.jit(lambda x: {"y": jnp.tanh(x @ x) @ x})  # ~0.1 s on one CPU core: still running right after dispatch
    x = jnp.ones((1536, 1536)) / 1536
    jax.block_until_ready(step(x))
    clock = InputWaitClock()
    try:
        fetch_start = time.perf_counter()
        outputs = step(x)
        clock.dispatched(1, outputs)
        assert clock.idle_seconds(1, outputs, fetch_start, time.perf_counter()) == 0.0  # hidden behind the step
        jax.block_until_ready(outputs)

        outputs = step(x)
        clock.dispatched(2, outputs)
        fetch_start = time.perf_counter()
        jax.block_until_ready(outputs)
        time.sleep(0.1)  # a slow batch: the devices wait for it
        fetch_end = time.perf_counter()
        idle = clock.idle_seconds(2, outputs, fetch_start, fetch_end)
        assert 0.09 < idle <= fetch_end - fetch_start
    finally:
        clock.close()
    assert not clock._thread.is_alive()


@pytest.mark.slow
def test_trainer_reports_slow_input_and_hints(tmp_path, capsys):
    from helpers import smoke_config
    from transfer_jax.train.loop import train_and_evaluate

    config = smoke_config(total_steps=6, log_every=2, eval_every=6, checkpoint_every=6,
                          **{"debug.input_delay_seconds": 0.4, "alignment.enabled": False})
    train_and_evaluate(config, str(tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        windows = [r for r in map(json.loads, f) if "train/data_wait_fraction" in r]
    assert [r["step"] for r in windows] == [2, 4, 6]
    for record in windows[1:]:  # after the warm-up window: each step waits ~0.4 s for a batch that takes ~0.03 s
        assert record["train/data_wait_fraction"] > 0.5
        assert record["train/input_fetch_fraction"] >= record["train/data_wait_fraction"]
    assert "the devices sat idle waiting for the next batch" in capsys.readouterr().out
