"""Two processes on localhost (one CPU device each, gloo collectives) train together like one process with two
devices, and resume together from their shared Orbax checkpoint.

Each child runs `train_and_evaluate` on configs/seg.py:smoke after `jax.distributed.initialize` (through
`transfer_jax.train.distributed`, from the TRANSFER_JAX_* environment). The grain pipeline gives every process its
rows of the same global batches, so the losses must equal a single-process run over two devices.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from helpers import REPO, smoke_config
from transfer_jax.train.loop import train_and_evaluate

pytestmark = pytest.mark.slow  # two-process training runs

TIMEOUT = 420  # seconds per 2-process launch (a shared 2-core CI box compiles slowly)

CHILD = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {tests!r})
    from helpers import HardStop, StopAfterCheckpoint, smoke_config
    from transfer_jax.train.loop import train_and_evaluate

    overrides = json.loads(sys.argv[2])
    stop_after = overrides.pop("stop_after_checkpoint", 0)  # a hard stop after that step's checkpoint
    callbacks = [StopAfterCheckpoint(stop_after)] if stop_after else []
    config = smoke_config(**overrides)
    try:
        summary = train_and_evaluate(config, sys.argv[1], callbacks=callbacks)
        print("STEPS", summary["steps"], flush=True)
    except HardStop:
        print("PREEMPTED", flush=True)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _overrides(tmp_path, **extra):
    return {"total_steps": 4, "checkpoint_every": 2, "eval_every": 2, "log_every": 1,
            "logging.tensorboard": False, "alignment.enabled": False, **extra}


def _launch(workdir: str, overrides: dict, tmp_path) -> list[str]:
    """Both processes of one 2-process run; returns their outputs (fails on error or time-out)."""
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=os.path.join(REPO, "tests")))
    port = _free_port()
    procs, logs = [], []
    for pid in range(2):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
                   TRANSFER_JAX_COORDINATOR=f"localhost:{port}", TRANSFER_JAX_NUM_PROCESSES="2",
                   TRANSFER_JAX_PROCESS_ID=str(pid), JAX_NUM_CPU_DEVICES="1", PYTHONUNBUFFERED="1")
        env.pop("JAX_COMPILATION_CACHE_DIR", None)  # no shared persistent cache between the two processes
        # each process prepares its own cache copy (no concurrent writes to one file)
        child_overrides = dict(overrides, **{"mesh.num_devices": 0,
                                             "data.cache_dir": os.path.join(workdir, f"cache{pid}")})
        log = open(tmp_path / f"process{pid}-{port}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(script), workdir, json.dumps(child_overrides)],
                                      env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    if any(p.returncode for p in procs):
        raise AssertionError("\n".join(f"=== process {pid} (rc={p.returncode}):\n{out[-3000:]}"
                                       for pid, (p, out) in enumerate(zip(procs, outputs))))
    return outputs


def _losses(workdir: str) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def test_two_processes_match_one_process_and_resume(tmp_path):
    # reference: one process, two devices, the same global batch of 8
    reference = str(tmp_path / "single")
    config = smoke_config(**_overrides(tmp_path))
    config.mesh.num_devices = 2
    summary = train_and_evaluate(config, reference)
    assert summary["steps"] == 4
    expected = _losses(reference)

    # two processes, stopped hard after the checkpoint of step 2, then restarted: they resume from it
    workdir = str(tmp_path / "multi")
    outputs = _launch(workdir, _overrides(tmp_path, stop_after_checkpoint=2), tmp_path)
    assert all("PREEMPTED" in out for out in outputs), outputs[0][-2000:]
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
    first = _losses(workdir)
    assert sorted(first) == [1, 2]
    outputs = _launch(workdir, _overrides(tmp_path), tmp_path)
    assert all("STEPS 4" in out for out in outputs), outputs[0][-2000:]
    assert "resumed from checkpoint at step 2" in outputs[0]
    resumed = _losses(workdir)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), (step, resumed, expected)
