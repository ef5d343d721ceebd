"""Metrics to stdout, a JSONL file and TensorBoard event files, the run log to stdout and `<workdir>/log.txt`;
only process 0 writes."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Mapping

import jax
from tqdm import tqdm


def _finite_or_none(value):
    value = float(value)
    return value if math.isfinite(value) else None


class MetricWriter:
    def __init__(self, workdir: str, *, tensorboard: bool = True, stream=None):
        self.enabled = jax.process_index() == 0
        self.stream = stream or sys.stdout
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self.log_path = os.path.join(workdir, "log.txt")
        self._jsonl = self._log_file = None
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(self.jsonl_path, "a", buffering=1, encoding="utf-8")
            self._log_file = open(self.log_path, "a", buffering=1, encoding="utf-8")
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
        """One line of the run log; an active progress bar is cleared first and redrawn below it."""
        if self.enabled:
            tqdm.write(message, file=self.stream)
            self.stream.flush()
            if self._log_file is not None:
                self._log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    def close(self) -> None:
        for f in (self._jsonl, self._log_file):
            if f is not None:
                f.close()
        self._jsonl = self._log_file = None
        if self._tb is not None:
            self._tb.close()
