"""fp8 matmuls: Linear layers whose weights are stored in float8 e4m3fn with a per-tensor scale, multiplied in fp8.

`fp8_e4m3fn_fast` storage: each big matmul weight W is stored as W / s_w in e4m3fn with s_w = amax|W| / 448 (so the
whole fp8 range is used, unlike a plain cast). Per call the input x gets its own scale s_x = amax|x| / 448 and
torch._scaled_mm computes (x / s_x)(W / s_w)^T * s_x * s_w with fp8 operands and a wide accumulator: on GPUs with fp8
tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell) at twice the bf16 rate. Elsewhere (older GPUs, CPUs)
the layers keep the fp8 storage and compute by dequantizing the weight (the plain fp8 storage path), with a one-line
note. The decision is made per call from the input's device, so a model loaded on the CPU and moved to a GPU
multiplies in fp8 there. The layers keep their class's forward hooks, so LoRAs (cogvx_core.lora) still add their branch.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .ops import Linear

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value

_NOTED: set[str] = set()


def scaled_mm_supported(device: torch.device) -> bool:
    """Whether fp8 matmuls pay off here: a CUDA GPU with compute capability 8.9+ (fp8 tensor cores). CPUs have a
    _scaled_mm too, but no fp8 units: there the weight is dequantized instead."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t / s in e4m3fn, s float32 0-d) with s = amax|t| / 448."""
    scale = (t.detach().abs().amax().float() / FP8_MAX).clamp_min(1e-12)
    return (t.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) @ (weight * weight_scale)^T + bias with fp8 operands: x is quantized with its own per-tensor
    scale; weight (out, in) e4m3fn. Output in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
    xq, x_scale = quantize(x2)
    # the bias is fused only for 16-bit outputs (what _scaled_mm accepts), added after otherwise
    fused = bias is not None and x.dtype != torch.float32
    out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale, bias=bias if fused else None,
                           out_dtype=x.dtype)
    if bias is not None and not fused:
        out = out + bias
    return out.reshape(*x.shape[:-1], out.shape[-1])


def note_for(device: torch.device) -> str | None:
    """The one-line note for a device without fp8 matmuls (None where they run)."""
    if scaled_mm_supported(device):
        return None
    return (f"fp8_e4m3fn_fast: no fp8 matmul on {device} (needs a GPU of compute capability 8.9+); the weights stay "
            "in fp8 and are dequantized per call, as with fp8_e4m3fn storage.")


class Fp8Linear(Linear):
    """A Linear whose weight is e4m3fn with a per-tensor `weight_scale`; multiplies in fp8 where supported."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if x.dtype in (torch.bfloat16, torch.float16, torch.float32) and scaled_mm_supported(x.device):
            return fp8_linear(x, self.weight, self.weight_scale, bias)
        if not torch.compiler.is_compiling() and str(x.device) not in _NOTED:  # once per device
            _NOTED.add(str(x.device))
            log.warning(note_for(x.device))
        return F.linear(x, self.weight.to(x.dtype) * self.weight_scale.to(x.dtype), bias)


def to_fp8_fast(model: torch.nn.Module, names=None) -> None:
    """Converts the model's ops.Linear layers (those whose weight name `names(name)` accepts, or all) to Fp8Linear in
    place: weight quantized with a per-tensor scale. Layers whose sizes are not multiples of 16 (_scaled_mm's rule)
    stay as they are."""
    for name, module in model.named_modules():
        if type(module) is not Linear or (names is not None and not names(f"{name}.weight")):
            continue
        if module.in_features % 16 or module.out_features % 16:
            continue
        weight, scale = quantize(module.weight.data)
        module.weight = torch.nn.Parameter(weight, requires_grad=False)
        module.register_buffer("weight_scale", scale.to(weight.device))
        module.__class__ = Fp8Linear  # same parameters, same hooks; only the forward changes
