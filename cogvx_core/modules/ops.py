"""Layer operations: the classes the transformer, the VAE and the T5 encoder build their layers from.

The models take an `operations` namespace (an object with the attributes Linear, Conv2d, Conv3d, LayerNorm,
GroupNorm, Embedding), as ComfyUI's own models take `operations=`: a host can pass `comfy.ops.manual_cast` or
`comfy.ops.disable_weight_init`, whose layers cast and move their weights in forward when ComfyUI streams them.
The default is this module's own classes, which compute in the input's dtype whatever dtype their weights are
stored in. This is what lets weights live in fp8 (e4m3fn) while the math runs in bf16/fp16, and bf16 weights run
fp32 math. When storage and input dtypes agree the casts are no-ops, so the layers cost the same as torch's; big
float32 products on a CPU go to oneDNN rather than MKL (cpu_gemm), which is faster there.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CogVXError
from . import cpu_gemm

LAYERS = ("Linear", "Conv2d", "Conv3d", "LayerNorm", "GroupNorm", "Embedding")


def _cast(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    if t is None or (t.dtype == like.dtype and t.device == like.device):
        return t
    return t.to(device=like.device, dtype=like.dtype)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor, activation: str = "none") -> torch.Tensor:
        """activation: "none" or "gelu_tanh", applied to the output (fused into a oneDNN product on a CPU)."""
        return cpu_gemm.linear(x, _cast(self.weight, x), _cast(self.bias, x), activation)


class Conv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, _cast(self.weight, x), _cast(self.bias, x))


class Conv3d(nn.Conv3d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, _cast(self.weight, x), _cast(self.bias, x))


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, _cast(self.weight, x), _cast(self.bias, x), self.eps)


class GroupNorm(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, _cast(self.weight, x), _cast(self.bias, x), self.eps)


Embedding = nn.Embedding  # ids select rows; nothing to cast


def resolve(operations=None):
    """The namespace to build layers from: `operations`, checked, or this module's classes when it is None."""
    if operations is None:
        return sys.modules[__name__]
    missing = [name for name in LAYERS if not isinstance(getattr(operations, name, None), type)]
    if missing:
        raise CogVXError(f"operations {operations!r} lacks the layer classes {', '.join(missing)}; pass a namespace "
                         f"with {', '.join(LAYERS)} (e.g. comfy.ops.manual_cast), or None for the core's own.")
    bases = {"Linear": nn.Linear, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d, "LayerNorm": nn.LayerNorm,
             "GroupNorm": nn.GroupNorm, "Embedding": nn.Embedding}
    wrong = [name for name, base in bases.items() if not issubclass(getattr(operations, name), base)]
    if wrong:  # the checkpoint loaders and LoRA find layers by their torch base class
        raise CogVXError(f"operations {operations!r}: {', '.join(wrong)} must subclass the torch layers of the same "
                         "name (torch.nn.Linear, ...).")
    return operations


def adopt(model: nn.Module, operations=None) -> nn.Module:
    """Gives the plain torch layers of a model someone else builds (transformers' T5) the classes of `operations`,
    in place: same tensors, same state-dict keys, the operations' forward. Returns the model."""
    ops = resolve(operations)
    for module in model.modules():
        for name in LAYERS:
            if type(module) is getattr(nn, name):
                module.__class__ = getattr(ops, name)
                if not hasattr(module, "bias"):  # an Embedding: casting layers read `bias` (None), as built ones have
                    module.bias = None
    return model
