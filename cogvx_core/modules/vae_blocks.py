"""Blocks of the CogVideoX 3D causal VAE: resnet, spatial norm, down/upsampling with time compression, and the
down/mid/up blocks built from them.

Attribute names give exactly the diffusers `AutoencoderKLCogVideoX` state-dict keys. Numerics follow diffusers
0.42.1 op for op (same ops on same shapes, so the results are bit-identical). Memory is kept low without changing a
number: where autograd is off, activations are updated in place; the unpadded input of each causal conv is released
before the conv runs; and activations are handed from layer to layer in a one-element list (see `take`), so a layer
can free its input as soon as it no longer needs it instead of when the caller's variable is reassigned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops as core_ops
from .causal_conv import CausalConv3d, FrameCache, safe_conv3d


def _inplace() -> bool:
    """In-place updates are only safe when no autograd graph is recorded."""
    return not torch.is_grad_enabled()


def silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x, inplace=_inplace())


# An activation is a tensor, or a one-element list holding it: a handoff. The caller keeps no other reference, so
# the callee, which pops it, holds the only one and can drop it early (`del`) instead of keeping it alive until the
# caller's variable is reassigned. At full resolution each such tensor is hundreds of MB to GBs.
Activation = torch.Tensor | list


def take(x: Activation) -> torch.Tensor:
    """The tensor of an activation; a handoff list is emptied."""
    return x.pop() if isinstance(x, list) else x


class SpatialNorm3D(nn.Module):
    """GroupNorm(f) * conv_y(zq) + conv_b(zq), zq = the decoder's latent chunk resized (nearest) to f's (T, H, W).

    For odd T > 1 the first frame and the rest are resized separately (1 -> 1 frame, t-1 -> T-1 frames).
    """

    def __init__(self, f_channels: int, zq_channels: int, groups: int = 32, operations=None):
        super().__init__()
        ops = core_ops.resolve(operations)
        self.norm_layer = ops.GroupNorm(num_channels=f_channels, num_groups=groups, eps=1e-6, affine=True)
        self.conv_y = CausalConv3d(zq_channels, f_channels, kernel_size=1, operations=ops)
        self.conv_b = CausalConv3d(zq_channels, f_channels, kernel_size=1, operations=ops)

    def forward(self, f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        # f: (B, C, T, H, W); zq: (B, Cz, t, h, w)
        frames = f.shape[2]
        if frames > 1 and frames % 2 == 1:
            zq = torch.cat([F.interpolate(zq[:, :, :1], size=(1,) + f.shape[3:]),
                            F.interpolate(zq[:, :, 1:], size=(frames - 1,) + f.shape[3:])], dim=2)
        else:
            zq = F.interpolate(zq, size=f.shape[2:])
        # (B, Cz, T, H, W). The 1x1x1 convs run at full resolution like the reference's (same conv shapes, so the
        # same sums bit for bit); without autograd each of their outputs is folded into the norm and freed at once.
        if not _inplace():
            return self.norm_layer(f) * self.conv_y(zq) + self.conv_b(zq)
        n = self.norm_layer(f)
        n.mul_(self.conv_y(zq))
        return n.add_(self.conv_b(zq))


class ResnetBlock3D(nn.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus the input (1x1x1 conv_shortcut when channels change).

    Norms are GroupNorm in the encoder and SpatialNorm3D (conditioned on the latent chunk) in the decoder.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float,
                 spatial_norm_dim: int | None = None, operations=None):
        super().__init__()
        ops = core_ops.resolve(operations)
        if spatial_norm_dim is None:
            self.norm1 = ops.GroupNorm(num_channels=in_channels, num_groups=groups, eps=eps)
            self.norm2 = ops.GroupNorm(num_channels=out_channels, num_groups=groups, eps=eps)
        else:
            self.norm1 = SpatialNorm3D(in_channels, spatial_norm_dim, groups, operations=ops)
            self.norm2 = SpatialNorm3D(out_channels, spatial_norm_dim, groups, operations=ops)
        self.conv1 = CausalConv3d(in_channels, out_channels, kernel_size=3, operations=ops)
        self.conv2 = CausalConv3d(out_channels, out_channels, kernel_size=3, operations=ops)
        self.conv_shortcut = (safe_conv3d(ops.Conv3d)(in_channels, out_channels, kernel_size=1)
                              if in_channels != out_channels else None)

    def _norm(self, norm: nn.Module, x: torch.Tensor, zq: torch.Tensor | None) -> torch.Tensor:
        return norm(x) if zq is None else norm(x, zq)

    def forward(self, x: Activation, zq: torch.Tensor | None, cache: FrameCache) -> torch.Tensor:
        # x: (B, C_in, T, H, W) -> (B, C_out, T, H, W)
        x = take(x)
        h = silu(self._norm(self.norm1, x, zq))
        if self.conv_shortcut is None:
            shortcut = x
        else:  # the input is not needed after this, so a handed-off input is freed before the big convs
            shortcut = self.conv_shortcut(x)
        del x
        h = self.conv1.pad(h, cache)  # (B, C_in, 2 + T, H, W); the unpadded activation is freed here
        h = self.conv1.conv(h)
        h = silu(self._norm(self.norm2, h, zq))
        h = self.conv2.pad(h, cache)
        h = self.conv2.conv(h)
        return h.add_(shortcut) if _inplace() else h + shortcut


def compressed_frames(frames: int) -> int:
    """Frames after one time-compressing downsample: odd counts keep frame 0 and average the pairs after it."""
    return 1 + (frames - 1) // 2 if frames % 2 else frames // 2


def expanded_frames(frames: int) -> int:
    """Frames after one time-expanding upsample: frame 0 of an odd count stays single, every other frame doubles."""
    return 2 * frames - 1 if frames % 2 else 2 * frames


class Downsample3D(nn.Module):
    """Optional 2x time compression (average of frame pairs), then a per-frame Conv2d(k3, s2) after (0,1,0,1) padding."""

    def __init__(self, in_channels: int, out_channels: int, compress_time: bool = False, operations=None):
        super().__init__()
        self.conv = core_ops.resolve(operations).Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=0)
        self.compress_time = compress_time

    def forward(self, x: Activation) -> torch.Tensor:
        x = take(x)
        bsz, c, frames, height, width = x.shape
        t_out = compressed_frames(frames) if self.compress_time else frames
        # The conv's input, padded right/bottom with zeros, built directly in the (B*T, C, H+1, W+1) layout it needs.
        frames_in = x.new_empty(bsz, t_out, c, height + 1, width + 1)  # (B, T', C, H+1, W+1)
        frames_in[..., height, :] = 0
        frames_in[..., :height, width] = 0
        dst = frames_in[..., :height, :width].transpose(1, 2)  # (B, C, T', H, W) view
        if not self.compress_time:
            dst.copy_(x)
        else:
            odd = frames % 2
            if odd:
                dst[:, :, :1] = x[:, :, :1]
            pairs = dst[:, :, odd:]
            # (a + b) / 2 of each frame pair, the value avg_pool1d(k=2, s=2) gives in every dtype.
            pairs.copy_(x[:, :, odd::2]).add_(x[:, :, odd + 1::2]).mul_(0.5)
        del x, dst
        out = self.conv(frames_in.view(bsz * t_out, c, height + 1, width + 1))  # (B*T', C_out, H', W')
        del frames_in
        return out.view(bsz, t_out, *out.shape[1:]).transpose(1, 2).contiguous()


class Upsample3D(nn.Module):
    """Nearest 2x in space (and in time when compress_time, keeping frame 0 of an odd count single), then a
    per-frame Conv2d(k3, s1, p1)."""

    def __init__(self, in_channels: int, out_channels: int, compress_time: bool = False, operations=None):
        super().__init__()
        self.conv = core_ops.resolve(operations).Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.compress_time = compress_time

    def forward(self, x: Activation) -> torch.Tensor:
        x = take(x)
        bsz, c, frames, height, width = x.shape
        frame_index = torch.arange(frames, device=x.device)
        if self.compress_time and frames > 1:
            # nearest 2x in time repeats each frame; an odd count keeps frame 0 single
            frame_index = torch.cat([frame_index[:1], frame_index[1:].repeat_interleave(2)]) if frames % 2 \
                else frame_index.repeat_interleave(2)
        t_out = frame_index.numel()
        # (B, C, T, H, W) -> (B*T', C, H, W) at input resolution, then nearest 2x: the exact values the reference gets.
        small = x.transpose(1, 2)[:, frame_index].reshape(bsz * t_out, c, height, width)
        del x
        big = F.interpolate(small, scale_factor=2.0)  # (B*T', C, 2H, 2W)
        del small
        out = self.conv(big)  # (B*T', C_out, 2H, 2W)
        del big
        return out.view(bsz, t_out, *out.shape[1:]).transpose(1, 2).contiguous()


class DownBlock3D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, eps: float,
                 add_downsample: bool, compress_time: bool, operations=None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, groups, eps,
                                                    operations=operations) for i in range(num_layers)])
        self.downsamplers = (nn.ModuleList([Downsample3D(out_channels, out_channels, compress_time, operations)])
                             if add_downsample else None)

    def forward(self, h: Activation, cache: FrameCache) -> torch.Tensor:
        for resnet in self.resnets:
            h = [resnet(h, None, cache)]
        if self.downsamplers is not None:
            h = [self.downsamplers[0](h)]
        return take(h)


class MidBlock3D(nn.Module):
    def __init__(self, channels: int, groups: int, eps: float, spatial_norm_dim: int | None = None,
                 num_layers: int = 2, operations=None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock3D(channels, channels, groups, eps, spatial_norm_dim, operations)
                                      for _ in range(num_layers)])

    def forward(self, h: Activation, zq: torch.Tensor | None, cache: FrameCache) -> torch.Tensor:
        for resnet in self.resnets:
            h = [resnet(h, zq, cache)]
        return take(h)


class UpBlock3D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, eps: float,
                 spatial_norm_dim: int, add_upsample: bool, compress_time: bool, operations=None):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, groups, eps, spatial_norm_dim,
                          operations) for i in range(num_layers)])
        self.upsamplers = (nn.ModuleList([Upsample3D(out_channels, out_channels, compress_time, operations)])
                           if add_upsample else None)

    def forward(self, h: Activation, zq: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        for resnet in self.resnets:
            h = [resnet(h, zq, cache)]
        if self.upsamplers is not None:
            h = [self.upsamplers[0](h)]
        return take(h)
