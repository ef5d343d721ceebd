"""Test-wide JAX set-up: 8 fake CPU devices, so every sharding path runs on a laptop or CI box."""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Generated phantom datasets go to a per-machine temp folder, not the user's cache.
os.environ.setdefault("TRANSFER_JAX_DATA_DIR", os.path.join(tempfile.gettempdir(), "transfer_jax_test_data"))
# Prepared cases too (the default cache is the user's; tests that count preparations use a folder of their own).
os.environ.setdefault("TRANSFER_JAX_CACHE_DIR", os.path.join(tempfile.gettempdir(), "transfer_jax_test_prepared"))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# Tests build the same small models many times: a persistent compilation cache turns recompiles into loads.
_CACHE = os.environ.get("TRANSFER_JAX_TEST_CACHE", os.path.join(tempfile.gettempdir(), "transfer_jax_xla_cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# The real sample case (MIT-licensed, see its README.md) ships with the tests.
SAMPLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "prostate_mri_sample")


@pytest.fixture
def highest_precision():
    """Parity tests compare against fp32 PyTorch: full-precision matmuls."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="session")
def sample_dir():
    if not os.path.isdir(SAMPLE_DIR):
        pytest.fail(f"real sample case not found at {SAMPLE_DIR}")
    return SAMPLE_DIR
