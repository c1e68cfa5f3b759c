"""The CogVideoX 3D causal VAE (diffusers `AutoencoderKLCogVideoX`), numerically identical to diffusers 0.42.1.

Video goes through the encoder in chunks of 8 pixel frames and through the decoder in chunks of 2 latent frames;
the first chunk takes the remainder (49 frames = 9 + 5*8, 13 latents = 3 + 5*2). Causal conv caches carry across
chunks and GroupNorm statistics are per chunk, so the chunking is part of the numerics. Tiled mode splits H and W
into overlapping tiles, each run through the same chunk loop with its own caches, blended as the reference does.
See the reference notes: cogvideox-spec.md section 3.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .errors import CogVXError
from .modules import ops as core_ops
from .noise import reference_randn
from .modules.causal_conv import CausalConv3d, FrameCache
from .modules.vae_blocks import (
    DownBlock3D, MidBlock3D, SpatialNorm3D, UpBlock3D, compressed_frames, expanded_frames, silu, take)
from .variants import VAE_DEFAULTS

Progress = Callable[[int, int], None]

SAMPLE_FRAMES_PER_CHUNK = 8  # encode: pixel frames per chunk
LATENT_FRAMES_PER_CHUNK = 2  # decode: latent frames per chunk


class Encoder3D(nn.Module):
    def __init__(self, in_channels: int, latent_channels: int, block_out_channels: list[int], layers_per_block: int,
                 norm_num_groups: int, norm_eps: float, time_levels: int, operations=None):
        super().__init__()
        ops = core_ops.resolve(operations)
        self.conv_in = CausalConv3d(in_channels, block_out_channels[0], kernel_size=3, operations=ops)
        self.down_blocks = nn.ModuleList()
        out_ch = block_out_channels[0]
        for i, ch in enumerate(block_out_channels):
            in_ch, out_ch = out_ch, ch
            self.down_blocks.append(DownBlock3D(
                in_ch, out_ch, layers_per_block, norm_num_groups, norm_eps,
                add_downsample=i < len(block_out_channels) - 1, compress_time=i < time_levels, operations=ops))
        self.mid_block = MidBlock3D(block_out_channels[-1], norm_num_groups, norm_eps, operations=ops)
        self.norm_out = ops.GroupNorm(norm_num_groups, block_out_channels[-1], eps=1e-6)
        self.conv_out = CausalConv3d(block_out_channels[-1], 2 * latent_channels, kernel_size=3, operations=ops)

    def forward(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        # (B, 3, T, H, W) -> (B, 2*latent, t, H/8, W/8): mean and logvar
        h = [self.conv_in(x, cache)]  # handed from layer to layer (see vae_blocks.take)
        for block in self.down_blocks:
            h = [block(h, cache)]
        h = silu(self.norm_out(self.mid_block(h, None, cache)))
        h = self.conv_out.pad(h, cache)
        return self.conv_out.conv(h)


class Decoder3D(nn.Module):
    def __init__(self, latent_channels: int, out_channels: int, block_out_channels: list[int], layers_per_block: int,
                 norm_num_groups: int, norm_eps: float, time_levels: int, operations=None):
        super().__init__()
        ops = core_ops.resolve(operations)
        channels = list(reversed(block_out_channels))
        self.conv_in = CausalConv3d(latent_channels, channels[0], kernel_size=3, operations=ops)
        self.mid_block = MidBlock3D(channels[0], norm_num_groups, norm_eps, spatial_norm_dim=latent_channels,
                                    operations=ops)
        self.up_blocks = nn.ModuleList()
        out_ch = channels[0]
        for i, ch in enumerate(channels):
            in_ch, out_ch = out_ch, ch
            self.up_blocks.append(UpBlock3D(
                in_ch, out_ch, layers_per_block + 1, norm_num_groups, norm_eps, spatial_norm_dim=latent_channels,
                add_upsample=i < len(channels) - 1, compress_time=i < time_levels, operations=ops))
        self.norm_out = SpatialNorm3D(channels[-1], latent_channels, groups=norm_num_groups, operations=ops)
        self.conv_out = CausalConv3d(channels[-1], out_channels, kernel_size=3, operations=ops)

    def forward(self, z: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        # (B, latent, t, h, w) -> (B, 3, T, 8h, 8w); z is also the spatial norms' condition
        h = [self.conv_in(z, cache)]  # handed from layer to layer (see vae_blocks.take)
        h = [self.mid_block(h, z, cache)]
        for block in self.up_blocks:
            h = [block(h, z, cache)]
        h = silu(self.norm_out(take(h), z))
        h = self.conv_out.pad(h, cache)
        return self.conv_out.conv(h)


class DiagonalGaussian:
    """The encoder's posterior: mean and clamped log-variance, sampled exactly as diffusers'
    DiagonalGaussianDistribution (noise from `randn_tensor` semantics)."""

    def __init__(self, h: torch.Tensor):
        # h: (B, 2*latent, t, h, w)
        self.parameters = h
        self.mean, logvar = torch.chunk(h, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        noise = reference_randn(tuple(self.mean.shape), generator, self.parameters.device, self.parameters.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean


def frame_chunks(frames: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) of each chunk: `chunk` frames each, the first one also taking the remainder."""
    count = max(frames // chunk, 1)
    rest = frames % chunk
    return [(chunk * i + (rest if i else 0), min(chunk * (i + 1) + rest, frames)) for i in range(count)]


def _blend_rows(above: torch.Tensor, tile: torch.Tensor, extent: int) -> None:
    """Fades the top rows of `tile` in from the bottom rows of the tile above, in place (reference `blend_v`)."""
    extent = min(above.shape[3], tile.shape[3], extent)
    for y in range(extent):
        tile[:, :, :, y, :] = above[:, :, :, -extent + y, :] * (1 - y / extent) + tile[:, :, :, y, :] * (y / extent)


def _blend_columns(left: torch.Tensor, tile: torch.Tensor, extent: int) -> None:
    """Fades the left columns of `tile` in from the right columns of the tile on its left, in place (`blend_h`)."""
    extent = min(left.shape[4], tile.shape[4], extent)
    for x in range(extent):
        tile[:, :, :, :, x] = left[:, :, :, :, -extent + x] * (1 - x / extent) + tile[:, :, :, :, x] * (x / extent)


@dataclass(frozen=True)
class Tiling:
    """Spatial tiles for the VAE (the reference's `enable_tiling`): tile size in pixels and the overlap of neighbouring
    tiles as a fraction of a tile. None (or 0) takes the reference's default: half the VAE's sample size, overlaps 1/6
    (height) and 1/5 (width)."""

    tile_height: int | None = None
    tile_width: int | None = None
    overlap_height: float | None = None
    overlap_width: float | None = None


@dataclass(frozen=True)
class _TileGrid:
    """Resolved tiling: tile sizes in pixels (sample) and latent cells, overlap fractions."""

    sample_h: int
    sample_w: int
    latent_h: int
    latent_w: int
    overlap_h: float
    overlap_w: float


@dataclass(frozen=True)
class TileLayout:
    """A tiled decode's tiles: rows and cols are (latent origin, decoded size in pixels); blends and crops in pixels."""

    grid: _TileGrid
    rows: list[tuple[int, int]]
    cols: list[tuple[int, int]]
    blend_h: int
    blend_w: int
    limit_h: int
    limit_w: int

    @property
    def tiles(self) -> list[tuple[int, int, int, int]]:
        """(i, j, decoded height, decoded width) of every tile, row-major (the order they are blended in)."""
        return [(i, j, th, tw) for i, th in self.rows for j, tw in self.cols]


def tile_grid(config: dict, tiling: Tiling | None) -> _TileGrid | None:
    """A VAE config's tiling settings (the reference's `enable_tiling` semantics: unset or 0 means the default), or
    None for an untiled run. Functions of the config, so the memory planner lays out tiles without a model."""
    if tiling is None:
        return None
    factor = _spatial_factor(config)
    sample_h = tiling.tile_height or config["sample_height"] // 2
    sample_w = tiling.tile_width or config["sample_width"] // 2
    grid = _TileGrid(sample_h=sample_h, sample_w=sample_w, latent_h=int(sample_h / factor),
                     latent_w=int(sample_w / factor), overlap_h=tiling.overlap_height or 1 / 6,
                     overlap_w=tiling.overlap_width or 1 / 5)
    for axis, sample, latent, overlap in (("height", grid.sample_h, grid.latent_h, grid.overlap_h),
                                          ("width", grid.sample_w, grid.latent_w, grid.overlap_w)):
        if not 0 < overlap < 1 or int(latent * (1 - overlap)) < 1:
            raise CogVXError(
                f"VAE tiling: tiles of {sample} pixels with overlap {overlap} leave no stride along {axis}. Use "
                f"tiles of at least {2 * factor} pixels and overlap factors between 0 and 1 (the defaults are 1/6 "
                "and 1/5).")
    return grid


def decode_tile_layout(config: dict, height: int, width: int, tiling: Tiling | None) -> TileLayout | None:
    """Where the decode tiles of latents of height x width cells lie; None when tiling is off or one tile covers
    them (the decode then runs untiled)."""
    s = tile_grid(config, tiling)
    if s is None or (width <= s.latent_w and height <= s.latent_h):
        return None
    f = _spatial_factor(config)
    stride_h = int(s.latent_h * (1 - s.overlap_h))
    stride_w = int(s.latent_w * (1 - s.overlap_w))
    blend_h = int(s.sample_h * s.overlap_h)
    blend_w = int(s.sample_w * s.overlap_w)
    rows = [(i, f * min(s.latent_h, height - i)) for i in range(0, height, stride_h)]
    cols = [(j, f * min(s.latent_w, width - j)) for j in range(0, width, stride_w)]
    return TileLayout(s, rows, cols, blend_h, blend_w, s.sample_h - blend_h, s.sample_w - blend_w)


def _spatial_factor(config: dict) -> int:
    return 2 ** (len(config["block_out_channels"]) - 1)


class CausalVAE(nn.Module):
    """AutoencoderKLCogVideoX: `encode` pixels (B, 3, 4k+1, H, W) in [-1, 1] to latents (B, 16, k+1, H/8, W/8),
    `decode` latents back. Latents are unscaled here; the pipeline applies `scaling_factor`."""

    def __init__(self, config: dict, operations=None):
        super().__init__()
        cfg = _checked_config(config)
        self.config = cfg
        self.scaling_factor: float | None = cfg["scaling_factor"]
        self.invert_scale_latents: bool = bool(cfg["invert_scale_latents"])
        boc = list(cfg["block_out_channels"])
        self.time_levels = int(math.log2(cfg["temporal_compression_ratio"]))
        self.spatial_factor = _spatial_factor(cfg)
        self.encoder = Encoder3D(cfg["in_channels"], cfg["latent_channels"], boc, cfg["layers_per_block"],
                                 cfg["norm_num_groups"], cfg["norm_eps"], self.time_levels, operations)
        self.decoder = Decoder3D(cfg["latent_channels"], cfg["out_channels"], boc, cfg["layers_per_block"],
                                 cfg["norm_num_groups"], cfg["norm_eps"], self.time_levels, operations)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---------------------------------------------------------------- frame arithmetic

    def latent_frames(self, frames: int) -> int:
        """Latent frames the encoder makes of `frames` pixel frames (chunk by chunk)."""
        total = 0
        for start, end in frame_chunks(frames, SAMPLE_FRAMES_PER_CHUNK):
            n = end - start
            for _ in range(min(self.time_levels, len(self.encoder.down_blocks) - 1)):
                n = compressed_frames(n)
            total += n
        return total

    def pixel_frames(self, latent_frames: int) -> int:
        """Pixel frames the decoder makes of `latent_frames` latent frames (chunk by chunk)."""
        total = 0
        for start, end in frame_chunks(latent_frames, LATENT_FRAMES_PER_CHUNK):
            n = end - start
            for _ in range(min(self.time_levels, len(self.decoder.up_blocks) - 1)):
                n = expanded_frames(n)
            total += n
        return total

    def _encoded_size(self, size: int) -> int:
        for _ in range(len(self.encoder.down_blocks) - 1):
            size //= 2  # Conv2d(k3, s2) after one row/column of zero padding
        return size

    def _autograd(self, x: torch.Tensor):
        """no_grad unless a graph could really be recorded (the input or a weight requires grad): the in-place,
        memory-saving path then runs even for callers that did not switch autograd off."""
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return contextlib.nullcontext()
        return torch.no_grad()

    # ---------------------------------------------------------------- checks

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        if not isinstance(pixels, torch.Tensor) or pixels.ndim != 5:
            shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            hint = " (a single image batch (B, C, H, W) needs .unsqueeze(2))" if getattr(pixels, "ndim", 0) == 4 else ""
            raise CogVXError(f"VAE encode expects a video tensor (B, C, T, H, W); got {shape}{hint}.")
        bsz, channels, frames, height, width = pixels.shape
        if not pixels.is_floating_point():
            raise CogVXError(f"VAE encode expects float pixels in [-1, 1]; got {pixels.dtype}. Convert with "
                             "x.float() / 127.5 - 1 for 8-bit images.")
        if channels != self.config["in_channels"]:
            raise CogVXError(f"VAE encode expects {self.config['in_channels']} channels in dim 1 of (B, C, T, H, W); "
                             f"got {channels} (shape {tuple(pixels.shape)}). Put channels before frames.")
        step = 2 ** self.time_levels
        if frames < 1 or (frames - 1) % step:
            lower = max(1, (frames - 1) // step * step + 1)
            options = f"{lower} or {lower + step}" if frames > 1 else "1"
            raise CogVXError(f"VAE encode needs {step}k+1 frames (1, {1 + step}, {1 + 2 * step}, ...); "
                             f"got {frames} frames; use {options}.")
        f = self.spatial_factor
        if height % f or width % f or height == 0 or width == 0:
            raise CogVXError(f"VAE encode needs height and width divisible by {f}; got {height}x{width} (HxW). "
                             f"Resize or crop to e.g. {max(f, height // f * f)}x{max(f, width // f * f)}.")

    def _check_latents(self, latents: torch.Tensor) -> None:
        if not isinstance(latents, torch.Tensor) or latents.ndim != 5:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise CogVXError(f"VAE decode expects latents (B, C, T, h, w); got {shape}.")
        channels = latents.shape[1]
        if channels != self.config["latent_channels"]:
            hint = (" The frames seem to be in dim 1: permute (B, T, C, h, w) to (B, C, T, h, w)."
                    if latents.shape[2] == self.config["latent_channels"] else "")
            raise CogVXError(f"VAE decode expects {self.config['latent_channels']} latent channels in dim 1; got "
                             f"{channels} (shape {tuple(latents.shape)}).{hint}")
        if min(latents.shape[2:]) < 1:
            raise CogVXError(f"VAE decode got an empty latent tensor {tuple(latents.shape)}.")

    # ---------------------------------------------------------------- tiling settings

    # ---------------------------------------------------------------- encode

    def encode_posterior(self, pixels: torch.Tensor, *, tiling: Tiling | None = None,
                         progress: Progress | None = None) -> DiagonalGaussian:
        """pixels (B, 3, 4k+1, H, W) in [-1, 1] -> the posterior over latents (B, latent, k+1, H/8, W/8)."""
        self._check_pixels(pixels)
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        grid = tile_grid(self.config, tiling)
        height, width = pixels.shape[-2:]
        with self._autograd(pixels):
            if grid and (width > grid.sample_w or height > grid.sample_h):
                h = self._tiled_encode(pixels, grid, progress)
            else:
                chunks = len(frame_chunks(pixels.shape[2], SAMPLE_FRAMES_PER_CHUNK))
                h = self._encode_frames(pixels, _Steps(1, chunks, progress))
            return DiagonalGaussian(h)

    def encode(self, pixels: torch.Tensor, **kwargs) -> torch.Tensor:
        """pixels (B, 3, 4k+1, H, W) in [-1, 1] -> posterior mean (B, latent, k+1, H/8, W/8), unscaled."""
        return self.encode_posterior(pixels, **kwargs).mean

    def _encode_frames(self, x: torch.Tensor, steps: "_Steps") -> torch.Tensor:
        """The chunk loop: (B, 3, T, H, W) -> (B, 2*latent, t, H', W'), written into one preallocated tensor."""
        cache: FrameCache = {}
        out, t = None, 0
        for start, end in frame_chunks(x.shape[2], SAMPLE_FRAMES_PER_CHUNK):
            part = self.encoder(x[:, :, start:end], cache)
            if out is None:
                out = part.new_empty(part.shape[:2] + (self.latent_frames(x.shape[2]),) + part.shape[3:])
            out[:, :, t:t + part.shape[2]] = part
            t += part.shape[2]
            del part
            steps.done()
        return out

    def _tiled_encode(self, x: torch.Tensor, s: _TileGrid, progress: Progress | None) -> torch.Tensor:
        height, width = x.shape[-2:]
        stride_h = int(s.sample_h * (1 - s.overlap_h))
        stride_w = int(s.sample_w * (1 - s.overlap_w))
        blend_h = int(s.latent_h * s.overlap_h)
        blend_w = int(s.latent_w * s.overlap_w)
        limit_h = s.latent_h - blend_h
        limit_w = s.latent_w - blend_w
        rows = [(i, self._encoded_size(min(s.sample_h, height - i))) for i in range(0, height, stride_h)]
        cols = [(j, self._encoded_size(min(s.sample_w, width - j))) for j in range(0, width, stride_w)]
        steps = _Steps(len(rows) * len(cols), len(frame_chunks(x.shape[2], SAMPLE_FRAMES_PER_CHUNK)), progress)
        return self._tiled(lambda i, j: self._encode_frames(
            x[:, :, :, i:i + s.sample_h, j:j + s.sample_w], steps),
            rows, cols, blend_h, blend_w, limit_h, limit_w)

    # ---------------------------------------------------------------- decode

    def decode(self, latents: torch.Tensor, *, tiling: Tiling | None = None,
               progress: Progress | None = None) -> torch.Tensor:
        """Unscaled latents (B, latent, t, h, w) -> pixels (B, 3, T, 8h, 8w), roughly in [-1, 1] (not clamped)."""
        self._check_latents(latents)
        z = latents.to(device=self.device, dtype=self.dtype)
        layout = self.tile_layout(z, tiling)
        with self._autograd(z):
            if layout is not None:
                return self._tiled_decode(z, layout, progress)
            return self._decode_frames(z, _Steps(1, len(frame_chunks(z.shape[2], LATENT_FRAMES_PER_CHUNK)), progress))

    def _decode_frames(self, z: torch.Tensor, steps: "_Steps") -> torch.Tensor:
        """The chunk loop: (B, latent, t, h, w) -> (B, 3, T, 8h, 8w), written into one preallocated tensor."""
        cache: FrameCache = {}
        out, t = None, 0
        for start, end in frame_chunks(z.shape[2], LATENT_FRAMES_PER_CHUNK):
            part = self.decoder(z[:, :, start:end], cache)
            if out is None:
                out = part.new_empty(part.shape[:2] + (self.pixel_frames(z.shape[2]),) + part.shape[3:])
            out[:, :, t:t + part.shape[2]] = part
            t += part.shape[2]
            del part
            steps.done()
        return out

    def tile_layout(self, z: torch.Tensor, tiling: Tiling | None) -> "TileLayout | None":
        """Where the decode tiles of latents z (B, C, t, h, w) lie; None when `tiling` is off or z fits one tile."""
        return decode_tile_layout(self.config, z.shape[-2], z.shape[-1], tiling)

    def decode_tile(self, z: torch.Tensor, layout: "TileLayout", i: int, j: int,
                    steps: "_Steps | None" = None) -> torch.Tensor:
        """The tile of z at latent origin (i, j), decoded: (B, 3, T, tile_h, tile_w), not yet blended."""
        steps = steps or _Steps(1, len(frame_chunks(z.shape[2], LATENT_FRAMES_PER_CHUNK)), None)
        return self._decode_frames(z[:, :, :, i:i + layout.grid.latent_h, j:j + layout.grid.latent_w], steps)

    def blend_tiles(self, run_tile: Callable[[int, int], torch.Tensor], layout: "TileLayout") -> torch.Tensor:
        """Decoded tiles (from run_tile(i, j), in row-major order) blended into the whole video."""
        return self._tiled(run_tile, layout.rows, layout.cols, layout.blend_h, layout.blend_w, layout.limit_h,
                           layout.limit_w)

    def _tiled_decode(self, z: torch.Tensor, layout: "TileLayout", progress: Progress | None) -> torch.Tensor:
        steps = _Steps(len(layout.rows) * len(layout.cols), len(frame_chunks(z.shape[2], LATENT_FRAMES_PER_CHUNK)),
                       progress)
        return self.blend_tiles(lambda i, j: self.decode_tile(z, layout, i, j, steps), layout)

    @staticmethod
    def _tiled(run_tile: Callable[[int, int], torch.Tensor], rows: list[tuple[int, int]],
               cols: list[tuple[int, int]], blend_h: int, blend_w: int, limit_h: int, limit_w: int) -> torch.Tensor:
        """Runs tiles in row-major order, blends each with the finished tile above and on its left (in place, as the
        reference does after running all of them), and writes its [:limit_h, :limit_w] crop into the output.

        rows/cols: (tile origin in the input, tile output size). Only the previous row of tiles is kept.
        """
        crop_h = [min(limit_h, size) for _, size in rows]
        crop_w = [min(limit_w, size) for _, size in cols]
        out = None
        above: list[torch.Tensor] = []
        y = 0
        for ri, (i, _) in enumerate(rows):
            row: list[torch.Tensor] = []
            x = 0
            for ci, (j, _) in enumerate(cols):
                tile = run_tile(i, j)  # (B, C, T, th, tw)
                if ri > 0:
                    _blend_rows(above[ci], tile, blend_h)
                if ci > 0:
                    _blend_columns(row[ci - 1], tile, blend_w)
                if out is None:
                    out = tile.new_empty(tile.shape[:3] + (sum(crop_h), sum(crop_w)))
                out[:, :, :, y:y + crop_h[ri], x:x + crop_w[ci]] = tile[:, :, :, :crop_h[ri], :crop_w[ci]]
                x += crop_w[ci]
                row.append(tile)
            above = row
            y += crop_h[ri]
        return out


class _Steps:
    """Counts finished frame chunks over all tiles and reports them to the host's progress callback."""

    def __init__(self, tiles: int, chunks: int, progress: Progress | None):
        self.total, self.count, self.progress = tiles * chunks, 0, progress

    def done(self) -> None:
        self.count += 1
        if self.progress is not None:
            self.progress(self.count, self.total)


def _checked_config(config: dict) -> dict:
    """VAE_DEFAULTS updated with `config` (diffusers bookkeeping keys like `_class_name` dropped), validated."""
    cfg = {**VAE_DEFAULTS, **{k: v for k, v in (config or {}).items() if not k.startswith("_")}}
    n = len(cfg["block_out_channels"])
    bad = []
    if any(t != "CogVideoXDownBlock3D" for t in cfg["down_block_types"]) or len(cfg["down_block_types"]) != n:
        bad.append(f"down_block_types {cfg['down_block_types']}")
    if any(t != "CogVideoXUpBlock3D" for t in cfg["up_block_types"]) or len(cfg["up_block_types"]) != n:
        bad.append(f"up_block_types {cfg['up_block_types']}")
    if cfg["act_fn"] not in ("silu", "swish"):
        bad.append(f"act_fn {cfg['act_fn']!r}")
    if cfg["use_quant_conv"] or cfg["use_post_quant_conv"]:
        bad.append("use_quant_conv/use_post_quant_conv")
    ratio = cfg["temporal_compression_ratio"]
    if ratio < 1 or 2 ** int(math.log2(ratio)) != ratio:
        bad.append(f"temporal_compression_ratio {ratio}")
    for ch in cfg["block_out_channels"]:
        if ch % cfg["norm_num_groups"]:
            bad.append(f"{ch} channels with norm_num_groups {cfg['norm_num_groups']}")
    if bad:
        raise CogVXError(f"Unsupported CogVideoX VAE config: {'; '.join(bad)}. Only the AutoencoderKLCogVideoX "
                         "architecture (CogVideoX down/up blocks, SiLU, no quant convs) is supported; check the "
                         "vae/config.json.")
    cfg["block_out_channels"] = list(cfg["block_out_channels"])
    return cfg


def build_vae(config: dict, device: str | torch.device = "meta", dtype: torch.dtype | None = None,
              operations=None) -> CausalVAE:
    """A CausalVAE for a diffusers vae/config.json dict; on the meta device its tensors are filled by a loader.
    `operations`: the layer classes (see modules/ops.py; default the core's own)."""
    with torch.device(device):
        vae = CausalVAE(config, operations=operations)
    return vae if dtype is None else vae.to(dtype)
