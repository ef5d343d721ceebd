"""Model FLOPs of a train step and the device peaks they are compared against (MFU).

The count is read off the traced forward pass of the task's own model on a batch, so it holds for every
backbone, head and size without a hand-written formula per architecture: every `dot_general` and
`conv_general_dilated` at 2 FLOPs per multiply-accumulate, traced with the plain lax convolutions
(`cpu_conv.target_platform("reference")`) so that XLA:CPU rewrites which trade MACs for speed (the Toeplitz
depthwise conv) do not inflate it. Norms, activations, softmax, resizes, pooling, the loss and the optimiser are
left out, as in MaxText's and PaLM's MFU. A train step is 3 x the forward pass (backward: gradients with respect
to the activations and to the weights).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.extend.core as jex

from transfer_jax.models.cpu_conv import target_platform

# Dense bf16 peak FLOP/s per chip, from the vendors' datasheets (no sparsity), keyed by a substring of
# `jax.Device.device_kind`; first match wins, so more specific names come first.
BF16_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12), ("H100", 989e12), ("GH200", 989e12), ("A100", 312e12), ("L4", 121e12),
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12), ("TPU v5", 459e12), ("TPU v4", 275e12), ("TPU v3", 123e12),  # "TPU v5": a v5p
)


# Per-chip HBM capacity (GiB) and bandwidth (GB/s) of Cloud TPUs, keyed like BF16_PEAK_FLOPS, from the system
# architecture pages of the Google Cloud TPU documentation (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): the
# memory and roofline estimates of ahead-of-time compiles (transfer_jax/aot.py) read them.
TPU_HBM: tuple[tuple[str, float, float], ...] = (
    ("TPU v6 lite", 32, 1640), ("TPU v6e", 32, 1640), ("TPU v5p", 95, 2765), ("TPU v5 lite", 16, 819),
    ("TPU v5e", 16, 819), ("TPU v5", 95, 2765), ("TPU v4", 32, 1200),
)


def device_hbm(device: jax.Device) -> Optional[tuple[float, float]]:
    """(HBM bytes, HBM bytes/s) of a Cloud TPU chip from TPU_HBM, or None for other devices."""
    kind = getattr(device, "device_kind", "").lower()
    for key, gib, gbps in TPU_HBM:
        if key.lower() in kind:
            return gib * 2.0 ** 30, gbps * 1e9
    return None


# Nested jits whose dots are not the model's: `jax.image.resize` interpolates through matmuls with its weight
# matrices (PyTorch's `interpolate` reads the 2-8 neighbours directly); counting them would add 10 % to a small
# UPerNet's step.
_NOT_MODEL_FLOPS = frozenset({"_resize"})


def _dot_flops(eqn) -> float:
    (contracting, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)


def _conv_flops(eqn) -> float:
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial) axes of the kernel
    kernel = eqn.invars[1].aval.shape
    macs_per_output = kernel[rhs_spec[1]] * math.prod(kernel[d] for d in rhs_spec[2:])
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * macs_per_output


def jaxpr_flops(jaxpr) -> float:
    """Dot and convolution FLOPs of a (closed) jaxpr, through every nested jaxpr (jit, remat, custom_vjp, ...);
    a scan counts its body `length` times, a cond its most expensive branch, resizes count nothing."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "cond":
            total += max(jaxpr_flops(branch) for branch in eqn.params["branches"])
        elif name == "jit" and eqn.params.get("name") in _NOT_MODEL_FLOPS:
            continue
        elif name == "while":
            raise ValueError("cannot count the FLOPs of a while loop (unknown trip count) in the model's forward")
        else:
            inner = sum(jaxpr_flops(sub) for sub in jex.jaxprs_in_params(eqn.params))
            total += inner * (eqn.params["length"] if name == "scan" else 1)
    return total


def forward_flops(graph, params: Any, rest: Any, batch: dict[str, Any], task, compute_dtype) -> float:
    """FLOPs of the task's training forward pass on `batch` (arrays or `jax.ShapeDtypeStruct`s)."""
    def forward(params, rest, batch):
        return task.forward(graph.merge(params, rest, training=True), batch, compute_dtype)

    with target_platform("reference"):
        return jaxpr_flops(jax.make_jaxpr(forward)(params, rest, batch))


def train_step_flops(graph, params: Any, rest: Any, batch: dict[str, Any], task, compute_dtype) -> float:
    """Model FLOPs of one train step on the (global) `batch`: 3 x the forward pass."""
    return 3.0 * forward_flops(graph, params, rest, batch, task, compute_dtype)


def device_peak_flops(device: jax.Device, override_tflops: float = 0.0) -> Optional[float]:
    """Per-chip peak FLOP/s for MFU: `override_tflops` when set, else the bf16 datasheet peak of a known
    accelerator, else None (CPUs and unknown devices: the benchmark measures a matmul peak instead)."""
    if override_tflops < 0:
        raise ValueError(f"logging.peak_tflops must be > 0 (per-device peak TFLOP/s) or 0 to look the device up, "
                         f"got {override_tflops}")
    if override_tflops:
        return float(override_tflops) * 1e12
    kind = getattr(device, "device_kind", "")
    for key, peak in BF16_PEAK_FLOPS:
        if key.lower() in kind.lower():
            return peak
    return None
