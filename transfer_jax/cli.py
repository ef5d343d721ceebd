"""What the absl entry points share: flag parsing with readable errors, and the runtime set-up."""
import sys

from absl import app, flags, logging


def parse_flags(argv):
    """absl parsing, with config mistakes reported as one line instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        if any(line.startswith("Traceback") for line in lines):  # config-file errors arrive with a traceback
            lines = [lines[0], lines[-1]]
        sys.exit("error: " + "\n".join(lines) + "\nPass --helpfull to list the flags.")
    except (AttributeError, KeyError) as exc:
        # ml_collections raises these for --config.<field> overrides that name no field of the (locked) config.
        name = str(exc).strip("\"'")
        sys.exit(f"error: unknown config field {name!r} in a --config.* override; the config file defines no such "
                 "field (check the spelling and the enclosing block, e.g. --config.optimizer.lr)")
    except ValueError as exc:  # a config file's get_config(arg) rejecting its argument, or a bad override value
        sys.exit(f"error: {exc}")


def prepare_runtime(argv) -> None:
    """Shared by the entry points: no stray arguments, quiet library logs, `--jax_*` flags honoured."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # library INFO chatter (Orbax, XLA) would drown the run log
    import jax

    jax.config.config_with_absl()
