"""Ahead-of-time compilation for Cloud TPU topologies (transfer_jax/aot.py) on the CPU test host.

The smoke segmentation run is compiled once per mesh (data-parallel, FSDP) for a v5e:2x2 slice and shared by the
tests of this module; each compile takes about a minute. Skipped only where libtpu is not installed.
"""
import io
import json
import os
import subprocess
import sys

import jax
import pytest

pytest.importorskip("libtpu")

from helpers import load_config  # noqa: E402
from transfer_jax import aot  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TOPOLOGY = "v5e:2x2"
FIELDS = ("config", "topology", "device_kind", "devices", "mesh", "batch_size", "compiled", "compile_s",
          "argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "peak_bytes", "hbm_bytes", "fits",
          "flops_per_step", "bytes_accessed_per_step", "roofline_step_s", "roofline_mfu")


def smoke_config(**mesh):
    config = load_config("seg", "smoke")
    config.mesh.update(mesh)
    return config


@pytest.fixture(scope="module")
def tpu_devices():
    return aot.topology_devices(TOPOLOGY)


@pytest.fixture(scope="module")
def reports(tpu_devices):
    """The smoke run compiled for v5e:2x2, data-parallel and FSDP over its 4 chips."""
    return {name: aot.compile_run(smoke_config(**mesh), tpu_devices, name="configs/seg.py:smoke", topology=TOPOLOGY,
                                  log=lambda _: None)
            for name, mesh in (("dp", {}), ("fsdp", dict(fsdp=4, strategy="fsdp")))}


def test_topology_devices_are_compile_only_tpus_while_the_host_stays_on_cpu(tpu_devices):
    assert len(tpu_devices) == 4
    assert {d.platform for d in tpu_devices} == {"tpu"}
    assert "v5 lite" in tpu_devices[0].device_kind.lower()
    assert jax.default_backend() == "cpu"


@pytest.mark.parametrize("name", ["dp", "fsdp"])
def test_every_step_compiles_with_positive_figures_that_fit(reports, name):
    report = reports[name]
    assert set(report["steps"]) == {"train", "eval", "probe_features", "probe_measure"}
    for step in report["steps"].values():
        assert step["argument_bytes"] > 0 and step["peak_bytes"] > 0 and step["flops"] > 0
    train = report["steps"]["train"]
    assert train["alias_bytes"] > 0  # the donated state is reused for the new state
    assert report["peak_bytes"] >= report["argument_bytes"] + report["temp_bytes"]
    assert report["fits"] is True and report["hbm_bytes"] == 16 * 2 ** 30
    assert 0 < report["roofline_mfu"] < 1
    assert report["mesh"] == ({"data": 4, "fsdp": 1} if name == "dp" else {"data": 1, "fsdp": 4})


def test_fsdp_holds_less_state_per_chip_than_replication(reports):
    assert reports["fsdp"]["steps"]["eval"]["argument_bytes"] < reports["dp"]["steps"]["eval"]["argument_bytes"]


def test_flops_agree_with_the_cpu_compile_and_the_model_count(reports):
    """XLA's per-chip FLOPs x chips is the global step; it must agree with the same step compiled for 4 CPU devices
    and with train/flops.py's model count (XLA also counts norms, the loss and the optimiser)."""
    report = reports["dp"]
    config = smoke_config()
    programs = aot.Programs(config, aot.make_mesh(config, jax.devices()[:4]))
    cpu = aot.analyse(programs.lower_train(config.batch_size).compile())
    tpu_global, cpu_global = report["flops_per_step"] * 4, cpu["flops"] * 4
    assert 1 / 3 < tpu_global / cpu_global < 3
    assert 1 / 3 < tpu_global / report["model_flops_per_step_global"] < 3


def test_tpu_target_traces_the_tpu_forms(tpu_devices):
    """Depthwise convolutions are grouped convolutions for a TPU mesh; on a CPU mesh the CPU rewrite replaces them."""
    config = smoke_config()
    tpu = aot.Programs(config, aot.make_mesh(config, tpu_devices)).lower_train(config.batch_size).as_text()
    cpu = aot.Programs(config, aot.make_mesh(config, jax.devices()[:4])).lower_train(config.batch_size).as_text()
    grouped = "feature_group_count = 8"  # the first stage's 8-channel depthwise 7x7x7 conv
    assert grouped in tpu
    assert grouped not in cpu


def test_report_prints_a_table_then_one_json_line_with_every_field(reports):
    out = io.StringIO()
    aot.emit(reports["fsdp"], out)
    lines = out.getvalue().strip().splitlines()
    assert "train" in lines[1] or "train" in "\n".join(lines[:-1])
    last = json.loads(lines[-1])
    assert [f for f in FIELDS if f not in last] == []
    assert last["compiled"] is True and last["topology"] == TOPOLOGY


@pytest.mark.parametrize("flags, message", [
    (["--topology=v5e:3x5"], "valid examples: v5e:1x1, v5e:2x2, v5e:2x4"),
    (["--topology=v9x:2x2"], "is not a Cloud TPU topology"),
    (["--config.batch_size=6"], "config.batch_size=6 must be a multiple of the 4 devices"),
    (["--config.mesh.fsdp=3"], "config.mesh.fsdp=3 must divide the 4 devices"),
])
def test_bad_input_is_one_line_before_compiling(flags, message):
    args = [sys.executable, "-m", "transfer_jax.aot", "--config=configs/seg.py:smoke", f"--topology={TOPOLOGY}",
            *flags]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "compiled in" not in proc.stdout


@pytest.mark.parametrize("guess", [1, 2, 4, 7, 20])
@pytest.mark.parametrize("limit", [0, 1, 2, 3, 5, 8, 13])
def test_largest_fitting_batch_search(limit, guess):
    calls = []
    best, tried = aot.largest_fitting(lambda k: calls.append(k) or k <= limit, guess)
    assert best == limit
    assert len(calls) == len(set(calls))  # no candidate compiled twice
    assert all(fits == (k <= limit) for k, fits in tried.items())
    if guess == limit:  # a right estimate costs two compiles: it, and the next one up
        assert sorted(calls) == [limit, limit + 1]
