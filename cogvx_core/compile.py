"""Regional compilation: torch.compile the expert block once and run every block through that one graph.

All blocks share one class and one forward, so torch.compile (which inlines nn.Module calls and treats their
parameters as graph inputs) makes one graph for the first block and reuses it for the others: compile time is that
of a single block, however deep the model. The step's size is static (dynamic=False): the first pass at a size
compiles, later steps and later runs at the same size reuse the graph. The sequence length, batch (CFG doubles it)
and dtype are what a new graph is made for. Works with inductor on CPU (needs a C++ compiler) as on CUDA.
"""

from __future__ import annotations

import shutil

from .errors import CogVXError


def compiler_problem(device: str = "cpu") -> str | None:
    """Why inductor cannot compile for `device` here (None when it can): on CPU it needs a C++ compiler."""
    if device == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "torch.compile on CPU needs a C++ compiler (g++ or clang++): install one (e.g. apt-get install g++)"
    return None


def compile_blocks(transformer, mode: str | None = None, backend: str = "inductor") -> None:
    """Compiles each expert block in place (nn.Module.compile); idempotent. backend: torch.compile's (tests count
    graphs with "eager", which skips code generation)."""
    problem = compiler_problem(transformer.device.type) if backend == "inductor" else None
    if problem:
        raise CogVXError(f"--compile: {problem}.")
    for block in transformer.transformer_blocks:
        if getattr(block, "_compiled_call_impl", None) is None:
            block.compile(mode=mode, backend=backend, dynamic=False, fullgraph=True)


def is_compiled(transformer) -> bool:
    return any(getattr(b, "_compiled_call_impl", None) is not None for b in transformer.transformer_blocks)
