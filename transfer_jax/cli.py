"""What the command-line entry points share: one flag style, --help, readable errors, the runtime set-up.

Every command spells its flags with underscores, as absl, the config fields and JAX do (`--batch_size`,
`--config.data.on_bad_case`, `--jax_platforms`); the dashed spelling of the same flag (`--batch-size`) is accepted
too. Each command's --help is its module docstring (what it does, examples) followed by every flag it takes.
"""
from __future__ import annotations

import argparse
import functools
import glob
import importlib.util
import os
import sys
import textwrap
from collections.abc import Callable, Sequence

from absl import app, flags, logging

HELP_ARGS = ("-h", "--help", "-help", "--helpshort", "-?")


def canonical_flags(argv: Sequence[str]) -> list[str]:
    """`argv` with every `--flag-name[=value]` spelled `--flag_name[=value]`; values, positional arguments and all
    that follows a bare `--` are left as they are."""
    out = []
    for index, arg in enumerate(argv):
        if arg == "--":
            return out + list(argv[index:])
        if arg.startswith("--"):
            name, sep, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + sep + value
        out.append(arg)
    return out


def prog_name(module: str) -> str:
    """How the user started the command: its console script (transfer-jax-*) or `python -m module`."""
    script = os.path.basename(sys.argv[0]) if sys.argv else ""
    return script if script.startswith("transfer-jax") else f"python -m {module}"


# ---------------------------------------------------------------------------------------------------------------
# argparse commands (predict, extract, alignment, convert)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the docstring's layout (examples stay one per line), wraps at the docstrings' width and names every
    non-empty default."""

    def __init__(self, prog, indent_increment=2, max_help_position=32, width=116):
        super().__init__(prog, indent_increment, max_help_position, width)

    def _get_help_string(self, action):
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not unset and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's conventions: `doc` (a module docstring) as the description, defaults shown,
    dashed flag spellings accepted."""

    def __init__(self, module: str, doc: str, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(prog=kwargs.pop("prog", prog_name(module)), description=doc.strip(), **kwargs)

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(canonical_flags(sys.argv[1:] if args is None else args), namespace)
        skip_absent_tpu()
        return parsed


_GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin", "jax_rocm6_plugin")


def skip_absent_tpu() -> None:
    """Runs on the CPU backend where libtpu is installed (the test extra brings it, for compile-only TPU programs)
    but the host has no TPU chip and no GPU plugin: otherwise JAX probes libtpu at start-up, which prints its
    warnings and finds nothing. A platform the user chose (JAX_PLATFORMS, --jax_platforms) is kept."""
    import jax

    if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
        return
    if importlib.util.find_spec("libtpu") is None or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return
    if any(importlib.util.find_spec(name) is not None for name in _GPU_PLUGINS):
        return
    jax.config.update("jax_platforms", "cpu")


# ---------------------------------------------------------------------------------------------------------------
# absl commands (main, study)


def _flag_help(name: str, required: bool) -> str:
    flag = flags.FLAGS[name]
    spelled = f"--[no]{name}" if flag.boolean else f"--{name}"
    note = " (required)" if required else ""
    if flag.default is not None:
        note = f" (default: {str(flag.default).lower() if flag.boolean else repr(flag.default)})"
    return textwrap.fill(f"{spelled}: {flag.help}{note}", width=116, initial_indent="  ",
                         subsequent_indent="      ")


def absl_help(doc: str, flag_names: Sequence[str], required: Sequence[str] = ()) -> str:
    """A command's --help: its docstring, its own flags, and where the others are listed."""
    listing = "\n".join(_flag_help(name, name in required) for name in flag_names)
    return (f"{doc.strip()}\n\nflags:\n{listing}\n  --config.<field>=VALUE: override one field of the config\n"
            "  --jax_<option>=VALUE: a JAX option, e.g. --jax_platforms=cpu\n\n"
            "--helpfull lists every flag, the --jax_* ones included.")


def parse_flags(argv, doc: str = "", flag_names: Sequence[str] = (), required: Sequence[str] = ()):
    """absl parsing with the command's own --help, and config mistakes reported as one line, not a traceback."""
    if any(arg in HELP_ARGS for arg in argv[1:]):
        print(absl_help(doc, flag_names, required))
        sys.exit(0)
    try:
        return flags.FLAGS(argv)
    except flags.Error as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        if any(line.startswith("Traceback") for line in lines):  # config-file errors arrive with a traceback
            lines = [lines[0], lines[-1]]
        sys.exit("error: " + "\n".join(lines) + "\nPass --help to list the flags.")
    except (AttributeError, KeyError) as exc:
        # ml_collections raises these for --config.<field> overrides that name no field of the (locked) config.
        name = str(exc).strip("\"'")
        sys.exit(f"error: unknown config field {name!r} in a --config.* override; the config file defines no such "
                 "field (check the spelling and the enclosing block, e.g. --config.optimizer.lr)")
    except ValueError as exc:  # a config file's get_config(arg) rejecting its argument, or a bad override value
        sys.exit(f"error: {exc}")


def reports_data_errors(main: Callable) -> Callable:
    """`main` with bad input data (`DataError`: a manifest, case or file problem, its message written for the user)
    ending the command as `error: <message>` and exit status 1, without a Python traceback."""
    from transfer_jax.data.errors import DataError

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except DataError as error:
            sys.exit(f"error: {error}")

    return wrapped


def run_absl(main: Callable, doc: str, flag_names: Sequence[str], required: Sequence[str] = ()) -> None:
    """`app.run(main)` for an absl entry point, with the JAX options as `--jax_*` flags (JAX reads them once the
    command line is parsed), dashed flag spellings accepted, the command's own --help and bad input data reported
    in one message (`reports_data_errors`)."""
    import jax

    jax.config.config_with_absl()
    flags.mark_flags_as_required(list(required))
    app.run(reports_data_errors(main), argv=canonical_flags(sys.argv),
            flags_parser=functools.partial(parse_flags, doc=doc, flag_names=flag_names, required=required))


def prepare_runtime(argv) -> None:
    """Shared by the absl entry points: no stray arguments, quiet library logs."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # library INFO chatter (Orbax, XLA) would drown the run log
    skip_absent_tpu()
