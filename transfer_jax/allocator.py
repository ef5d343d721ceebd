"""The host allocator of a run: tcmalloc preloaded by re-executing the entry point, or glibc malloc.

XLA:CPU allocates an executable's temporaries (the step's activations) on every execution and frees them after.
glibc serves the large ones with a fresh `mmap`, so each step page-faults on, and the kernel zeroes, all of its
temporaries; tcmalloc keeps freed pages for the next step (benchmarks/RESULTS.md §2f: CPU steps 1.1-2.8x faster).
A preloaded library must be in place before the interpreter starts, hence the re-exec, which happens before JAX is
imported. `TRANSFER_JAX_ALLOCATOR` picks: `auto` (default: tcmalloc when installed, else glibc), `tcmalloc`,
`jemalloc`, `system` (glibc, no re-exec) or the path of a malloc library; a library that is already in LD_PRELOAD
is kept. Nothing here imports JAX.
"""
from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Mapping

ALLOCATOR_ENV = "TRANSFER_JAX_ALLOCATOR"
# ctypes names of the libraries (gperftools' tcmalloc_minimal first: Debian/Ubuntu libtcmalloc-minimal4).
LIBRARIES = {"tcmalloc": ("tcmalloc_minimal", "tcmalloc"), "jemalloc": ("jemalloc",)}
INSTALL_HINT = ("apt-get install libtcmalloc-minimal4 (Debian/Ubuntu), dnf install gperftools-libs, or "
                "conda install -c conda-forge gperftools")
# gperftools reports every allocation above 1 GiB on stderr unless told otherwise: a step's temporaries at large
# batch sizes can hold such buffers on every step.
_QUIET_LARGE_ALLOCS = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}
# Temporaries above glibc's largest mmap threshold (32 MiB) are mapped afresh every step.
GLIBC_FAULT_TEMP_MIB = 64.0
GLIBC_RETAIN_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
GLIBC_RETAIN_TEMP_MIB = 1024.0
_EXPECTED = f"expected auto, system, {', '.join(LIBRARIES)} or the path of a malloc library"


class AllocatorError(ValueError):
    """A `TRANSFER_JAX_ALLOCATOR` value that names no usable library."""


def find_library(name: str) -> str | None:
    """The loader name (e.g. libtcmalloc_minimal.so.4) of a known allocator, or None when it is not installed."""
    for candidate in LIBRARIES[name]:
        found = ctypes.util.find_library(candidate)
        if found:
            return found
    return None


def _entries(ld_preload: str) -> list[str]:
    return ld_preload.replace(":", " ").split()


def preloaded_allocator(ld_preload: str) -> str | None:
    """The known allocator already named in an LD_PRELOAD value, or None."""
    for name in LIBRARIES:
        if any(name in os.path.basename(entry) for entry in _entries(ld_preload)):
            return name
    return None


def requested_library(environ: Mapping[str, str]) -> str | None:
    """The library to preload for `TRANSFER_JAX_ALLOCATOR` in `environ`; None for glibc or when it is preloaded
    already (also after the re-exec, even if the loader could not load it: no loop)."""
    choice = environ.get(ALLOCATOR_ENV, "auto").strip() or "auto"
    if choice == "system" or preloaded_allocator(environ.get("LD_PRELOAD", "")):
        return None
    if not sys.platform.startswith("linux"):
        if choice == "auto":
            return None
        raise AllocatorError(f"{ALLOCATOR_ENV}={choice}: preloading an allocator is supported on Linux only")
    if choice == "auto":
        return find_library("tcmalloc")
    if choice in LIBRARIES:
        found = find_library(choice)
        if found is None:
            hint = INSTALL_HINT if choice == "tcmalloc" else "install jemalloc (libjemalloc2)"
            raise AllocatorError(f"{ALLOCATOR_ENV}={choice}: the {choice} library is not installed ({hint})")
        return found
    if os.sep in choice:
        if not os.path.isfile(choice):
            raise AllocatorError(f"{ALLOCATOR_ENV}={choice}: no such file ({_EXPECTED})")
        path = os.path.abspath(choice)
        return None if path in _entries(environ.get("LD_PRELOAD", "")) else path
    raise AllocatorError(f"{ALLOCATOR_ENV}={choice!r}: {_EXPECTED}")


def preload_environment(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to re-execute with so that the requested allocator is preloaded; None to run as is."""
    library = requested_library(environ)
    if library is None:
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = " ".join(p for p in (library, environ.get("LD_PRELOAD", "")) if p)
    for key, value in _QUIET_LARGE_ALLOCS.items():
        env.setdefault(key, value)
    return env


def apply_host_allocator(argv: list[str] | None = None) -> None:
    """Re-execute this interpreter with the requested allocator preloaded (no return), or return to run as is.

    Call first thing in a command-line entry point, before JAX is imported."""
    try:
        env = preload_environment(os.environ)
    except AllocatorError as exc:
        sys.exit(f"error: {exc}")
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, list(argv if argv is not None else sys.orig_argv), env)


def main(argv: list[str]) -> None:
    """`python -m transfer_jax.allocator ARGS...`: run `python ARGS...` with the host allocator preloaded."""
    if not argv:
        sys.exit("usage: python -m transfer_jax.allocator [-m module | script] [args...]")
    command = [sys.executable, *argv]
    apply_host_allocator(command)
    os.execv(sys.executable, command)  # nothing to preload: run it as is


def active_allocator() -> str:
    """The allocator this process runs on, read from its mapped libraries: tcmalloc, jemalloc, the file name of
    another preloaded library, or glibc."""
    try:
        with open("/proc/self/maps") as maps:
            mapped = maps.read()
    except OSError:  # not Linux
        return preloaded_allocator(os.environ.get("LD_PRELOAD", "")) or "system"
    for name in LIBRARIES:
        if f"/lib{name}" in mapped:
            return name
    for entry in _entries(os.environ.get("LD_PRELOAD", "")):
        if os.path.basename(entry) in mapped:
            return os.path.basename(entry)
    return "glibc"


def host_memory_hint(platform: str, temp_mib: float, allocator: str, environ: Mapping[str, str]) -> str | None:
    """A hint for CPU steps whose temporaries glibc maps afresh on every step, else None."""
    if platform != "cpu" or allocator != "glibc" or temp_mib < GLIBC_FAULT_TEMP_MIB:
        return None
    if any(k in environ for k in GLIBC_RETAIN_ENV):
        return None
    hint = (f"hint: glibc malloc maps the step's {temp_mib:.0f} MiB of temporaries afresh on every step (page "
            f"faults); install tcmalloc ({INSTALL_HINT}) and the entry points preload it (CPU steps 1.1-2.8x "
            "faster)")
    if temp_mib >= GLIBC_RETAIN_TEMP_MIB:
        settings = " ".join(f"{k}={v}" for k, v in GLIBC_RETAIN_ENV.items())
        hint += f"; without it, {settings} keeps them mapped (slower on small steps)"
    return hint


if __name__ == "__main__":
    main(sys.argv[1:])
