"""How a parallel generation splits its processes: a CFG degree (1 or 2) times a sequence degree.

    torchrun --nproc-per-node 4 -m cogvx_core generate ... --parallel cfg+sequence
        rank = cfg_rank * seq_degree + seq_rank: ranks 0, 1 run the unconditional half, 2, 3 the conditional one,
        each pair splitting the video tokens (Ulysses). Sequence groups are consecutive ranks, so on several
        machines the heavier all-to-all traffic stays inside one machine when a machine holds a sequence group.

Every rank ends each sampling step with the same latents, so the sampler itself runs unchanged on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from ..errors import CogVXError
from .comm import Traffic

MODES = ("cfg", "sequence", "cfg+sequence")


@dataclass(frozen=True)
class ParallelGroups:
    """One process's place in a parallel generation. Groups are None when their degree is 1."""

    mode: str
    rank: int
    world_size: int
    cfg_degree: int
    seq_degree: int
    cfg_group: dist.ProcessGroup | None  # the ranks sharing this rank's token slice (one per CFG half)
    seq_group: dist.ProcessGroup | None  # the ranks splitting this rank's CFG half by tokens
    group: dist.ProcessGroup | None = None  # all ranks (None: the default group)
    traffic: Traffic = field(default_factory=Traffic, compare=False)  # bytes this rank sent

    @property
    def cfg_rank(self) -> int:
        return self.rank // self.seq_degree

    @property
    def seq_rank(self) -> int:
        return self.rank % self.seq_degree

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def degrees(mode: str, world_size: int) -> tuple[int, int]:
    """(cfg degree, sequence degree) of `mode` on `world_size` processes."""
    if mode not in MODES:
        raise CogVXError(f"Unknown parallel mode {mode!r}; use one of {', '.join(MODES)}.")
    if mode == "cfg":
        if world_size != 2:
            raise CogVXError(f"--parallel cfg runs the two guidance halves on two processes; this launch has "
                             f"{world_size}. Start torchrun with --nproc-per-node 2, or use cfg+sequence.")
        return 2, 1
    if mode == "sequence":
        return 1, world_size
    if world_size % 2:
        raise CogVXError(f"--parallel cfg+sequence needs an even number of processes (2 x the sequence degree); "
                         f"this launch has {world_size}.")
    return 2, world_size // 2


def check_heads(heads: int, seq_degree: int, cfg_degree: int = 1) -> None:
    """Ulysses gives each rank heads / seq_degree whole heads: the degree must divide the head count."""
    if heads % seq_degree == 0:
        return
    ok = [d for d in range(1, heads + 1) if heads % d == 0]
    launches = ", ".join(str(d * cfg_degree) for d in ok if d * cfg_degree <= 64)
    raise CogVXError(f"Sequence parallelism splits the {heads} attention heads evenly, so the sequence degree must "
                     f"divide {heads}; this launch has sequence degree {seq_degree}. Degrees that work: "
                     f"{', '.join(map(str, ok))} (process counts for this mode: {launches}).")


def make_groups(mode: str, heads: int | None = None, group: dist.ProcessGroup | None = None) -> ParallelGroups:
    """The groups of `mode` over `group` (default: every process of the launch). Every rank of the default group
    must call this (creating groups is collective), with the same arguments."""
    if not dist.is_initialized():
        raise CogVXError("Parallel generation needs torch.distributed: launch with torchrun "
                         "(torchrun --nproc-per-node N -m cogvx_core generate ... --parallel MODE).")
    members = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    world, me = len(members), dist.get_rank()
    cfg_degree, seq_degree = degrees(mode, world)
    if heads is not None:
        check_heads(heads, seq_degree, cfg_degree)
    cfg_group = seq_group = None
    # new_group is collective: every rank creates every group, in the same order, and keeps its own
    for c in range(cfg_degree):
        ranks = [members[c * seq_degree + s] for s in range(seq_degree)]
        g = dist.new_group(ranks) if seq_degree > 1 else None
        if me in ranks:
            seq_group = g
    for s in range(seq_degree):
        ranks = [members[c * seq_degree + s] for c in range(cfg_degree)]
        g = dist.new_group(ranks) if cfg_degree > 1 else None
        if me in ranks:
            cfg_group = g
    rank = members.index(me) if me in members else -1
    return ParallelGroups(mode, rank, world, cfg_degree, seq_degree, cfg_group, seq_group, group)
