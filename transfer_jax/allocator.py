"""The host allocator a run is on, and the hint to change it.

XLA:CPU allocates an executable's temporaries (the step's activations) on every execution and frees them after.
glibc serves the large ones with a fresh `mmap`, so each step page-faults on, and the kernel zeroes, all of its
temporaries; tcmalloc keeps freed pages for the next step (benchmarks/RESULTS.md §2f: CPU steps 1.1-2.8x faster).
A malloc library must be preloaded before the interpreter starts, so it is chosen on the command line, not here:
`scripts/run.sh` preloads tcmalloc when it is installed (`TRANSFER_JAX_ALLOCATOR=system` keeps glibc), and any other
command takes `LD_PRELOAD=libtcmalloc_minimal.so.4`. Nothing here imports JAX.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

# Known malloc libraries, by the name part of their file (libtcmalloc_minimal.so.4 -> tcmalloc).
LIBRARIES = ("tcmalloc", "jemalloc")
INSTALL_HINT = ("apt-get install libtcmalloc-minimal4 (Debian/Ubuntu), dnf install gperftools-libs, or "
                "conda install -c conda-forge gperftools")
PRELOAD_LINE = "LD_PRELOAD=libtcmalloc_minimal.so.4"
# Temporaries above glibc's largest mmap threshold (32 MiB) are mapped afresh every step.
GLIBC_FAULT_TEMP_MIB = 64.0
GLIBC_RETAIN_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
GLIBC_RETAIN_TEMP_MIB = 1024.0


def _preload_entries(environ: Mapping[str, str]) -> list[str]:
    return environ.get("LD_PRELOAD", "").replace(":", " ").split()


def active_allocator() -> str:
    """The allocator this process runs on, read from its mapped libraries: tcmalloc, jemalloc, the file name of
    another preloaded library, or glibc."""
    entries = _preload_entries(os.environ)
    try:
        with open("/proc/self/maps") as maps:
            mapped = maps.read()
    except OSError:  # not Linux: trust LD_PRELOAD
        named = [name for name in LIBRARIES if any(name in os.path.basename(e) for e in entries)]
        return named[0] if named else "system"
    for name in LIBRARIES:
        if f"/lib{name}" in mapped:
            return name
    for entry in entries:
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
            f"faults); install tcmalloc ({INSTALL_HINT}) and preload it: scripts/run.sh does, or start the command "
            f"with {PRELOAD_LINE} (CPU steps 1.1-2.8x faster)")
    if temp_mib >= GLIBC_RETAIN_TEMP_MIB:
        settings = " ".join(f"{k}={v}" for k, v in GLIBC_RETAIN_ENV.items())
        hint += f"; without it, {settings} keeps them mapped (slower on small steps)"
    return hint
