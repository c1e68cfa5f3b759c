"""CFG parallelism: the unconditional and the conditional prediction of a step on two ranks, then exchanged so that
both ranks hold both and take the same sampler step (the sampler is elementwise and its draws come from a generator
every rank holds in the same state, see `share_generator`)."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from . import comm
from .groups import ParallelGroups


def guidance_context(uncond: torch.Tensor, cond: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """The text this rank predicts with: the unconditional half on CFG rank 0, the conditional on CFG rank 1."""
    return (uncond, cond)[groups.cfg_rank]


def exchange(v_mine: torch.Tensor, groups: ParallelGroups) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's half of the guidance pair -> (v_uncond, v_cond) on both ranks."""
    v_uncond, v_cond = comm.all_gather(v_mine, groups.cfg_group, groups.traffic)
    return v_uncond, v_cond


def share_generator(generator: torch.Generator, groups: ParallelGroups) -> torch.Generator:
    """Puts rank 0's generator state on every rank, so each rank's draws (the initial noise, the DPM sampler's noise)
    are the one sequence a single process would draw, whatever seed or state each rank started with."""
    state = generator.get_state().to(comm.backend_device(groups.group))  # NCCL moves GPU tensors only
    comm.broadcast_(state, 0, groups.group, groups.traffic)
    generator.set_state(state.cpu())
    return generator


@contextmanager
def cfg_parallel(transformer, groups: ParallelGroups):
    """Runs the transformer's products on the time embedding (time and ofs MLPs, every AdaLN's modulation linear)
    as two rows when given one (a no-op at CFG degree 1).

    A CFG rank predicts a batch of 1 where one process predicts [uncond, cond] together. BLAS takes a matrix-vector
    path for a single row, whose rounding differs from the matrix-matrix path of two rows (about 2e-7 relative, which
    guidance multiplies); two equal rows keep the batched run's numbers. The token products have many rows anyway.
    """
    if groups.cfg_degree == 1:
        yield transformer
        return
    linears = [transformer.time_embedding.linear_1, transformer.time_embedding.linear_2,
               transformer.norm_out.linear]
    if transformer.ofs_embedding is not None:
        linears += [transformer.ofs_embedding.linear_1, transformer.ofs_embedding.linear_2]
    for block in transformer.transformer_blocks:
        linears += [block.norm1.linear, block.norm2.linear]
    widened: set[int] = set()

    def widen(module, args):
        x = args[0]
        if x.ndim == 2 and x.shape[0] == 1:
            widened.add(id(module))
            return (x.repeat(2, 1), *args[1:])
        return None

    def narrow(module, args, out):
        if id(module) in widened:
            widened.discard(id(module))
            return out[:1]
        return None

    handles = [h for m in linears for h in (m.register_forward_pre_hook(widen), m.register_forward_hook(narrow))]
    try:
        yield transformer
    finally:
        for h in handles:
            h.remove()
