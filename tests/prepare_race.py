"""Run in spawned processes by tests/test_cache.py; imports only the preprocessing, so that a process starts fast."""
from transfer_jax.data.preprocess import preprocess_cases


def prepare_together(barrier, results, cases, config, cache_dir) -> None:
    """Prepare `cases` once every process holding `barrier` is ready; put (cases prepared, entry paths) on
    `results`."""
    barrier.wait()
    report = preprocess_cases(cases, config, cache_dir, workers=0)
    results.put((report.prepared, sorted(report.paths.values())))
