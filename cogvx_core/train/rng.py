"""Per-step random streams: every random draw of a training step is a pure function of (seed, step, rank, purpose).

Nothing random is carried from one step to the next, so a run resumed at step k draws exactly what an uninterrupted
run draws at step k, on any number of processes, without saving generator states.
"""

from __future__ import annotations

import hashlib

import torch

_MASK = (1 << 63) - 1


def stream_seed(*parts) -> int:
    """A 63-bit seed from any parts (ints, strings): stable across processes, platforms and Python versions."""
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & _MASK


def generator(*parts) -> torch.Generator:
    """A fresh CPU generator for one purpose, e.g. generator(seed, "noise", step, rank)."""
    return torch.Generator("cpu").manual_seed(stream_seed(*parts))
