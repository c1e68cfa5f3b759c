"""The CogVideoX block: expert adaptive LayerNorm around full 3D attention and one feed-forward.

Text and video tokens travel as one sequence (B, text_len + N, D), text first. They share the LayerNorm, attention
and feed-forward weights; only their modulation differs (the "experts"): each norm's linear makes six vectors from
the time embedding, shift/scale/gate for video and shift/scale/gate for text, in that order.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import Attention
from . import ops as core_ops


class ExpertAdaLN(nn.Module):
    """LayerNorm with per-expert (video, text) shift/scale; returns the normed tokens and the two gates."""

    def __init__(self, time_dim: int, dim: int, eps: float, affine: bool = True, device=None, dtype=None,
                 operations=None):
        super().__init__()
        ops = core_ops.resolve(operations)
        self.silu = nn.SiLU()
        self.linear = ops.Linear(time_dim, 6 * dim, device=device, dtype=dtype)
        self.norm = ops.LayerNorm(dim, eps=eps, elementwise_affine=affine, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, text_len: int):
        # x: (B, S, D); temb: (B, time_dim)
        shift, scale, gate, enc_shift, enc_scale, enc_gate = self.linear(self.silu(temb))[:, None].chunk(6, dim=-1)
        normed = self.norm(x)
        if torch.is_grad_enabled():
            normed = torch.cat([normed[:, :text_len] * (1 + enc_scale) + enc_shift,
                                normed[:, text_len:] * (1 + scale) + shift], dim=1)
        else:  # same arithmetic, in place: no (B, S, D) copy
            normed[:, :text_len].mul_(1 + enc_scale).add_(enc_shift)
            normed[:, text_len:].mul_(1 + scale).add_(shift)
        return normed, gate, enc_gate


class FeedForward(nn.Module):
    """Linear -> tanh-GELU -> Linear, named like the reference (`net.0.proj`, `net.2`)."""

    def __init__(self, dim: int, inner_dim: int, device=None, dtype=None, operations=None):
        super().__init__()
        ops = core_ops.resolve(operations)
        proj_in = nn.Module()
        proj_in.proj = ops.Linear(dim, inner_dim, device=device, dtype=dtype)
        self.net = nn.ModuleList([proj_in, nn.Dropout(0.0), ops.Linear(inner_dim, dim, device=device, dtype=dtype),
                                  nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.net[0].proj
        if type(proj) is core_ops.Linear and not proj._forward_hooks:
            h = proj(x, activation="gelu_tanh")  # the core's layer fuses the GELU (a LoRA hook must see the product)
        else:
            h = torch.nn.functional.gelu(proj(x), approximate="tanh")
        return self.net[2](h)


def _gated_residual(x: torch.Tensor, out: torch.Tensor, gate: torch.Tensor, enc_gate: torch.Tensor,
                    text_len: int) -> torch.Tensor:
    """x + gate * out per expert. In place when no gradient is needed (saves one (B, S, D) tensor per use)."""
    if torch.is_grad_enabled():
        return x + torch.cat([enc_gate * out[:, :text_len], gate * out[:, text_len:]], dim=1)
    x[:, :text_len].addcmul_(enc_gate, out[:, :text_len])
    x[:, text_len:].addcmul_(gate, out[:, text_len:])
    return x


class ExpertBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, time_dim: int, eps: float = 1e-5,
                 affine: bool = True, attention_bias: bool = True, ff_mult: int = 4, device=None, dtype=None,
                 operations=None):
        super().__init__()
        ops = dict(device=device, dtype=dtype, operations=operations)
        self.norm1 = ExpertAdaLN(time_dim, dim, eps, affine, **ops)
        self.attn1 = Attention(dim, heads, head_dim, bias=attention_bias, **ops)
        self.norm2 = ExpertAdaLN(time_dim, dim, eps, affine, **ops)
        self.ff = FeedForward(dim, ff_mult * dim, **ops)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, text_len: int, rope: torch.Tensor | None) -> torch.Tensor:
        # x: (B, text_len + N, D)
        normed, gate, enc_gate = self.norm1(x, temb, text_len)
        x = _gated_residual(x, self.attn1(normed, text_len, rope), gate, enc_gate, text_len)
        normed, gate, enc_gate = self.norm2(x, temb, text_len)
        x = _gated_residual(x, self.ff(normed), gate, enc_gate, text_len)
        return x
