"""Running the VAE inside the host: memory first, tiling when memory is short, a progress bar, and interrupts.

The 3D causal VAE works on chunks of frames (8 pixel frames in, 2 latent frames out), so its peak memory is set by
the frame size, not the video length: about 128 channels x ~10 frames at full resolution, with a few buffers alive
at once. `vae_memory` estimates that; "auto" tiling splits the frame into overlapping tiles when the estimate does
not fit in free memory, and falls back to tiles (then smaller tiles) if the device still runs out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .core import CogVXError, Tiling

from . import host

TILING_MODES = ["auto", "on", "off"]
MIN_TILE = 64  # pixels; tiles shrink to this at most when memory runs out


@dataclass(frozen=True)
class TileSettings:
    """A VAE node's tiling inputs."""

    mode: str = "auto"  # auto | on | off
    tile_height: int = 240  # pixels
    tile_width: int = 360
    overlap: float = 0.2  # of a tile, both directions

    def tiling(self, scale: float = 1.0) -> Tiling:
        """The VAE's tiling at `scale` times the tile size (tiles shrink when memory runs out)."""
        return Tiling(tile_height=max(MIN_TILE, int(self.tile_height * scale) // 8 * 8),
                      tile_width=max(MIN_TILE, int(self.tile_width * scale) // 8 * 8),
                      overlap_height=self.overlap, overlap_width=self.overlap)


def vae_memory(batch: int, height: int, width: int, dtype: torch.dtype) -> int:
    """Rough peak bytes of one VAE pass over frames of height x width pixels (see the module note)."""
    elem = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    return int(batch * 128 * 10 * height * width * elem * 6)


def run(vae_handle, work: Callable[..., torch.Tensor], batch: int, height: int, width: int, tiling: TileSettings,
        node_id: str | None = None, what: str = "decode") -> torch.Tensor:
    """work(tiling=Tiling or None, progress=callable) on the loaded VAE, tiled as `tiling` and memory say."""
    vae = vae_handle.vae
    need = vae_memory(batch, height, width, vae.dtype)
    tile_need = vae_memory(batch, min(height, tiling.tile_height), min(width, tiling.tile_width), vae.dtype)
    # The host frees other models (e.g. the transformer, done by now) for an untiled pass when it can.
    device = vae_handle.managed.load(tile_need if tiling.mode == "on" else need)
    tiled = tiling.mode == "on"
    if tiling.mode == "auto" and need > host.free_memory(device):
        tiled = True
        host.say(f"VAE {what}: {width}x{height} frames need about {need / 2**30:.1f} GiB untiled; using "
                 f"{tiling.tile_width}x{tiling.tile_height} tiles.", node_id)

    def attempt(scale: float | None) -> torch.Tensor:
        bar = host.Progress(1)

        def progress(done: int, total: int) -> None:
            bar.total = max(total, 1)
            bar.update(done)

        with torch.no_grad():
            return work(tiling=tiling.tiling(scale) if scale is not None else None, progress=progress)

    scale = 1.0 if tiled else None
    while True:
        try:
            return attempt(scale)
        except Exception as e:
            if not host.is_oom(e) or tiling.mode == "off":
                if host.is_oom(e):
                    raise CogVXError(f"Out of memory in the VAE {what} at {width}x{height}. Set tiling to auto or on, "
                                     "or use smaller tiles.") from None
                raise
            host.empty_cache()
            if scale is not None and min(tiling.tile_height, tiling.tile_width) * scale / 2 < MIN_TILE:
                raise CogVXError(f"Out of memory in the VAE {what} even with {MIN_TILE}-pixel tiles. Free GPU memory "
                                 "(unload other models) or generate a smaller video.") from None
            scale = 1.0 if scale is None else scale / 2
            host.say(f"VAE {what} ran out of memory; retrying with tiles of "
                     f"{int(tiling.tile_width * scale)}x{int(tiling.tile_height * scale)}.", node_id)
