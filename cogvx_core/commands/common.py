"""Small pieces several commands share: the progress bar on stderr and the --lora PATH[:STRENGTH] argument."""

from __future__ import annotations

import sys
import time


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
