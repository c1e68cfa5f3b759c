"""CogVXDecode: raw video latents -> IMAGE frames with the causal VAE, tiled when asked or when memory is short."""

from __future__ import annotations

import torch

from .core import CogVXError, decode_latents

from . import host
from .vae_run import TILING_MODES, TileSettings, run


class CogVXDecode:
    """Decodes a LATENT (B, 16, T, h, w) to frames; B videos become one IMAGE batch of B * frames."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("COGVX_VAE",),
                "samples": ("LATENT",),
                "tiling": (TILING_MODES, {"default": "auto", "tooltip": "auto: tiles only when the frame does not fit "
                                          "in free memory (and again, smaller, if it runs out); on: always; off: "
                                          "never (exactly the reference's untiled decode)."}),
                "tile_height": ("INT", {"default": 240, "min": 64, "max": 4096, "step": 8,
                                        "tooltip": "Tile height in pixels."}),
                "tile_width": ("INT", {"default": 360, "min": 64, "max": 4096, "step": 8,
                                       "tooltip": "Tile width in pixels."}),
                "overlap": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 0.5, "step": 0.05,
                                      "tooltip": "Overlap of neighbouring tiles (a fraction of a tile), blended to "
                                                 "hide seams."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    FUNCTION = "decode"
    CATEGORY = "CogVX/latent"
    DESCRIPTION = ("The CogVideoX causal VAE decode, frame chunk by frame chunk, with optional spatial tiles. "
                   "Progress per chunk; Cancel stops it between chunks.")

    def decode(self, vae, samples, tiling="auto", tile_height=240, tile_width=360, overlap=0.2, unique_id=None):
        z = samples.get("samples") if isinstance(samples, dict) else None
        if not isinstance(z, torch.Tensor) or z.ndim != 5:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else None
            raise CogVXError(f"CogVXDecode needs a video latent (B, 16, T, h, w); got {shape}. An image latent "
                             "(B, C, h, w) comes from an image model; use ComfyUI's VAE Decode for it.")
        b, _, _, h, w = z.shape

        def work(tiling, progress):
            return decode_latents(vae.vae, z, tiling=tiling, progress=progress)  # (B, T, H, W, 3)

        frames = run(vae, work, b, h * 8, w * 8, TileSettings(tiling, tile_height, tile_width, overlap), unique_id)
        return (frames.reshape(-1, *frames.shape[2:]).to(host.intermediate_device()),)
