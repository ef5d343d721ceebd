"""The command lines: one flag style, --help with examples and every flag, console scripts that resolve."""
import ast
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import tomllib

import pytest

from transfer_jax.cli import canonical_flags
from transfer_jax.config import BACKBONES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (module whose main() parses, argv before --help, the example the help must show)
ARGPARSE_COMMANDS = {
    "predict": ("transfer_jax.predict", [], "python -m transfer_jax.predict --workdir="),
    "score": ("transfer_jax.score", [], "python -m transfer_jax.score --predictions="),
    "extract": ("transfer_jax.extract", [], "python -m transfer_jax.extract --model="),
    "alignment": ("transfer_jax.alignment.__main__", [], "python -m transfer_jax.alignment before.npy"),
    "convert": ("transfer_jax.convert.__main__", [], "python -m transfer_jax.convert profound --checkpoint="),
    "convert profound": ("transfer_jax.convert.__main__", ["profound"],
                         "python -m transfer_jax.convert profound --checkpoint="),
    "convert provicnet": ("transfer_jax.convert.__main__", ["provicnet"],
                          "python -m transfer_jax.convert provicnet --checkpoint="),
    "manifest picai": ("transfer_jax.data.manifest", ["picai"], "python -m transfer_jax.data.manifest picai --images"),
    "manifest prostate158": ("transfer_jax.data.manifest", ["prostate158"],
                             "python -m transfer_jax.data.manifest prostate158 --root"),
}


def _command(module: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_dashed_flags_are_spelled_with_underscores_and_values_are_kept():
    argv = ["prog", "--batch-size=2", "--num-heads", "3", "--test", "sign-flip", "--config.data.on_bad_case=skip",
            "x-y.npy", "--", "--not-a-flag"]
    assert canonical_flags(argv) == ["prog", "--batch_size=2", "--num_heads", "3", "--test", "sign-flip",
                                     "--config.data.on_bad_case=skip", "x-y.npy", "--", "--not-a-flag"]


@pytest.mark.parametrize("name", sorted(ARGPARSE_COMMANDS))
def test_argparse_help_has_examples_and_documents_every_flag(name, capsys):
    module, argv, example = ARGPARSE_COMMANDS[name]
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main([*argv, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert example in text
    options = text[text.index("options:"):]
    if name == "convert":  # the converters are subcommands
        assert re.search(r"^    profound +\S", text, flags=re.M) and re.search(r"^    provicnet +\S", text, flags=re.M)
        return
    flags = re.findall(r"^  (--\w+)(.*)$", options, flags=re.M)
    assert flags and all("-" not in flag[2:] for flag, _ in flags)  # one style: underscores
    undocumented = [flag for flag, rest in flags if not re.search(r"\s{2,}\S", rest) and not re.search(
        rf"^  {flag}.*\n {{20,}}\S", options, flags=re.M)]
    assert not undocumented, f"{name}: flags without help: {undocumented}"


def test_dashed_spelling_still_accepted(tmp_path):
    done = _command("transfer_jax.alignment", str(tmp_path / "missing.npy"), str(tmp_path / "y.npy"),
                    "--rff-features=16")
    assert done.returncode == 2 and "X file not found" in done.stderr  # parsed; failed on the file, not the flag


def test_main_help_lists_the_config_arguments_and_where_the_fields_are():
    done = _command("transfer_jax.main", "--help")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert all(backbone in text for backbone in BACKBONES) and "presets smoke, full" in text
    for config in sorted(os.listdir(os.path.join(REPO, "configs"))):
        if config.endswith(".py"):
            assert f"configs/{config}" in text
    assert "transfer_jax/config.py" in text and "--jax_platforms=cpu" in text
    assert "--workdir:" in text and "--config:" in text
    study = _command("transfer_jax.study", "--help")
    assert study.returncode == 0 and "--[no]compilation_cache:" in study.stdout and "python -m transfer_jax.study" \
        in study.stdout


def test_jax_flags_reach_jax():
    done = _command("transfer_jax.main", "--config=configs/seg.py:smoke", "--workdir=/nonexistent/run",
                    "--jax_platforms=bogus")
    assert done.returncode != 0 and "Unable to initialize backend 'bogus'" in done.stderr


def test_jax_flags_are_accepted_and_a_pretrained_run_needs_a_checkpoint(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    done = subprocess.run([sys.executable, "-m", "transfer_jax.main", "--config=configs/seg.py:smoke",
                           f"--workdir={tmp_path / 'run'}", "--jax_platforms=cpu", "--config.init.mode=pretrained"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: init.mode='pretrained' needs init.checkpoint")
    assert not os.path.exists(tmp_path / "run")


def test_console_scripts_resolve_to_functions():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert {"transfer-jax-train", "transfer-jax-study", "transfer-jax-predict", "transfer-jax-score",
            "transfer-jax-extract", "transfer-jax-alignment", "transfer-jax-convert", "transfer-jax-manifest"} <= set(scripts)
    for name, target in scripts.items():
        module, function = target.split(":")
        # Read, not imported: main and study define the same absl flags, so one process imports only one of them.
        with open(importlib.util.find_spec(module).origin) as source:
            defined = {node.name for node in ast.parse(source.read()).body if isinstance(node, ast.FunctionDef)}
        assert function in defined, f"{name}: {target} is not a function"
