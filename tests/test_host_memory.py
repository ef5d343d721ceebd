"""The trainer's hint for CPU steps whose temporaries glibc maps afresh every step."""
from transfer_jax.train.step import RETAIN_HOST_MEMORY_ENV, host_memory_hint


def test_hint_only_for_large_cpu_temporaries_under_glibc_defaults():
    large, small = {"temp_mib": 5908.0}, {"temp_mib": 169.0}
    hint = host_memory_hint("cpu", large, {})
    assert hint is not None and "5.8 GiB" in hint
    assert all(f"{k}={v}" in hint for k, v in RETAIN_HOST_MEMORY_ENV.items())
    assert host_memory_hint("cpu", small, {}) is None
    assert host_memory_hint("gpu", large, {}) is None
    assert host_memory_hint("cpu", large, {"MALLOC_ARENA_MAX": "1"}) is None
    assert host_memory_hint("cpu", {}, {}) is None
