"""Metrics to stdout, a JSONL file and TensorBoard event files; only process 0 writes."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Mapping

import jax


def _finite_or_none(value):
    value = float(value)
    return value if math.isfinite(value) else None


class MetricWriter:
    def __init__(self, workdir: str, *, tensorboard: bool = True, stream=None):
        self.enabled = jax.process_index() == 0
        self.stream = stream or sys.stdout
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self._jsonl = None
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(self.jsonl_path, "a", buffering=1, encoding="utf-8")
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=10)

    def write(self, step: int, scalars: Mapping[str, float], *, prefix: str = "") -> None:
        if not self.enabled:
            return
        named = {f"{prefix}{k}": float(v) for k, v in scalars.items()}
        record = {"step": int(step), "time": time.time(), **{k: _finite_or_none(v) for k, v in named.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in named.items():
                if math.isfinite(value):
                    self._tb.add_scalar(key, value, int(step))
        shown = "  ".join(f"{k}={v:.4g}" for k, v in named.items())
        self.log(f"step {step}: {shown}")

    def log(self, message: str) -> None:
        if self.enabled:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
