"""VAE decode split across ranks by spatial tiles: the tiles of a tiled decode are independent until they are
blended, so rank r decodes tiles r, r + N, r + 2N, ... (row-major), rank 0 gathers them and blends exactly as a
one-process tiled decode does (`CausalVAE.blend_tiles`)."""

from __future__ import annotations

import torch

from . import comm
from .groups import ParallelGroups


def decode_split(vae, latents: torch.Tensor, tiling, groups: ParallelGroups) -> torch.Tensor | None:
    """Unscaled latents (B, C, t, h, w) -> pixels (B, 3, T, 8h, 8w) on rank 0, None on the other ranks.

    Without tiling, or with a video that fits one tile, there is nothing to split: rank 0 decodes alone.
    """
    z = latents.to(device=vae.device, dtype=vae.dtype)
    layout = vae.tile_layout(z, tiling)
    if layout is None or groups.world_size == 1:
        return vae.decode(z, tiling=tiling) if groups.is_main else None
    tiles = layout.tiles  # [(i, j, out_h, out_w)] row-major
    mine = [n for n in range(len(tiles)) if n % groups.world_size == groups.rank]
    with torch.no_grad():
        decoded = [vae.decode_tile(z, layout, *tiles[n][:2]).reshape(-1) for n in mine]
    flat = torch.cat(decoded) if decoded else z.new_empty(0)
    parts = comm.gather_flat(flat, 0, groups.group, groups.traffic)
    if parts is None:
        return None
    b, c, frames = z.shape[0], vae.config["out_channels"], vae.pixel_frames(z.shape[2])
    done: dict[tuple[int, int], torch.Tensor] = {}
    for rank, part in enumerate(parts):
        offset = 0
        for n in range(rank, len(tiles), groups.world_size):
            i, j, th, tw = tiles[n]
            size = b * c * frames * th * tw
            done[(i, j)] = part[offset:offset + size].view(b, c, frames, th, tw)
            offset += size
    return vae.blend_tiles(lambda i, j: done[(i, j)], layout)
