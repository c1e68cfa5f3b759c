"""`python -m cogvx_core <command>` and the `cogvx` console script.

Each command lives in `cogvx_core/commands/<name>.py` with `HELP`, `add_arguments(parser)` and `run(args) -> int`.
A CogVXError (bad argument, bad file) ends the run with one clear line and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import CogVXError
from .safe_write import os_error_message

# name -> module under cogvx_core.commands; imported lazily so `--help` and unrelated commands stay fast.
COMMANDS = {
    "generate": "generate",
    "bench": "bench",
    "upsample": "upsample",
    "synth": "synth",
    "eval": "eval",
    "recipe": "recipe",
    "train": "train",
    "bench-train": "bench_train",
    "bench-vae": "bench_vae",
    "bench-gpu": "bench_gpu",
    "calibrate-cache": "calibrate_cache",
    "bench-speed": "bench_speed",
    "bench-parallel": "bench_parallel",
}


def _load(name: str):
    return importlib.import_module(f"cogvx_core.commands.{COMMANDS[name]}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows every option's default, except where there is none to show (unset, a flag's off, an empty
    list) or the help text already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default == [] or default is argparse.SUPPRESS
                or "default" in text or not action.option_strings):
            return text
        return super()._get_help_string(action)


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; only the `chosen` command's module is imported (the others show by name in --help)."""
    parser = argparse.ArgumentParser(prog="cogvx", description="CogVideoX: generate, train, benchmark.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        if name == chosen:
            mod = _load(name)
            p = sub.add_parser(name, help=mod.HELP, description=mod.HELP, formatter_class=HelpFormatter)
            mod.add_arguments(p)
        else:
            sub.add_parser(name, help=f"(see `cogvx {name} --help`)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(_load(args.command).run(args) or 0)
    except CogVXError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a vanished file or folder: the cause, not a traceback
        print(f"error: {os_error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
