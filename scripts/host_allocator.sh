# Sourced by scripts/run.sh: preload tcmalloc for the command it starts, when it is installed.
# XLA:CPU mallocs a step's temporaries on every execution; glibc maps the large ones afresh each time (page faults),
# tcmalloc keeps them (CPU steps 1.1-2.8x faster, benchmarks/RESULTS.md §2f). TRANSFER_JAX_ALLOCATOR=system keeps
# glibc malloc; a malloc library already in LD_PRELOAD is kept. For other commands, prefix them with
# LD_PRELOAD=libtcmalloc_minimal.so.4 yourself.

# The path of the installed tcmalloc (gperftools' minimal build first), or nothing.
find_tcmalloc() {
  local name dir
  for name in libtcmalloc_minimal.so.4 libtcmalloc.so.4; do
    local found
    found=$( { ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null || true; } \
             | awk -v lib="$name" '$1 == lib && !seen++ { print $NF }')
    if [ -n "$found" ]; then echo "$found"; return 0; fi
    for dir in ${CONDA_PREFIX:+"$CONDA_PREFIX/lib"} /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib64 \
               /usr/lib /usr/local/lib; do
      if [ -f "$dir/$name" ]; then echo "$dir/$name"; return 0; fi
    done
  done
  return 0
}

# Export LD_PRELOAD (and quiet gperftools' report of allocations above 1 GiB) when tcmalloc is to be used.
preload_host_allocator() {
  local choice="${TRANSFER_JAX_ALLOCATOR:-auto}"
  case "$choice" in
    system) return 0 ;;
    auto) ;;
    *) echo "error: TRANSFER_JAX_ALLOCATOR=$choice: expected auto (tcmalloc when installed) or system" >&2
       return 1 ;;
  esac
  case "${LD_PRELOAD:-}" in *malloc*) return 0 ;; esac
  local library
  library=$(find_tcmalloc)
  [ -n "$library" ] || return 0
  export LD_PRELOAD="$library${LD_PRELOAD:+ $LD_PRELOAD}"
  export TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD="${TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD:-1099511627776}"
  echo "host allocator: LD_PRELOAD=$library (TRANSFER_JAX_ALLOCATOR=system keeps glibc malloc)"
}
