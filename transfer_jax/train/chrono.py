"""Throughput accounting of the step loop, after big_vision's `Chrono`.

The loop reports to it (a step dispatched, a batch fetched, a pause for evaluation or a checkpoint) and reads
figures back once per logging window. A window's step time is its wall time, less the pauses, over its steps.
The first window after a (re)start holds the compilation warm-up, so it is logged but left out of the steady
step time, the median over the later windows. Two input figures per window: `input_fetch_fraction`, the share
of the window the training thread spent fetching batches, and `data_wait_fraction`, the part of those fetches
during which the devices had nothing left to run (`input_wait.InputWaitClock`). Model FLOPs per step turn a step
time into achieved TFLOP/s per device and, where the device's peak is known, MFU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from typing import Any, Callable, Iterable, Optional

from transfer_jax.train.input_wait import InputWaitClock

# Above this share of a steady window spent with idle devices, the log suggests feeding the devices faster.
DATA_WAIT_HINT_FRACTION = 0.05


@dataclasses.dataclass(frozen=True)
class StepCost:
    """What one train step processes: `batch_size` volumes and `model_flops` over `num_devices` devices whose
    peak is `peak_flops` FLOP/s each (None when unknown)."""
    batch_size: int
    model_flops: float
    num_devices: int
    peak_flops: Optional[float] = None

    def rates(self, step_seconds: float) -> dict[str, float]:
        """Volumes per second, achieved model TFLOP/s per device and, where the peak is known, MFU."""
        per_device = self.model_flops / step_seconds / self.num_devices
        rates = {"volumes_per_second": self.batch_size / step_seconds, "tflops_per_device": per_device / 1e12}
        if self.peak_flops:
            rates["mfu"] = per_device / self.peak_flops
        return rates


class Chrono:
    """Step timing of one training session (from a start or a resume to the end of the loop).

    `first_step`: the step the session starts from; windows ending within `warmup_steps` of it are warm-up.
    `accounts`: names of side work (e.g. "alignment") whose time `accounted` sums, reported as `<name>_seconds`
    and `<name>_share` of the session. `clock` is injectable for tests; use it as a context manager (or call
    `close`) so that the device watcher stops.
    """

    def __init__(self, cost: StepCost, *, first_step: int, warmup_steps: int, accounts: Iterable[str] = (),
                 clock: Callable[[], float] = time.perf_counter):
        self.cost = cost
        self._first_step, self._warmup_steps = first_step, warmup_steps
        self._clock = clock
        self._input_wait = InputWaitClock(clock)
        self._start = clock()
        self._accounts = dict.fromkeys(accounts, 0.0)
        self._steady: list[float] = []
        self._new_window()

    def _new_window(self) -> None:
        self._window_start, self._window_steps = self._clock(), 0
        self._paused = self._fetching = self._waiting = 0.0

    def warmed_up(self, step: int) -> bool:
        """Whether the window ending at `step` is past the warm-up."""
        return step > self._first_step + self._warmup_steps

    def dispatched(self, step: int, outputs: Any) -> None:
        """Step `step` was handed to the devices; `outputs` are arrays it produces that nothing donates later."""
        self._window_steps += 1
        self._input_wait.dispatched(step, outputs)

    def fetch(self, step: int, outputs: Any, next_batch: Callable[[], Any]) -> Any:
        """`next_batch()`, timed as the fetch that follows step `step` (whose `outputs` were dispatched)."""
        start = self._clock()
        batch = next_batch()
        end = self._clock()
        self._fetching += end - start
        self._waiting += self._input_wait.idle_seconds(step, outputs, start, end)
        return batch

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside is not step time (evaluation, checkpoints)."""
        start = self._clock()
        try:
            yield
        finally:
            self._paused += self._clock() - start

    @contextlib.contextmanager
    def accounted(self, name: str):
        """Time spent inside counts towards `name` (one of `accounts`)."""
        start = self._clock()
        try:
            yield
        finally:
            self._accounts[name] += self._clock() - start

    def window(self, step: int) -> dict[str, float]:
        """Figures of the logging window that ends after step `step`; the next window starts now."""
        elapsed = self._clock() - self._window_start - self._paused
        step_seconds = elapsed / max(self._window_steps, 1)
        rates = self.cost.rates(step_seconds)
        figures = {"step_seconds": step_seconds, "volumes_per_second": rates.pop("volumes_per_second"),
                   "data_wait_fraction": self._waiting / max(elapsed, 1e-9),
                   "input_fetch_fraction": self._fetching / max(elapsed, 1e-9), **rates}
        if self.warmed_up(step):
            self._steady.append(step_seconds)
        self._new_window()
        return figures

    def input_hint(self, step: int, figures: dict[str, float]) -> Optional[str]:
        """Advice when a steady window's devices sat idle waiting for batches, else None."""
        if not self.warmed_up(step) or figures["data_wait_fraction"] <= DATA_WAIT_HINT_FRACTION:
            return None
        return (f"hint: the devices sat idle waiting for the next batch {figures['data_wait_fraction']:.0%} of the "
                "time; raise data.workers or data.memory_cache_mb, or move data.cache_dir (the prepared cases) to "
                "faster storage")

    def summary(self) -> dict[str, float]:
        """The session's side-work shares and, once a window is past the warm-up, its steady figures."""
        session = max(self._clock() - self._start, 1e-9)
        summary = {}
        for name, seconds in self._accounts.items():
            summary.update({f"{name}_seconds": seconds, f"{name}_share": seconds / session})
        if self._steady:
            step_seconds = statistics.median(self._steady)
            summary.update(steady_step_seconds=step_seconds, **self.cost.rates(step_seconds))
        return summary

    def close(self) -> None:
        self._input_wait.close()

    def __enter__(self) -> "Chrono":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
