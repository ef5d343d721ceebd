"""The host allocator: which library an entry point preloads, the re-exec itself, and the trainer's hint."""
import ctypes.util
import json
import os
import subprocess
import sys

import pytest

from transfer_jax.allocator import (ALLOCATOR_ENV, GLIBC_RETAIN_ENV, AllocatorError, host_memory_hint,
                                    preload_environment, requested_library)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _installed(monkeypatch, found: dict[str, str]):
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: found.get(name))


def test_auto_preloads_tcmalloc_when_installed_and_runs_as_is_otherwise(monkeypatch):
    _installed(monkeypatch, {"tcmalloc_minimal": "libtcmalloc_minimal.so.4"})
    env = preload_environment({"PATH": "/bin", "LD_PRELOAD": "libfoo.so"})
    assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4 libfoo.so" and env["PATH"] == "/bin"
    assert env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == str(1 << 40)
    assert preload_environment(env) is None  # the re-executed process does not loop
    assert preload_environment({ALLOCATOR_ENV: "system"}) is None
    assert preload_environment({"LD_PRELOAD": "/opt/lib/libjemalloc.so.2"}) is None  # the user's choice stays
    _installed(monkeypatch, {})
    assert preload_environment({}) is None


def test_explicit_choices_and_their_errors(monkeypatch, tmp_path):
    _installed(monkeypatch, {"jemalloc": "libjemalloc.so.2"})
    assert requested_library({ALLOCATOR_ENV: "jemalloc"}) == "libjemalloc.so.2"
    with pytest.raises(AllocatorError, match="TRANSFER_JAX_ALLOCATOR=tcmalloc: the tcmalloc library is not "
                                             "installed .*libtcmalloc-minimal4"):
        requested_library({ALLOCATOR_ENV: "tcmalloc"})
    with pytest.raises(AllocatorError, match="expected auto, system, tcmalloc, jemalloc or the path"):
        requested_library({ALLOCATOR_ENV: "mimalloc"})
    with pytest.raises(AllocatorError, match="no such file"):
        requested_library({ALLOCATOR_ENV: str(tmp_path / "libnone.so")})
    library = tmp_path / "libmine.so"
    library.write_bytes(b"")
    assert requested_library({ALLOCATOR_ENV: str(library)}) == str(library)


def _library_path(name: str) -> str:
    """The file of an installed shared library, from this process's mappings after loading it."""
    ctypes.CDLL(ctypes.util.find_library(name))
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if f"/lib{name}.so" in line}
    assert paths, f"lib{name} not mapped"
    return sorted(paths)[0]


def _run_entry(tmp_path, env, *args, launcher=()):
    script = tmp_path / "entry.py"
    script.write_text(
        "import json, os, sys\n"
        "from transfer_jax.allocator import active_allocator, apply_host_allocator\n"
        "apply_host_allocator()\n"
        "print(json.dumps({'argv': sys.argv[1:], 'preload': os.environ.get('LD_PRELOAD'), "
        "'active': active_allocator()}))\n")
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", ALLOCATOR_ENV)}
    return subprocess.run([sys.executable, *launcher, str(script), *args], env={**base, "PYTHONPATH": REPO, **env},
                          capture_output=True, text=True)


def test_entry_point_reexecutes_with_the_library_preloaded(tmp_path):
    # Any shared library shows the mechanism; zlib is on every machine that runs Python.
    library = _library_path("z")
    done = _run_entry(tmp_path, {ALLOCATOR_ENV: library}, "--config=x", "y")
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen == {"argv": ["--config=x", "y"], "preload": library, "active": os.path.basename(library)}

    plain = json.loads(_run_entry(tmp_path, {ALLOCATOR_ENV: "system"}).stdout)
    assert plain == {"argv": [], "preload": None, "active": "glibc"}

    bad = _run_entry(tmp_path, {ALLOCATOR_ENV: "nonsense"})
    assert bad.returncode != 0 and "error: TRANSFER_JAX_ALLOCATOR='nonsense': expected auto" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_launcher_runs_a_python_command_with_the_library_preloaded(tmp_path):
    library = _library_path("z")
    launcher = ("-m", "transfer_jax.allocator")
    done = _run_entry(tmp_path, {ALLOCATOR_ENV: library}, "-q", launcher=launcher)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"argv": ["-q"], "preload": library, "active": os.path.basename(library)}
    plain = _run_entry(tmp_path, {ALLOCATOR_ENV: "system"}, launcher=launcher)
    assert json.loads(plain.stdout)["active"] == "glibc"
    usage = subprocess.run([sys.executable, "-m", "transfer_jax.allocator"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": REPO})
    assert usage.returncode != 0 and "usage: python -m transfer_jax.allocator" in usage.stderr


def test_hint_for_cpu_steps_on_glibc_only():
    hint = host_memory_hint("cpu", 169.0, "glibc", {})
    assert hint is not None and "169 MiB" in hint and "libtcmalloc-minimal4" in hint
    assert "MALLOC_ARENA_MAX" not in hint  # the glibc settings slow small steps: offered for large ones only
    large = host_memory_hint("cpu", 5908.0, "glibc", {})
    assert all(f"{k}={v}" in large for k, v in GLIBC_RETAIN_ENV.items())
    assert host_memory_hint("cpu", 169.0, "tcmalloc", {}) is None
    assert host_memory_hint("gpu", 5908.0, "glibc", {}) is None
    assert host_memory_hint("cpu", 20.0, "glibc", {}) is None
    assert host_memory_hint("cpu", 5908.0, "glibc", {"MALLOC_ARENA_MAX": "1"}) is None
