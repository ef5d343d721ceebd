"""PyTorch reference for scripts/benchmark.py: the same fine-tuning step on the repo's PyTorch reference models.

    .venv-torch/bin/python scripts/bench_torch.py --spec '{"dims": [16,32,64,128], "depths": [1,1,2,1], ...}'

Uses the parity-fixture reference modules (upstream key layout and forward semantics, channels-first) at the size
given by --spec (`model` and its sizes, num_classes, crop, batch, lr, weight_decay, aux_weight, dtype):
* `profound_conv`: ConvNeXt-V2 + UPerNet (scripts/make_parity_fixtures.py), training mode (main + auxiliary
  logits), Dice + CE on both (aux weighted), AdamW;
* `profound_vit`: the 3-D ViT + ViT adapter + UPerNet of the same script, same loss and optimizer;
* `provicnet`: `ProViCNetReference` (scripts/make_provicnet_fixtures.py: DINOv2 with registers + slice-position
  tokens + conv_head8) on `batch` x `slices` slices of `image_size`^2, class-weighted Dice + CE with background
  (MONAI DiceCE as upstream), Adam without weight decay.
Forward, loss, backward and optimizer step; eager and `torch.compile` (unless --no-compile), after warm-up, with
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
from make_parity_fixtures import ConvNeXtV2, UperNet, ViT, ViTAdapter  # noqa: E402
from make_provicnet_fixtures import ProViCNetReference  # noqa: E402
from benchmark import glibc_malloc_env, minor_faults  # noqa: E402  (stdlib-only at import)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from transfer_jax.allocator import active_allocator  # noqa: E402  (stdlib-only)


def dice_ce(logits, labels, num_classes, include_background=False, weights=None):
    """Soft Dice per (sample, class) + cross-entropy, like transfer_jax.tasks.segmentation.dice_ce_loss: Dice over
    the foreground classes (or all, `include_background`), class weights on both terms when given."""
    logits = logits.float()
    probs = logits.softmax(1)
    onehot = F.one_hot(labels, num_classes).movedim(-1, 1).float()
    dims = tuple(range(2, logits.ndim))
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = 1 - (2 * inter + 1e-5) / (denom + 1e-5)
    if weights is not None:
        dice = dice * weights
    dice = dice if include_background else dice[:, 1:]
    return dice.mean() + F.cross_entropy(logits, labels, weight=weights)


def build(spec):
    name = spec.get("model", "profound_conv")
    if name == "profound_conv":
        encoder = ConvNeXtV2(in_chans=3, depths=tuple(spec["depths"]), dims=tuple(spec["dims"]))
        return UperNet(encoder, tuple(spec["dims"]), spec["num_classes"], hidden=spec["hidden"], aux=spec["aux"])
    if name == "profound_vit":
        patch, width = tuple(spec["patch"]), spec["width"]
        encoder = ViT(img=tuple(spec["crop"]), patch=patch, in_chans=3, dim=width, depth=spec["depth"],
                      heads=spec["heads"])
        return UperNet(encoder, [width] * 4, spec["num_classes"], hidden=spec["hidden"], aux=spec["aux"],
                       adapter=ViTAdapter(width, encoder.grid), out_indices=list(spec["out_indices"]))
    if name == "provicnet":
        vit = dict(width=spec["width"], depth=spec["depth"], num_heads=spec["heads"], patch=spec["patch"],
                   pos_grid=spec["pos_grid"], num_registers=spec["registers"], mlp_ratio=4.0)
        return ProViCNetReference(with_cl_head=False, vit=vit, head_channels=tuple(spec["head"]),
                                  num_classes=spec["num_classes"])
    raise ValueError(f"spec model {name!r}: expected profound_conv, profound_vit or provicnet")


def make_inputs(spec, gen):
    """(model inputs, labels): volumes [B, 3, D, H, W] with [B, D, H, W] labels, or ProViCNet's B * S slices
    [B * S, 3, s, s] with their (index, count) positions and [B * S, L, L] labels."""
    if spec.get("model") == "provicnet":
        count, side, label = spec["batch"] * spec["slices"], spec["image_size"], spec["label_size"]
        image = torch.randn((count, 3, side, side), generator=gen)
        pos = torch.stack([torch.arange(count) % spec["slices"], torch.full((count,), spec["slices"])], 1).float()
        return (image, pos), torch.randint(0, spec["num_classes"], (count, label, label), generator=gen)
    image = torch.randn((spec["batch"], 3, *spec["crop"]), generator=gen)
    return (image,), torch.randint(0, spec["num_classes"], (spec["batch"], *spec["crop"]), generator=gen)


def make_optimizer(model, spec):
    if spec.get("model") == "provicnet":  # upstream train.py: Adam, no weight decay
        return torch.optim.Adam(model.parameters(), lr=spec["lr"])
    return torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=spec["weight_decay"])


def make_step(model, optimizer, spec):
    autocast = spec.get("dtype") == "bf16"
    k = spec["num_classes"]
    weights = torch.tensor(spec["class_weights"]) if spec.get("class_weights") else None

    def step(inputs, label):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(*inputs)
        if spec.get("model") == "provicnet":
            loss = dice_ce(out, label, k, include_background=True, weights=weights)
        else:
            logits, aux = out
            loss = dice_ce(logits, label, k) + spec["aux_weight"] * dice_ce(aux, label, k)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def run(mode, spec, args):
    torch.manual_seed(0)
    model = build(spec).train()
    optimizer = make_optimizer(model, spec)
    inputs, label = make_inputs(spec, torch.Generator().manual_seed(0))
    step = make_step(model, optimizer, spec)
    compile_s = 0.0
    if mode == "compile":
        # compile the model (forward + backward graphs); the optimizer step stays eager (as in most recipes)
        model.forward = torch.compile(model.forward)
        start = time.perf_counter()
        step(inputs, label)
        compile_s = time.perf_counter() - start
    for _ in range(args.warmup):
        loss = step(inputs, label)
    windows = 3
    per = max(1, args.steps // windows)
    times = []
    faults_before = minor_faults()
    for _ in range(max(1, args.steps // per)):
        start = time.perf_counter()
        for _ in range(per):
            loss = step(inputs, label)
        float(loss)
        times.append((time.perf_counter() - start) / per)
    step_s = statistics.median(times)
    faults = (minor_faults() - faults_before) / (len(times) * per)
    return {"mode": mode, "model": spec.get("model", "profound_conv"), "size": spec.get("size"),
            "dtype": spec.get("dtype", "fp32"), "batch": spec["batch"], "crop": list(spec["crop"]),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "compile_s": compile_s,
            "step_s": step_s, "volumes_per_s": spec["batch"] / step_s, "loss": float(loss),
            "minor_faults_per_step": faults, "allocator": active_allocator(), "malloc_env": glibc_malloc_env()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", required=True, help="JSON: model, its sizes, num_classes, crop, batch, ...")
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
            result = {"mode": mode, "model": spec.get("model", "profound_conv"), "size": spec.get("size"),
                      "dtype": spec.get("dtype", "fp32"),
                      "error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
