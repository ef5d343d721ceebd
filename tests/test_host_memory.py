"""The host allocator: scripts/run.sh's tcmalloc preload, what a process reports it runs on, the trainer's hint."""
import ctypes.util
import json
import os
import subprocess
import sys

import pytest

from transfer_jax.allocator import GLIBC_RETAIN_ENV, PRELOAD_LINE, host_memory_hint


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join(REPO, "scripts", "host_allocator.sh")


def _preload(tmp_path, env: dict[str, str], ldconfig_lines: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Source scripts/host_allocator.sh with a stand-in `ldconfig -p` listing `ldconfig_lines`, then print the
    variables it set as JSON."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    ldconfig = bin_dir / "ldconfig"
    ldconfig.write_text("#!/bin/sh\n" + "".join(f"echo '{line}'\n" for line in ldconfig_lines))
    ldconfig.chmod(0o755)
    script = (f"set -euo pipefail; source {HELPER}; preload_host_allocator; "
              "printf '{\"LD_PRELOAD\": \"%s\", \"threshold\": \"%s\"}\\n' \"${LD_PRELOAD:-}\" "
              "\"${TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD:-}\"")
    base = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    return subprocess.run(["bash", "-c", script], env={**base, **env}, capture_output=True, text=True)


def _tcmalloc_line(path: str) -> str:
    return f"\tlibtcmalloc_minimal.so.4 (libc6,x86-64) => {path}"


def test_run_script_preloads_tcmalloc_when_installed(tmp_path):
    done = _preload(tmp_path, {}, ("1 libs found in cache", _tcmalloc_line("/opt/x/libtcmalloc_minimal.so.4")))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("host allocator: LD_PRELOAD=/opt/x/libtcmalloc_minimal.so.4")
    assert json.loads(lines[1]) == {"LD_PRELOAD": "/opt/x/libtcmalloc_minimal.so.4", "threshold": str(1 << 40)}
    kept = _preload(tmp_path, {"LD_PRELOAD": "libfoo.so"}, (_tcmalloc_line("/opt/x/libtcmalloc_minimal.so.4"),))
    assert json.loads(kept.stdout.splitlines()[-1])["LD_PRELOAD"] == "/opt/x/libtcmalloc_minimal.so.4 libfoo.so"


def test_run_script_keeps_glibc_or_the_users_allocator(tmp_path):
    listing = (_tcmalloc_line("/opt/x/libtcmalloc_minimal.so.4"),)
    system = _preload(tmp_path, {"TRANSFER_JAX_ALLOCATOR": "system"}, listing)
    assert system.returncode == 0 and json.loads(system.stdout)["LD_PRELOAD"] == ""
    mine = _preload(tmp_path, {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, listing)
    assert json.loads(mine.stdout)["LD_PRELOAD"] == "/usr/lib/libjemalloc.so.2"
    bad = _preload(tmp_path, {"TRANSFER_JAX_ALLOCATOR": "mimalloc"}, listing)
    assert bad.returncode != 0
    assert "TRANSFER_JAX_ALLOCATOR=mimalloc: expected auto (tcmalloc when installed) or system" in bad.stderr


def test_run_script_without_tcmalloc_runs_on_glibc(tmp_path):
    standard = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
    if any(os.path.exists(os.path.join(d, n)) for d in standard
           for n in ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")):
        pytest.skip("tcmalloc is installed on this machine")
    done = _preload(tmp_path, {}, ("0 libs found in cache",))
    assert done.returncode == 0 and json.loads(done.stdout) == {"LD_PRELOAD": "", "threshold": ""}


def _library_path(name: str) -> str:
    """The file of an installed shared library, from this process's mappings after loading it."""
    ctypes.CDLL(ctypes.util.find_library(name))
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if f"/lib{name}.so" in line}
    assert paths, f"lib{name} not mapped"
    return sorted(paths)[0]


def _active(env: dict[str, str]) -> str:
    base = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    done = subprocess.run([sys.executable, "-c", "from transfer_jax.allocator import active_allocator; "
                           "print(active_allocator())"], env={**base, "PYTHONPATH": REPO, **env},
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_a_process_reports_the_library_it_was_started_with():
    # Any shared library shows the mechanism; zlib is on every machine that runs Python.
    library = _library_path("z")
    assert _active({"LD_PRELOAD": library}) == os.path.basename(library)
    assert _active({}) == "glibc"


def test_hint_for_cpu_steps_on_glibc_only():
    hint = host_memory_hint("cpu", 169.0, "glibc", {})
    assert hint is not None and "169 MiB" in hint and "libtcmalloc-minimal4" in hint and PRELOAD_LINE in hint
    assert "MALLOC_ARENA_MAX" not in hint  # the glibc settings slow small steps: offered for large ones only
    large = host_memory_hint("cpu", 5908.0, "glibc", {})
    assert all(f"{k}={v}" in large for k, v in GLIBC_RETAIN_ENV.items())
    assert host_memory_hint("cpu", 169.0, "tcmalloc", {}) is None
    assert host_memory_hint("gpu", 5908.0, "glibc", {}) is None
    assert host_memory_hint("cpu", 20.0, "glibc", {}) is None
    assert host_memory_hint("cpu", 5908.0, "glibc", {"MALLOC_ARENA_MAX": "1"}) is None
