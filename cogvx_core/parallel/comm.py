"""The collectives of parallel generation, each counting the bytes this rank sends to other ranks.

The counts are what the README's traffic table reports against the analytic volume (`sequence.analytic_bytes`);
they count the payload handed to torch.distributed, not what a backend adds on the wire.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist


class Traffic:
    """Bytes sent to other ranks, per kind of collective ("all_to_all", "all_gather", "gather", "broadcast")."""

    def __init__(self):
        self.sent: Counter[str] = Counter()

    def add(self, kind: str, nbytes: int) -> None:
        self.sent[kind] += int(nbytes)

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    def reset(self) -> None:
        self.sent.clear()


def backend_device(group) -> torch.device:
    """Where the group's collectives want their tensors: the current GPU for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def group_size(group) -> int:
    return dist.get_world_size(group)


def all_to_all(send: torch.Tensor, send_counts: list[int], recv_counts: list[int], group, traffic: Traffic,
               me: int) -> torch.Tensor:
    """Flat all-to-all: element block j of `send` (send_counts[j] elements) goes to group rank j; the result holds
    recv_counts[j] elements from each group rank j, in rank order."""
    recv = send.new_empty(sum(recv_counts))
    dist.all_to_all_single(recv, send, output_split_sizes=recv_counts, input_split_sizes=send_counts, group=group)
    traffic.add("all_to_all", (sum(send_counts) - send_counts[me]) * send.element_size())
    return recv


def all_gather(t: torch.Tensor, group, traffic: Traffic) -> list[torch.Tensor]:
    """Every group rank's `t` (all of one shape), in rank order."""
    n = group_size(group)
    out = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(out, t.contiguous(), group=group)
    traffic.add("all_gather", (n - 1) * t.numel() * t.element_size())
    return out


def all_gather_padded(t: torch.Tensor, counts: list[int], group, traffic: Traffic) -> list[torch.Tensor]:
    """Every group rank's `t` (B, counts[rank], ...) padded along dim 1 to the largest count for the exchange."""
    longest = max(counts)
    padded = t
    if t.shape[1] < longest:
        padded = torch.cat([t, t.new_zeros(t.shape[0], longest - t.shape[1], *t.shape[2:])], dim=1)
    return [part[:, :c] for part, c in zip(all_gather(padded, group, traffic), counts)]


def _global(group, rank: int) -> int:
    return dist.get_global_rank(group, rank) if group is not None else rank


def broadcast_(t: torch.Tensor, src: int, group, traffic: Traffic) -> torch.Tensor:
    """`t` of group rank `src` on every rank of the group (in place)."""
    dist.broadcast(t, _global(group, src), group=group)
    if dist.get_rank(group) == src:
        traffic.add("broadcast", (group_size(group) - 1) * t.numel() * t.element_size())
    return t


def gather_flat(t: torch.Tensor, dst: int, group, traffic: Traffic) -> list[torch.Tensor] | None:
    """1-D tensors of any length from every rank, on rank `dst` (None elsewhere)."""
    n, me = group_size(group), dist.get_rank(group)
    length = torch.tensor([t.numel()], dtype=torch.long, device=t.device)
    lengths = [torch.empty_like(length) for _ in range(n)]
    dist.all_gather(lengths, length, group=group)
    sizes = [int(v) for v in lengths]
    padded = torch.cat([t, t.new_zeros(max(sizes) - t.numel())])
    parts = [torch.empty_like(padded) for _ in range(n)] if me == dst else None
    dist.gather(padded, parts, dst=_global(group, dst), group=group)
    if me != dst:
        traffic.add("gather", padded.numel() * padded.element_size())
        return None
    return [p[:s] for p, s in zip(parts, sizes)]
