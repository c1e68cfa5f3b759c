"""Big float32 matrix products on the CPU through oneDNN instead of MKL's sgemm.

torch's F.linear hands a float32 CPU matmul to MKL. On AMD Zen CPUs MKL's sgemm is slower than the oneDNN kernels
that torch also ships (measured on this project's Zen 4, one thread, the transformer's 1378x3072x12288 product: MKL
78-92 GFLOP/s from run to run, oneDNN 93-98). The arithmetic is the same IEEE float32 (only the order of the sums
differs: relative differences around 1e-7). `linear` routes a product there when it pays: float32, an x86-64 CPU,
no gradient wanted (inference), and at least GEMM_MIN_MACS multiply-adds (below that oneDNN's per-call overhead
loses to MKL). Everything else is F.linear, unchanged. bfloat16 already runs on oneDNN.

The call is a torch custom op (OP_NAME, `cogvx::onednn_linear`), so torch.compile keeps it as one opaque kernel
and fuses the elementwise work around it; the weight stays a graph input, so every expert block still shares one
compiled graph. `set_enabled(False)` (or COGVX_CPU_GEMM=torch in the environment) restores MKL everywhere.
"""

from __future__ import annotations

import logging
import os
import platform
import re
from typing import Optional

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

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


ACTIVATIONS = ("none", "gelu_tanh")


def _torch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    out = F.linear(x, weight, bias)
    return F.gelu(out, approximate="tanh") if activation == "gelu_tanh" else out


def _onednn_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    activation: str) -> torch.Tensor:
    if activation == "gelu_tanh":
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "gelu", [], "tanh")
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


# One op per copy of this module. A host can import the core under two names (a ComfyUI pack path and plain
# `cogvx_core`; pytest does, through the repo's __init__.py), and a second registration of one name leaves torch
# calling the first copy's function, or failing at random ("vector::reserve").
OP_NAME = "cogvx::onednn_linear" + ("" if __name__ == "cogvx_core.modules.cpu_gemm" else
                                    "_" + re.sub(r"\W", "_", __name__))


@torch.library.custom_op(OP_NAME, mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  activation: str) -> torch.Tensor:
    """x (..., in) @ weight (out, in)^T + bias, float32, by oneDNN; then the activation, fused into the product
    ("gelu_tanh" costs nothing there, a separate pass over the (tokens, 4 * dim) output otherwise).

    If oneDNN raises, the product is F.linear's and the route is off for the rest of the process, with one warning:
    a torch build's oneDNN problem costs speed, never a run."""
    if _state["enabled"]:
        try:
            return _onednn_product(x, weight, bias, activation)
        except (RuntimeError, ValueError) as e:
            _state["enabled"] = False
            log.warning("cogvx: oneDNN float32 products failed here (%s: %s); using torch's F.linear from now on",
                        type(e).__name__, e)
    return _torch_linear(x, weight, bias, activation)


@onednn_linear.register_fake
def _(x, weight, bias, activation):
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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str = "none") -> torch.Tensor:
    """F.linear(x, weight, bias) followed by the activation ("none", or "gelu_tanh": GELU with the tanh
    approximation), on oneDNN when that is faster (see the module's text)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r}: expected one of {ACTIVATIONS}")
    if _use_onednn(x, weight, bias):
        return onednn_linear(x, weight, bias, activation)
    return _torch_linear(x, weight, bias, activation)
