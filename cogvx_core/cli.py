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
    "bench-parallel": "bench_parallel",
}


def _load(name: str):
    return importlib.import_module(f"cogvx_core.commands.{COMMANDS[name]}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="cogvx", description="CogVideoX: generate, train, benchmark.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only the chosen command's module is imported; the others show by name in --help.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name in COMMANDS:
        if name == chosen:
            mod = _load(name)
            p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
            mod.add_arguments(p)
        else:
            sub.add_parser(name, help=f"(see `cogvx {name} --help`)")
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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
