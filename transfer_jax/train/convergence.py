"""The convergence measure of a run, from its evaluation history (pure Python: the study's analysis reads it from
run summaries without JAX).

Convergence is measured on the improvement a run makes over its first (step-0) evaluation, not as a fraction of its
best value: 95 % of a PSNR in dB, or of an AUROC that starts at 0.5, is reached at step 0 by any run, while 95 % of
the improvement means the same on every metric.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence


def _finite(value) -> Optional[float]:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def steps_to_fraction_of_gain(history: Sequence[dict], metric: str, direction: str, fraction: float = 0.95
                              ) -> Optional[int]:
    """First evaluated step whose `metric` has made `fraction` of the run's best improvement over its first
    evaluation (step 0): the run's convergence speed. None when no evaluation improved on the first."""
    values = [(h["step"], _finite((h.get("metrics") or {}).get(metric))) for h in history]
    sign = 1.0 if direction == "max" else -1.0
    values = [(step, sign * v) for step, v in values if v is not None]
    if len(values) < 2:
        return None
    start = values[0][1]
    gain = max(v for _, v in values) - start
    if not gain > 0:
        return None
    return next(step for step, v in values if v - start >= fraction * gain)
