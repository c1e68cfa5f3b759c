"""Causal 3D convolution with a frame cache, and the time-chunked ("safe") Conv3d under it.

The CogVideoX VAE runs a video in short frame chunks. Each causal conv pads time on the left only: the first chunk
repeats its first frame, later chunks prepend the last `k_t - 1` frames of the previous chunk's padded input. Those
frames are the conv's cache, kept in a plain dict keyed by the conv module for one encode/decode call.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from . import ops as core_ops

# A frame cache for one encode/decode call (one tile): causal conv module -> its last padded input frames.
FrameCache = dict

# Inputs above this many elements (2 GiB at 2 bytes each) are convolved in time chunks, as the reference does
# (its comment: "Set to 2GB, suitable for CuDNN"). The chunking is exact; it only bounds one conv call's size.
SAFE_CONV_GIB = 2


class TimeChunked:
    """Mixin in front of a Conv3d class: splits a very large input along time into overlapping chunks (same result,
    bounded calls). Each chunk runs the Conv3d's own forward, so an operations' weight casting still applies."""

    def _time_slices(self, x: torch.Tensor) -> list[tuple[int, int]]:
        """Input frame ranges of the conv calls, chunked exactly like the reference's torch.chunk split."""
        frames = x.shape[2]
        gib = x.numel() * 2 / 1024**3
        if gib <= SAFE_CONV_GIB:
            return [(0, frames)]
        parts = int(gib / SAFE_CONV_GIB) + 1
        step = -(-frames // parts)  # torch.chunk's chunk size
        overlap = self.kernel_size[0] - 1
        return [(max(start - overlap, 0) if start else 0, min(start + step, frames))
                for start in range(0, frames, step)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slices = self._time_slices(x)
        if len(slices) == 1:
            return super().forward(x)
        # Each chunk's output goes straight into one preallocated result (no list + torch.cat).
        if self.stride[0] != 1 or self.padding[0] != 0:
            raise NotImplementedError("time-chunked SafeConv3d needs time stride 1 and no time padding")
        out, t = None, 0
        for start, end in slices:
            part = super().forward(x[:, :, start:end])
            if out is None:
                frames = x.shape[2] - self.dilation[0] * (self.kernel_size[0] - 1)
                out = part.new_empty(part.shape[:2] + (frames,) + part.shape[3:])
            out[:, :, t:t + part.shape[2]] = part
            t += part.shape[2]
            del part
        return out


@lru_cache(maxsize=None)
def safe_conv3d(conv3d: type) -> type:
    """The time-chunked Conv3d class over an operations namespace's `conv3d`."""
    return type("SafeConv3d", (TimeChunked, conv3d), {})


SafeConv3d = safe_conv3d(core_ops.Conv3d)  # over the core's own cast-on-the-fly Conv3d


class CausalConv3d(nn.Module):
    """Conv3d that is causal in time: left time padding from a frame cache, zero spatial padding inside the conv.

    `forward(x, cache)` pads and convolves. Memory-critical callers use the two steps themselves,
    `h = conv.pad(h, cache); h = conv.conv(h)`, so that the unpadded activation is released before the conv runs.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int] = 3,
                 operations=None):
        super().__init__()
        if isinstance(kernel_size, int):
            kernel_size = (kernel_size,) * 3
        time_k, height_k, width_k = kernel_size
        self.time_pad = time_k - 1
        # (time, height, width) padding; the reference names them (0, width_pad, height_pad), equal for square kernels.
        self.conv = safe_conv3d(core_ops.resolve(operations).Conv3d)(
            in_channels, out_channels, kernel_size, padding=(0, (width_k - 1) // 2, (height_k - 1) // 2))

    def pad(self, x: torch.Tensor, cache: FrameCache | None) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, C, time_pad + T, H, W), and stores the new last `time_pad` frames in `cache`."""
        if self.time_pad == 0:
            return x
        previous = cache.get(self) if cache is not None else None
        if previous is None:  # first chunk: repeat the first frame
            previous = x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)
        padded = torch.cat([previous, x], dim=2)
        if cache is not None:
            cache[self] = padded[:, :, -self.time_pad:].clone()
        return padded

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        return self.conv(self.pad(x, cache))
