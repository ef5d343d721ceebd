"""Run (or resume) the transfer study: every backbone x task x init fine-tuning run, then its statistics and report.

    python -m transfer_jax.study --config=configs/study.py:smoke --workdir=studies/smoke
    python -m transfer_jax.study --config=configs/study.py:cpu --workdir=studies/cpu \\
        --config.study.tasks="('seg',)" --config.study.overrides.total_steps=30

Presets of configs/study.py: smoke (every task's smoke config, a few steps), cpu (the default: tiny models on the
embedded phantom data), full (published sizes, for GPUs/TPUs); its docstring describes the study fields.
--config.study.overrides.<field>=VALUE changes a field of every run's task config, also one the preset does not
list. Re-running with the same --workdir skips finished runs and resumes the others from their checkpoints;
--config.study.seeds=3 repeats every run with three seeds (raising it later trains only the new seeds' runs).
"""
from absl import flags
from ml_collections import config_flags

from transfer_jax.cli import prepare_runtime, run_absl

# New attributes are accepted so that `--config.study.overrides.<field>=...` can add overrides; the study
# validates every field of its block, and overrides must name existing fields of the task configs.
_CONFIG = config_flags.DEFINE_config_file("config", None, "Study config and preset, e.g. configs/study.py:smoke.",
                                          lock_config=False, accept_new_attributes=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Study folder: runs/, results.csv, report.md, report.html, ...")
_COMPILATION_CACHE = flags.DEFINE_bool(
    "compilation_cache", True, "Cache compiled XLA programs in <workdir>/xla_cache: a backbone's pretrained and "
    "scratch runs compile the same programs.")


def main(argv):
    prepare_runtime(argv)
    from transfer_jax.study.runner import run_study_command

    run_study_command(_CONFIG.value, _WORKDIR.value, compilation_cache=_COMPILATION_CACHE.value)


def run():
    """The `transfer-jax-study` console script and `python -m transfer_jax.study`."""
    run_absl(main, __doc__, ["config", "workdir", "compilation_cache"], required=["config", "workdir"])


if __name__ == "__main__":
    run()
