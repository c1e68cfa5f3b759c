"""Big float32 matrix products on the CPU through oneDNN instead of MKL's sgemm.

torch's F.linear hands a float32 CPU matmul to MKL. On AMD Zen CPUs MKL's sgemm is slower than the oneDNN kernels
that torch also ships (measured on this project's Zen 4, one thread, the transformer's 1378x3072x12288 product: MKL
78-92 GFLOP/s from run to run, oneDNN 93-98). The arithmetic is the same IEEE float32 (only the order of the sums
differs: relative differences around 1e-7). `linear` routes a product there
when it pays: float32, CPU, no gradient wanted (inference), and at least GEMM_MIN_MACS multiply-adds (below that
oneDNN's per-call overhead loses to MKL). Everything else is F.linear, unchanged. bfloat16 already runs on oneDNN.

The call is a torch custom op (`cogvx::onednn_linear`), so torch.compile keeps it as one opaque kernel and fuses the
elementwise work around it; the weight stays a graph input, so every expert block still shares one compiled graph.
`set_enabled(False)` (or COGVX_CPU_GEMM=torch in the environment) restores MKL everywhere.
"""

from __future__ import annotations

import os
import platform
from typing import Optional

import torch
import torch.nn.functional as F

GEMM_MIN_MACS = 2**29  # about 5e8 multiply-adds (e.g. 512x1024x1024): measured break-even is between 1.3e8 and 1e9

# Decided once (torch.compile does not trace torch.backends' queries). x86-64 only: that is where it was measured;
# on ARM, torch's BLAS (Accelerate, OpenBLAS) is the better choice.
AVAILABLE = (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
             and hasattr(torch.ops.mkldnn, "_linear_pointwise"))

_state = {"enabled": AVAILABLE and os.environ.get("COGVX_CPU_GEMM", "onednn") != "torch"}


def set_enabled(enabled: bool) -> None:
    """Turns the oneDNN route on or off for the whole process (off: every product is F.linear). A no-op "on" where
    this torch has no oneDNN."""
    _state["enabled"] = bool(enabled) and AVAILABLE


def enabled() -> bool:
    return _state["enabled"]


@torch.library.custom_op("cogvx::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x (..., in) @ weight (out, in)^T + bias, float32, by oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


@onednn_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _use_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if not enabled() or x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if bias is not None and bias.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or
                                    (bias is not None and bias.requires_grad)):
        return False  # the op has no backward: training keeps autograd's F.linear
    if weight.ndim != 2 or not weight.is_contiguous() or weight.layout != torch.strided:
        return False
    return x.numel() * weight.shape[0] >= GEMM_MIN_MACS  # (tokens * in) * out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), on oneDNN when that is faster (see the module's text)."""
    if _use_onednn(x, weight, bias):
        return onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)
