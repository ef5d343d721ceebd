"""PyTorch reference for scripts/benchmark.py: the same fine-tuning step on the repo's PyTorch reference models.

    .venv-torch/bin/python scripts/bench_torch.py --spec '{"dims": [16,32,64,128], "depths": [1,1,2,1], ...}'

Uses the ConvNeXt-V2 + UPerNet reference modules of scripts/make_parity_fixtures.py (upstream key layout and
forward semantics, channels-first) at the size given by --spec (dims, depths, hidden, aux, num_classes, crop,
batch, lr, weight_decay, aux_weight, dtype): forward in training mode (main + auxiliary logits), Dice + CE loss on
both (aux weighted), backward, AdamW step. Eager and `torch.compile` (unless --no-compile), after warm-up, with
`torch.set_num_threads(--threads)`. Prints one JSON line per mode. Run with the side venv only: torch is never
imported by transfer_jax/ or tests/.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_parity_fixtures import ConvNeXtV2, UperNet  # noqa: E402


def dice_ce(logits, labels, num_classes):
    """Soft Dice over the foreground classes + cross-entropy, like transfer_jax.tasks.segmentation.dice_ce_loss."""
    logits = logits.float()
    probs = logits.softmax(1)
    onehot = F.one_hot(labels, num_classes).permute(0, 4, 1, 2, 3).float()
    dims = (2, 3, 4)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = 1 - (2 * inter + 1e-5) / (denom + 1e-5)
    return dice[:, 1:].mean() + F.cross_entropy(logits, labels)


def build(spec):
    encoder = ConvNeXtV2(in_chans=3, depths=tuple(spec["depths"]), dims=tuple(spec["dims"]))
    model = UperNet(encoder, tuple(spec["dims"]), spec["num_classes"], hidden=spec["hidden"], aux=spec["aux"])
    model.train()
    return model


def make_step(model, optimizer, spec):
    autocast = spec.get("dtype") == "bf16"

    def step(image, label):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits, aux = model(image)
        loss = dice_ce(logits, label, spec["num_classes"]) + spec["aux_weight"] * dice_ce(aux, label,
                                                                                         spec["num_classes"])
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def run(mode, spec, args):
    torch.manual_seed(0)
    model = build(spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=spec["weight_decay"])
    gen = torch.Generator().manual_seed(0)
    b, crop = spec["batch"], tuple(spec["crop"])
    image = torch.randn((b, 3, *crop), generator=gen)
    label = torch.randint(0, spec["num_classes"], (b, *crop), generator=gen)
    step = make_step(model, optimizer, spec)
    compile_s = 0.0
    if mode == "compile":
        # compile the model (forward + backward graphs); the optimizer step stays eager (as in most recipes)
        model.forward = torch.compile(model.forward)
        start = time.perf_counter()
        step(image, label)
        compile_s = time.perf_counter() - start
    for _ in range(args.warmup):
        loss = step(image, label)
    windows = 3
    per = max(1, args.steps // windows)
    times = []
    for _ in range(max(1, args.steps // per)):
        start = time.perf_counter()
        for _ in range(per):
            loss = step(image, label)
        float(loss)
        times.append((time.perf_counter() - start) / per)
    step_s = statistics.median(times)
    return {"mode": mode, "size": spec.get("size"), "dtype": spec.get("dtype", "fp32"), "batch": b, "crop": list(crop),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "compile_s": compile_s,
            "step_s": step_s, "volumes_per_s": b / step_s, "loss": float(loss)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", required=True, help="JSON: dims, depths, hidden, aux, num_classes, crop, batch, ...")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--no-compile", action="store_true", help="eager only")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = json.loads(args.spec)
    spec.setdefault("lr", 1e-3)
    spec.setdefault("weight_decay", 0.05)
    spec.setdefault("aux_weight", 0.4)
    for mode in ("eager",) + (() if args.no_compile else ("compile",)):
        try:
            result = run(mode, spec, args)
        except Exception as e:  # torch.compile needs a working C++ toolchain; report instead of failing
            result = {"mode": mode, "size": spec.get("size"), "dtype": spec.get("dtype", "fp32"),
                      "error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
