"""Timestep and position embeddings of the CogVideoX transformer.

All tables follow the reference's arithmetic exactly (dtypes included): the time embedding in fp32, the 2b sin-cos
table in fp64 from fp32 positions, the RoPE tables in fp32.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import ops as core_ops


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim) fp32, cosines first (flip_sin_to_cos, freq_shift 0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2 over a sinusoidal embedding (the time and the 1.5-I2V ofs embeddings)."""

    def __init__(self, in_dim: int, out_dim: int, device=None, dtype=None, operations=None):
        super().__init__()
        ops = core_ops.resolve(operations)
        self.linear_1 = ops.Linear(in_dim, out_dim, device=device, dtype=dtype)
        self.act = nn.SiLU()
        self.linear_2 = ops.Linear(out_dim, out_dim, device=device, dtype=dtype)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        emb = timestep_embedding(t, self.linear_1.in_features).to(dtype)  # (B, in_dim)
        return self.linear_2(self.act(self.linear_1(emb)))


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim) [sin | cos] in fp64 (the reference's omega is fp64, which promotes the product)."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = torch.outer(pos.reshape(-1).to(torch.float64), omega)  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_1d_table(dim: int, length: int, device=None) -> torch.Tensor:
    """(length, dim) [sin | cos] table of the positions 0 .. length-1, fp64."""
    return _sincos_1d(dim, torch.arange(length, dtype=torch.float32, device=device))


def sincos_3d_table(dim: int, frames: int, height: int, width: int, spatial_scale: float, temporal_scale: float,
                    device=None) -> torch.Tensor:
    """The 2b fixed position table for a (frames, height, width) token grid -> (frames*height*width, dim) fp64.

    Layout per token: [time: dim/4 | w-coordinate: 3dim/8 | h-coordinate: 3dim/8]; positions are fp32 grid values
    divided by the interpolation scales, as the reference computes them.
    """
    dim_spatial, dim_time = 3 * dim // 4, dim // 4
    grid_w = torch.arange(width, dtype=torch.float32, device=device) / spatial_scale
    grid_h = torch.arange(height, dtype=torch.float32, device=device) / spatial_scale
    w_coord = grid_w[None, :].expand(height, width)  # (H, W), row-major tokens
    h_coord = grid_h[:, None].expand(height, width)
    spatial = torch.cat([_sincos_1d(dim_spatial // 2, w_coord), _sincos_1d(dim_spatial // 2, h_coord)], dim=1)
    grid_t = torch.arange(frames, dtype=torch.float32, device=device) / temporal_scale
    temporal = _sincos_1d(dim_time, grid_t)  # (T, dim/4)
    table = torch.cat([temporal[:, None, :].expand(-1, height * width, -1),
                       spatial[None].expand(frames, -1, -1)], dim=-1)  # (T, H*W, dim)
    return table.reshape(frames * height * width, dim)


def _rope_1d(dim: int, pos: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """(M,) fp32 positions -> (M, dim/2) angles (each angle later serves an interleaved pair of features)."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=pos.device) / dim))
    return torch.outer(pos, freqs)


def crop_region_for_grid(grid_h: int, grid_w: int, base_h: int, base_w: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where a (grid_h, grid_w) token grid sits when resized-to-fit and centred into the (base_h, base_w) grid."""
    if grid_h / grid_w > base_h / base_w:
        resize_h, resize_w = base_h, int(round(base_h / grid_h * grid_w))
    else:
        resize_w, resize_h = base_w, int(round(base_w / grid_w * grid_h))
    top, left = int(round((base_h - resize_h) / 2.0)), int(round((base_w - resize_w) / 2.0))
    return (top, left), (top + resize_h, left + resize_w)


def rope_3d_angles(head_dim: int, frames: int, height: int, width: int, *, base_size: tuple[int, int] | None,
                   device=None) -> torch.Tensor:
    """Per-token RoPE angles for a (frames, height, width) token grid -> (frames*height*width, head_dim/2) fp32.

    Head features split t: head_dim/4, h: 3head_dim/8, w: 3head_dim/8. With `base_size` (CogVideoX 1.0) positions
    are the crop region of the grid inside the base grid, sampled with linspace; without it (1.5) they are the
    plain integers 0..n-1.
    """
    if base_size is not None:
        (top, left), (bottom, right) = crop_region_for_grid(height, width, *base_size)
        pos_h = torch.linspace(top, bottom * (height - 1) / height, height, dtype=torch.float32, device=device)
        pos_w = torch.linspace(left, right * (width - 1) / width, width, dtype=torch.float32, device=device)
        pos_t = torch.linspace(0, frames * (frames - 1) / frames, frames, dtype=torch.float32, device=device)
    else:
        pos_h = torch.arange(height, dtype=torch.float32, device=device)
        pos_w = torch.arange(width, dtype=torch.float32, device=device)
        pos_t = torch.arange(frames, dtype=torch.float32, device=device)
    dim_t, dim_hw = head_dim // 4, head_dim // 8 * 3
    ang_t = _rope_1d(dim_t, pos_t)[:, None, None, :].expand(-1, height, width, -1)
    ang_h = _rope_1d(dim_hw, pos_h)[None, :, None, :].expand(frames, -1, width, -1)
    ang_w = _rope_1d(dim_hw, pos_w)[None, None, :, :].expand(frames, height, -1, -1)
    return torch.cat([ang_t, ang_h, ang_w], dim=-1).reshape(frames * height * width, -1)


def rope_rotation(angles: torch.Tensor) -> torch.Tensor:
    """Angles (N, head_dim/2) -> rotations (N, head_dim/2, 2) float32: (cos, sin) pairs. Real-valued rather than
    complex, so torch.compile (inductor) fuses the rotation instead of falling back to eager complex kernels."""
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotates interleaved feature pairs (x0, x1), (x2, x3), ... of x (..., head_dim) by (cos, sin) pairs that
    broadcast against (..., head_dim/2, 2).

    (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin): the reference's real-valued rotation (the same products and sums
    as a complex product, bit for bit), done in fp32 and cast back like the reference.
    """
    x0, x1 = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)  # (..., N, head_dim/2) each
    cos, sin = rotation.unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2).to(x.dtype)
