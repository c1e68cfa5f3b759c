"""Gaussian noise drawn exactly as the reference draws it, so that a seed gives the reference's numbers.

diffusers' `randn_tensor` draws on a CPU generator's device (then moves the result) and, given a list of generators,
one draw per batch item. Video latents are drawn in the reference pipelines' (B, T, C, H, W) layout and permuted to
ours, so the same numbers land at the same places. Every random draw of the core goes through here.
"""

from __future__ import annotations

import torch

from .errors import CogVXError

Generator = torch.Generator | list[torch.Generator] | None


def reference_randn(shape: tuple[int, ...], generator: Generator, device: torch.device | str,
                    dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise of `shape`, drawn as diffusers' `randn_tensor` draws it."""
    device = torch.device(device)
    draw_device = device
    if generator is not None:
        gen_type = (generator[0] if isinstance(generator, list) else generator).device.type
        if gen_type != device.type:
            if gen_type != "cpu":
                raise CogVXError(f"A {gen_type} random generator cannot make noise for {device.type} tensors; use a "
                                 f"CPU generator (reproducible everywhere) or one on {device.type}.")
            draw_device = torch.device("cpu")
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise CogVXError(f"{len(generator)} generators for a batch of {shape[0]}; pass one per batch item.")
        draws = [torch.randn((1, *shape[1:]), generator=g, device=draw_device, dtype=dtype) for g in generator]
        return torch.cat(draws).to(device)
    return torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=dtype).to(device)


def randn_like_reference(shape_bcthw, generator: Generator, dtype: torch.dtype,
                         device: torch.device | str) -> torch.Tensor:
    """Video noise (B, C, T, H, W), drawn as the reference draws its (B, T, C, H, W) latents."""
    if len(shape_bcthw) != 5:
        raise CogVXError(f"Latent noise needs a 5-d shape (B, C, T, H, W), got {tuple(shape_bcthw)}.")
    b, c, t, h, w = (int(n) for n in shape_bcthw)
    noise = reference_randn((b, t, c, h, w), generator, device, dtype)
    return noise.permute(0, 2, 1, 3, 4).contiguous()  # (B, T, C, H, W) -> (B, C, T, H, W)
