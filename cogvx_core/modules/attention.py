"""Full 3D attention over text and video tokens, with QK LayerNorm and RoPE on the video tokens only.

The attention kernel is pluggable: "sdpa" (torch scaled_dot_product_attention, the default and the reference's),
"sdpa-math" (torch's plain math kernel, for debugging), and the optional "sage" / "flash" packages when installed.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CogVXError
from .embeddings import apply_rope
from . import ops as core_ops

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (B, heads, S, d) each


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def _sdpa_math(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v)


def _sage(q, k, v):
    from sageattention import sageattn  # optional

    return sageattn(q, k, v, tensor_layout="HND", is_causal=False)


def _flash(q, k, v):
    from flash_attn import flash_attn_func  # optional; wants (B, S, heads, d)

    return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


ATTENTION_BACKENDS: dict[str, tuple[AttentionFn, str | None]] = {
    "sdpa": (_sdpa, None),
    "sdpa-math": (_sdpa_math, None),
    "sage": (_sage, "sageattention"),
    "flash": (_flash, "flash_attn"),
}


def available_attention_backends() -> list[str]:
    return [n for n, (_, pkg) in ATTENTION_BACKENDS.items() if pkg is None or importlib.util.find_spec(pkg)]


def get_attention_backend(name: str) -> AttentionFn:
    if name not in ATTENTION_BACKENDS:
        raise CogVXError(f"Unknown attention backend {name!r}; choose one of {', '.join(ATTENTION_BACKENDS)}.")
    fn, package = ATTENTION_BACKENDS[name]
    if package and importlib.util.find_spec(package) is None:
        raise CogVXError(f"Attention backend {name!r} needs the {package!r} package, which is not installed. "
                         f"Install it (pip install {package}) or use 'sdpa'.")
    return fn


class Attention(nn.Module):
    """Joint attention of one block. Parameter names follow the reference (`to_q`, `norm_q`, `to_out.0`, ...)."""

    def __init__(self, dim: int, heads: int, head_dim: int, bias: bool = True, qk_eps: float = 1e-6,
                 device=None, dtype=None, operations=None):
        super().__init__()
        ops = core_ops.resolve(operations)
        self.heads, self.head_dim = heads, head_dim
        self.to_q = ops.Linear(dim, heads * head_dim, bias=bias, device=device, dtype=dtype)
        self.to_k = ops.Linear(dim, heads * head_dim, bias=bias, device=device, dtype=dtype)
        self.to_v = ops.Linear(dim, heads * head_dim, bias=bias, device=device, dtype=dtype)
        self.norm_q = ops.LayerNorm(head_dim, eps=qk_eps, device=device, dtype=dtype)
        self.norm_k = ops.LayerNorm(head_dim, eps=qk_eps, device=device, dtype=dtype)
        self.to_out = nn.ModuleList([ops.Linear(heads * head_dim, dim, bias=True, device=device, dtype=dtype),
                                     nn.Dropout(0.0)])
        self.attention_fn: AttentionFn = _sdpa

    def forward(self, x: torch.Tensor, text_len: int, rope: torch.Tensor | None) -> torch.Tensor:
        # x: (B, S, dim) with S = text_len + video tokens, text first
        b, s, _ = x.shape
        # QK norm after the head transpose: its outputs are then contiguous (B, heads, S, d), the fast SDPA layout
        q = self.norm_q(self.to_q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2))  # (B, heads, S, d)
        k = self.norm_k(self.to_k(x).view(b, s, self.heads, self.head_dim).transpose(1, 2))
        v = self.to_v(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        if rope is not None:  # rotate video tokens of q and k in place; text tokens carry no position
            q[:, :, text_len:] = apply_rope(q[:, :, text_len:], rope)
            k[:, :, text_len:] = apply_rope(k[:, :, text_len:], rope)
        out = self.attention_fn(q, k, v)  # (B, heads, S, d)
        out = out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)
        return self.to_out[0](out)
