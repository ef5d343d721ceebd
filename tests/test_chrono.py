"""The loop's throughput accounting on a hand-moved clock: pauses, warm-up, medians, input waits, FLOP rates."""
import pytest

from helpers import FakeClock, FakeStepOutputs
from transfer_jax.train.chrono import Chrono, StepCost


def _step(chrono: Chrono, clock: FakeClock, step: int, compute: float, fetch: float, *, hidden: bool) -> None:
    """A step busy on the devices for `compute` s; its next batch takes `fetch` s, during the step when `hidden`
    (the step's time is `compute`), after it otherwise (the devices wait: `compute + fetch`)."""
    outputs = FakeStepOutputs()
    chrono.dispatched(step, outputs)
    if not hidden:
        clock.advance(compute)
        outputs.finish()
        clock.watched()
    chrono.fetch(step, outputs, lambda: clock.advance(fetch))
    if hidden:
        clock.advance(compute - fetch)
        outputs.finish()
        clock.watched()


def test_windows_steady_median_input_fractions_and_rates():
    clock = FakeClock()
    cost = StepCost(batch_size=4, model_flops=8e12, num_devices=2, peak_flops=4e12)
    with Chrono(cost, first_step=0, warmup_steps=2, accounts=("alignment",), clock=clock) as chrono:
        with chrono.paused(), chrono.accounted("alignment"):  # the step-0 evaluation: not step time
            clock.advance(5.0)
        figures = []
        for first, compute, fetch, hidden in [(1, 3.0, 1.0, False), (3, 2.0, 1.0, True), (5, 1.0, 2.0, False),
                                              (7, 6.0, 1.0, True)]:
            _step(chrono, clock, first, compute, fetch, hidden=hidden)
            if first == 1:
                with chrono.paused():  # an evaluation or a checkpoint inside the window
                    clock.advance(10.0)
            _step(chrono, clock, first + 1, compute, fetch, hidden=hidden)
            figures.append(chrono.window(first + 1))
            figures[-1]["hint"] = chrono.input_hint(first + 1, figures[-1])
        summary = chrono.summary()

    warmup, hidden, waiting, slow = figures
    assert warmup["step_seconds"] == 4.0  # (2 x (3 + 1) + 10 paused - 10) / 2
    assert warmup["data_wait_fraction"] == warmup["input_fetch_fraction"] == 0.25
    assert warmup["hint"] is None  # warm-up windows never hint
    assert (warmup["volumes_per_second"], warmup["tflops_per_device"], warmup["mfu"]) == (1.0, 1.0, 0.25)
    assert hidden["step_seconds"] == 2.0
    assert (hidden["data_wait_fraction"], hidden["input_fetch_fraction"], hidden["hint"]) == (0.0, 0.5, None)
    assert waiting["step_seconds"] == 3.0
    assert waiting["data_wait_fraction"] == waiting["input_fetch_fraction"] == pytest.approx(4 / 6)
    assert "the devices sat idle waiting for the next batch 67%" in waiting["hint"]
    assert slow["step_seconds"] == 6.0

    assert summary["steady_step_seconds"] == 3.0  # median of 2, 3 and 6; the warm-up window left out
    assert summary["volumes_per_second"] == pytest.approx(4 / 3)
    assert summary["tflops_per_device"] == pytest.approx(8 / 3 / 2)
    assert summary["mfu"] == pytest.approx(1 / 3)
    assert summary["alignment_seconds"] == 5.0
    assert summary["alignment_share"] == pytest.approx(5.0 / 45.0)  # 5 + 8 + 10 + 4 + 6 + 12 seconds in all


def test_rates_without_a_known_peak_and_summary_before_any_steady_window():
    cost = StepCost(batch_size=2, model_flops=1e12, num_devices=1)
    assert cost.rates(0.5) == {"volumes_per_second": 4.0, "tflops_per_device": 2.0}
    clock = FakeClock()
    with Chrono(cost, first_step=10, warmup_steps=5, clock=clock) as chrono:
        _step(chrono, clock, 11, 1.0, 0.5, hidden=True)
        assert "mfu" not in chrono.window(11)
        assert chrono.summary() == {}
