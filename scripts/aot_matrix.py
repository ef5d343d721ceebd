"""The TPU ahead-of-time matrix: every full-size run compiled for Cloud TPU, written to benchmarks/TPU_AOT.md.

    .venv/bin/python scripts/aot_matrix.py                 # compile what is missing, then write the table
    .venv/bin/python scripts/aot_matrix.py --table-only    # rewrite the table from the cached results
    .venv/bin/python scripts/aot_matrix.py --only provicnet --max-batch

Each row runs `python -m transfer_jax.aot` in a subprocess (one at a time: a full-size compile takes one CPU core
for minutes) and keeps its last-line JSON in benchmarks/tpu_aot.jsonl under a hash of the row's arguments, so the
matrix grows run by run and a row is compiled again only when its arguments change (delete its line to redo it).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
RESULTS = os.path.join(REPO, "benchmarks", "tpu_aot.jsonl")
TABLE = os.path.join(REPO, "benchmarks", "TPU_AOT.md")
BF16 = "--config.model.backbone_options.dtype=bfloat16"
V5E_8 = "v5e:2x4"
FSDP_8 = ("--config.mesh.fsdp=8", "--config.mesh.strategy=fsdp")
# ProViCNet's preset batch (4 cases) does not split over 8 chips: one case per chip.
PROVICNET_8 = ("--config.batch_size=8", "--config.eval_batch_size=8")
# The ProViCNet rows compiled before its full preset turned remat on keep that setting explicitly.
NO_REMAT = "--config.model.backbone_options.remat=False"
PROVICNET, PROFOUND_VIT, PROFOUND_CONV = "configs/seg.py:provicnet,full", "configs/seg.py:profound_vit,full", \
    "configs/seg.py:full"
# (name, config, topology, extra flags, search the largest batch), the must-have rows first (quickest compile
# first), then other chips, fp32, other tasks and a 256-chip slice with the quickest-compiling model.
ROWS = (
    ("provicnet", PROVICNET, V5E_8, (BF16, *PROVICNET_8), True),
    ("profound_vit", PROFOUND_VIT, V5E_8, (BF16,), True),
    ("profound_conv", PROFOUND_CONV, V5E_8, (BF16,), True),
    ("provicnet", PROVICNET, V5E_8, (BF16, *PROVICNET_8, *FSDP_8, NO_REMAT), False),
    ("profound_vit", PROFOUND_VIT, V5E_8, (BF16, *FSDP_8), False),
    ("profound_conv", PROFOUND_CONV, V5E_8, (BF16, *FSDP_8), False),
    ("provicnet", PROVICNET, V5E_8, (BF16, *PROVICNET_8, NO_REMAT), True),
    ("provicnet", PROVICNET, V5E_8, (*PROVICNET_8, NO_REMAT), False),
    ("provicnet", PROVICNET, "v6e:2x4", (BF16, *PROVICNET_8, NO_REMAT), False),
    ("provicnet", PROVICNET, "v5p:2x2x1", (BF16, *PROVICNET_8, NO_REMAT), False),
    ("provicnet", PROVICNET, "v4:2x2x1", (BF16, *PROVICNET_8, NO_REMAT), False),
    ("provicnet", "configs/cls.py:provicnet,full", V5E_8, (BF16, *PROVICNET_8, NO_REMAT), False),
    ("provicnet", PROVICNET, "v5e:16x16", (BF16, "--config.batch_size=256", "--config.eval_batch_size=256", NO_REMAT),
     False),
)


def row_args(config: str, topology: str, extra, skip: str, max_batch: bool) -> list[str]:
    args = [f"--config={config}", f"--topology={topology}", *extra]
    if skip:
        args.append(f"--skip={skip}")
    if max_batch:
        args.append("--max_batch")
    return args


def row_key(args: list[str]) -> str:
    return hashlib.sha1(json.dumps(args).encode()).hexdigest()[:16]


def load_results() -> dict[str, dict]:
    results = {}
    if os.path.exists(RESULTS):
        with open(RESULTS, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    entry = json.loads(line)
                    results[entry["key"]] = entry
    return results


def compile_row(args: list[str], log_path: str) -> dict:
    """One `python -m transfer_jax.aot` run; its last-line JSON, or the error it ended with."""
    start = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run([sys.executable, "-m", "transfer_jax.aot", *args], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=log, text=True)
        log.write(proc.stdout)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode == 0 and lines and lines[-1].startswith("{"):
        return json.loads(lines[-1])
    return {"compiled": False, "error": f"exit {proc.returncode} after {time.time() - start:.0f}s (see {log_path})"}


def _gib(value) -> str:
    return f"{value / 2 ** 30:.2f}" if value else "-"


def format_table(rows: list[tuple[str, list[str], dict]]) -> str:
    columns = ("model", "config", "topology", "dtype", "mesh", "global batch (per chip)", "fits", "peak GiB per chip",
               "args / temp / out − alias GiB", "largest batch per chip", "compile s", "XLA GFLOP per step per chip",
               "roofline step s", "bound", "roofline MFU")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name, args, r in rows:
        extra = " ".join(a for a in args[2:] if a not in (BF16, "--max_batch") and not a.startswith("--skip"))
        dtype = "bfloat16" if BF16 in args else "float32"
        if not r.get("compiled"):
            cells = [name, f"`{args[0][9:]}` {extra}", args[1][11:], dtype, "", "", "not compiled: "
                     + r.get("error", "pending")]
            lines.append("| " + " | ".join(cells + [""] * (len(columns) - len(cells))) + " |")
            continue
        mesh = "x".join(str(v) for v in r["mesh"].values())
        largest = f"{r['max_batch_per_device']:g}" if "max_batch_per_device" in r else "-"
        mfu = f"{r['roofline_mfu']:.1%}" if r.get("roofline_mfu") is not None else "-"
        step = f"{r['roofline_step_s']:.3f}" if r.get("roofline_step_s") else "-"
        cells = [name, f"`{args[0][9:]}` {extra}", r["topology"], dtype, f"{r['strategy']} {mesh}",
                 f"{r['batch_size']} ({r['batch_per_device']:g})", "yes" if r["fits"] else "NO", _gib(r["peak_bytes"]),
                 f"{_gib(r['argument_bytes'])} / {_gib(r['temp_bytes'])} / "
                 f"{_gib(r['output_bytes'] - r['alias_bytes'])}",
                 largest, f"{r['compile_s']:.0f}", f"{r['flops_per_step'] / 1e9:.0f}", step,
                 r.get("roofline_bound") or "-", mfu]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table-only", action="store_true", help="no compiling: rewrite the table from the cache")
    p.add_argument("--only", default="", help="comma list of model names (provicnet, profound_vit, profound_conv)")
    p.add_argument("--skip", default="eval,probe", help="steps not compiled per row (transfer_jax.aot --skip); "
                   "empty = all")
    p.add_argument("--max-batch", action="store_true", help="also search the largest batch of the rows that "
                   "do not (a row's compile results are cached under its arguments, this flag among them)")
    args = p.parse_args(argv)
    only = set(filter(None, args.only.split(",")))
    results = load_results()
    table_rows = []
    for name, config, topology, extra, search in ROWS:
        row = row_args(config, topology, extra, args.skip, args.max_batch or search)
        key = row_key(row)
        if key not in results and not args.table_only and (not only or name in only):
            log_path = f"/tmp/aot_{name}_{key}.log"
            print(f"compiling {name}: {' '.join(row)} (log {log_path})", flush=True)
            result = compile_row(row, log_path)
            print(f"  -> {'compiled in %.0fs' % result['compile_s'] if result.get('compiled') else result['error']}",
                  flush=True)
            if result.get("compiled"):
                results[key] = dict(result, key=key, args=row, date=time.strftime("%Y-%m-%d"))
                with open(RESULTS, "a", encoding="utf-8") as f:
                    f.write(json.dumps(results[key], default=str) + "\n")
        # Until a row's batch search has run, the table shows the row's compile without it.
        plain = row_key(row_args(config, topology, extra, args.skip, False))
        table_rows.append((name, row, results.get(key) or results.get(plain, {})))
    write_table(table_rows)


def write_table(rows) -> None:
    with open(TABLE, encoding="utf-8") as f:
        text = f.read()
    start, end = "<!-- aot-matrix:start -->", "<!-- aot-matrix:end -->"
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    with open(TABLE, "w", encoding="utf-8") as f:
        f.write(before + start + "\n" + format_table(rows) + "\n" + end + after)
    print(f"wrote {TABLE}")


if __name__ == "__main__":
    main()
