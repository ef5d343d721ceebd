"""How long the devices sit idle waiting for the next batch.

Dispatch is asynchronous: the training thread hands step n to the devices and fetches batch n+1 while step n runs,
so the time spent in the fetch is a wait only for the part after step n has finished. A daemon thread blocks on
each step's outputs and records when they became ready; the idle part of a fetch is
max(0, fetch end - max(fetch start, step end)). The recorded end is late by at most the time the thread takes to
get the interpreter lock back (the switch interval, 5 ms by default), so the idle time can only be under-counted
by that much per step. Fetch times passed in must come from the same `clock` the watcher reads.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable

import jax

_STOP = object()


class InputWaitClock:
    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._pending: queue.SimpleQueue = queue.SimpleQueue()
        self._finished: dict[int, float] = {}
        self._recorded = threading.Condition()
        self._thread = threading.Thread(target=self._watch, name="input-wait-clock", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while (item := self._pending.get()) is not _STOP:
            step, outputs = item
            jax.block_until_ready(outputs)
            with self._recorded:
                self._finished[step] = self._clock()
                self._recorded.notify_all()

    def dispatched(self, step: int, outputs) -> None:
        """Step `step` was handed to the devices; `outputs` are arrays it produces (not donated later)."""
        self._pending.put((step, outputs))

    def idle_seconds(self, step: int, outputs, fetch_start: float, fetch_end: float) -> float:
        """Device idle time inside the fetch [fetch_start, fetch_end] (`clock` times) that followed step `step`."""
        with self._recorded:
            for stale in [s for s in self._finished if s < step]:  # steps that were still running at their fetch
                del self._finished[stale]
            if not all(leaf.is_ready() for leaf in jax.tree.leaves(outputs)):
                return 0.0  # still running when the batch arrived: the fetch was hidden behind it
            self._recorded.wait_for(lambda: step in self._finished)
            finished = self._finished.pop(step)
        return max(0.0, fetch_end - max(fetch_start, finished))

    def close(self) -> None:
        self._pending.put(_STOP)
        self._thread.join()
