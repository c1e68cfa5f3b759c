"""Live previews while sampling: a linear latent -> RGB projection of one latent frame.

CogVideoX has no published latent_rgb_factors, so the projection is fitted to the VAE itself: decode a few random
latents once, average the decoded pixels over each latent cell, and solve the least-squares 16 -> 3 map (plus bias)
from latent values to those colours. The colours belong to the VAE that made a latent: a VAE handle fits them once
(`CogVXVAE.preview_colours`) and the latents its nodes make carry them to the sampler (`attach`). A latent without
them (no VAE connected) previews its structure, not its colour: three channel groups, each frame stretched to the
full range.
"""

from __future__ import annotations

import torch
from PIL import Image

from . import host

KEY = "cogvx_preview"  # LATENT entry: (weight (3, C), bias (3,)) of the VAE that made the latent

Projection = tuple[torch.Tensor, torch.Tensor]


@torch.no_grad()
def fit_projection(vae, size: int = 16, seed: int = 0) -> Projection:
    """(weight (3, C), bias (3,)) mapping raw latent values to RGB in [-1, 1], least squares on the VAE's decode
    of random latents (B=1, one latent frame of size x size cells). `vae` must be on its compute device."""
    channels = vae.config["latent_channels"]
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((1, channels, 1, size, size), generator=g)  # (B, C, T, h, w) raw latents
    pixels = vae.decode(z.to(vae.device, vae.dtype)).float().cpu()  # (1, 3, 1, H, W)
    f = pixels.shape[-1] // size
    rgb = torch.nn.functional.avg_pool2d(pixels[:, :, 0], f)  # (1, 3, h, w): one colour per latent cell
    x = torch.cat([z[0, :, 0].flatten(1), torch.ones(1, size * size)]).T  # (cells, C + 1)
    y = rgb[0].flatten(1).T  # (cells, 3)
    solution = torch.linalg.lstsq(x.double(), y.double()).solution.float()  # (C + 1, 3)
    return solution[:-1].T.contiguous(), solution[-1].contiguous()


def attach(latent: dict, vae_handle) -> dict:
    """`latent` with the preview colours of the VAE that made it (fitted once per VAE, only when previews are on)."""
    if vae_handle is not None and host.previews_enabled():
        latent[KEY] = vae_handle.preview_colours
    return latent


def colours(*latents: dict | None) -> Projection | None:
    """The preview colours the first of `latents` that has them carries."""
    return next((lat[KEY] for lat in latents if isinstance(lat, dict) and lat.get(KEY) is not None), None)


@torch.no_grad()
def latent_to_image(raw: torch.Tensor, projection: Projection | None = None) -> Image.Image:
    """The middle latent frame of the first video of raw latents (B, C, T, h, w) as a PIL image (h x w)."""
    frame = raw[0, :, raw.shape[2] // 2].float().cpu()  # (C, h, w)
    if projection is not None:
        weight, bias = projection
        rgb = torch.einsum("oc,chw->ohw", weight, frame) + bias[:, None, None]  # (3, h, w) in about [-1, 1]
    else:
        groups = frame.tensor_split(3, dim=0)
        rgb = torch.stack([g.mean(0) for g in groups])
        lo, hi = rgb.amin(), rgb.amax()
        rgb = (rgb - lo) / (hi - lo).clamp_min(1e-6) * 2 - 1
    array = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)
