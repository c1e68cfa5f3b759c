"""Training timesteps: the reference's plain uniform draw, or the paper's Explicit Uniform Sampling.

Explicit Uniform Sampling (CogVideoX paper, section 3.3) splits the timestep range into one interval per
data-parallel rank and lets each rank draw inside its own interval, so every step covers the whole range evenly and
the loss curve is steadier. Here the G = world_size * batch_size samples of one step are the slots of that split
(slot g = rank * batch_size + b owns interval g of G; with one sample per rank this is exactly the paper's rule).

So that one process gets the same benefit across its steps, the position inside the intervals is not drawn
independently each step: it follows a randomly rotated base-2 van der Corput sequence over the steps. Any 2^m
consecutive aligned steps then put one sample into each 1/2^m-th of every interval: with one GPU and batch 1, every
16 steps cover each sixteenth of [0, T) once. The rotation is redrawn every CYCLE steps from the run's seed.

    sampler = TimestepSampler(1000, "explicit", world_size=8, batch_size=1, seed=0)
    t = sampler(step, rank)  # (batch_size,) int64

Each call is a pure function of (seed, step, rank): a resumed run draws what an uninterrupted run draws.
"""

from __future__ import annotations

import torch

from ..errors import CogVXError
from .rng import generator

MODES = ("explicit", "uniform")
CYCLE = 1024  # steps per rotation of the low-discrepancy sequence


def van_der_corput(k: int, bits: int = 10) -> float:
    """The base-2 radical inverse of k < 2^bits: 0, 1/2, 1/4, 3/4, 1/8, 5/8, ..."""
    out = 0
    for _ in range(bits):
        out = (out << 1) | (k & 1)
        k >>= 1
    return out / (1 << bits)


class TimestepSampler:
    """(step, rank) -> the rank's batch of integer timesteps in [0, num_train_timesteps)."""

    def __init__(self, num_train_timesteps: int = 1000, mode: str = "explicit", *, world_size: int = 1,
                 batch_size: int = 1, seed: int = 0):
        if mode not in MODES:
            raise CogVXError(f"Unknown timestep sampling {mode!r}; use 'explicit' (Explicit Uniform Sampling, the "
                             "default) or 'uniform' (the reference trainers' independent uniform draw).")
        if world_size < 1 or batch_size < 1:
            raise CogVXError(f"world_size and batch_size must be at least 1, got {world_size} and {batch_size}.")
        self.num_train_timesteps = int(num_train_timesteps)
        self.mode = mode
        self.world_size, self.batch_size, self.seed = int(world_size), int(batch_size), int(seed)

    @property
    def slots(self) -> int:
        """Samples per step over all ranks: the number of intervals the range is split into."""
        return self.world_size * self.batch_size

    def offset(self, step: int) -> float:
        """Where in its interval every slot samples at `step`, in [0, 1): the same on every rank."""
        cycle, k = divmod(int(step), CYCLE)
        rotation = torch.rand((), generator=generator(self.seed, "timestep-rotation", cycle), dtype=torch.float64)
        return (van_der_corput(k) + float(rotation)) % 1.0

    def __call__(self, step: int, rank: int = 0) -> torch.Tensor:
        if not 0 <= rank < self.world_size:
            raise CogVXError(f"rank {rank} is outside this sampler's {self.world_size} ranks.")
        n = self.num_train_timesteps
        if self.mode == "uniform":  # the reference: torch.randint(0, T, (B,)) per step and rank
            return torch.randint(0, n, (self.batch_size,), generator=generator(self.seed, "timesteps", step, rank))
        v = self.offset(step)
        slots = torch.arange(rank * self.batch_size, (rank + 1) * self.batch_size, dtype=torch.float64)
        t = torch.floor((slots + v) / self.slots * n).long()
        return t.clamp_(0, n - 1)

    def interval(self, rank: int, b: int = 0) -> tuple[int, int]:
        """[low, high) of the timesteps slot (rank, b) draws from in explicit mode."""
        g, n = rank * self.batch_size + b, self.num_train_timesteps
        return int(g * n // self.slots), int(-(-(g + 1) * n // self.slots))
