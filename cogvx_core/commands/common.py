"""Small pieces several commands share: the progress bar on stderr, the --lora PATH[:STRENGTH] argument and the
check that the benchmarks' test-only reference (diffusers, peft) is installed."""

from __future__ import annotations

import importlib.util
import sys
import time

from ..errors import CogVXError


def bar(done: int, total: int, width: int) -> str:
    """`[###.....]`: the filled share of `width` cells."""
    filled = int(width * done / max(total, 1))
    return f"[{'#' * filled}{'.' * (width - filled)}]"


class ProgressBar:
    """A one-line progress bar on stderr with the step time, called as progress(done, total)."""

    def __init__(self, label: str):
        self.label, self.start = label, time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        rate = (time.perf_counter() - self.start) / max(done, 1)
        sys.stderr.write(f"\r{self.label} {bar(done, total, 30)} {done}/{total} {rate:.2f}s/it")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def parse_lora(spec: str) -> tuple[str, float]:
    """`PATH[:STRENGTH]` -> (path, strength); the strength defaults to 1.0 (a Windows drive colon is part of PATH)."""
    path, sep, strength = spec.rpartition(":")
    if sep and path and not path.endswith(("\\", "/")):
        try:
            return path, float(strength)
        except ValueError:
            pass
    return spec, 1.0


def require_reference(command: str, *packages: str) -> None:
    """Stops `command` with one clear line when a package of the reference it compares against is missing."""
    missing = [name for name in packages if not _installed(name)]
    if missing:
        raise CogVXError(f"`{command}` needs {' and '.join(missing)}, the test-only reference: "
                         "pip install -e '.[test]'")


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a module blocked in sys.modules (None) or without a spec
        return False
