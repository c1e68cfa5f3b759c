"""A memory and time estimate for a training run, made before its first step.

Memory (per process) = the model's weights + the trainable parameters with their gradients and AdamW moments (fp32) +
the activations kept for the backward pass of the largest batch. The activations are not guessed: one transformer block
is run on a few tokens with the run's dtype, LoRA and autocast, and the bytes autograd saves are counted per token;
the whole model then keeps that for every block (no checkpointing), or only each block's input plus one block's
worth during its recomputation (gradient checkpointing). Attention kernels that keep no (S x S) matrix make this
linear in the token count.

Sharded (FSDP) runs keep 1/N of the weights, gradients and optimizer state per process plus two blocks' full weights
(the one running and the one prefetched); every process must then call `estimate` (it gathers one block).

Time = the step's matrix FLOPs (forward, backward to the inputs, weight gradients for what is trained, and the
recomputed forward under checkpointing) over the device's measured matmul rate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from . import fsdp

GiB = 2**30


@dataclass
class Estimate:
    weights: int  # bytes
    optimizer: int  # trainable parameters + gradients + AdamW moments, bytes
    activations: int  # bytes kept for backward at the largest batch
    tokens: int  # tokens of the largest batch (text + video, all samples)
    trainable_params: int
    step_seconds: float
    steps: int
    device_free: int | None = None  # bytes free on the device, when known

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.activations

    @property
    def total_seconds(self) -> float:
        return self.step_seconds * self.steps

    def describe(self) -> str:
        def clock(s: float) -> str:
            if s != s:
                return "?"
            h, rem = divmod(int(s), 3600)
            return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"

        text = (f"estimate: peak memory {size(self.total)} (weights {size(self.weights)}, trainable + optimizer "
                f"{size(self.optimizer)}, activations {size(self.activations)} for {self.tokens} tokens); "
                f"{self.trainable_params / 1e6:.2f} M trainable parameters; about {self.step_seconds:.3g} s/step, "
                f"{clock(self.total_seconds)} for {self.steps} steps")
        if self.device_free is not None and self.total > self.device_free:
            text += (f". WARNING: more than the {size(self.device_free)} free: turn on gradient checkpointing, lower "
                     "the batch size, frames or resolution, or store the weights in fp8")
        return text


def size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def saved_activation_bytes(fn, exclude: set[int] = frozenset()) -> int:
    """Bytes autograd keeps for backward while fn() runs (distinct storages; `exclude`: data pointers not to count,
    e.g. the parameters')."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in exclude:
                seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def _param_ptrs(module: torch.nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}


def block_bytes_per_token(trainer, text_len: int = 16, grid: tuple[int, int, int] = (2, 4, 8)) -> float:
    """Activation bytes one transformer block keeps per token, measured on a small input as the run computes.

    A block sees only the rotary positions (an additive table is applied before the first block), so any grid
    works here, also for a model whose learned positions fix its size."""
    t = trainer.transformer
    block = t.transformer_blocks[0]
    dev, dtype = trainer.device, t.dtype
    pt = t.patch_size_t
    rope = t.rotary(grid[0] // pt or 1, grid[1], grid[2], dev)
    n = (grid[0] // pt or 1) * grid[1] * grid[2]
    x = torch.randn(1, text_len + n, t.inner_dim, device=dev, dtype=dtype, requires_grad=True)
    temb = torch.randn(1, t.config["time_embed_dim"], device=dev, dtype=dtype)
    # block.forward, not block(...): under FSDP the weights are gathered here once, without its hooks
    with fsdp.gathered(block), torch.enable_grad(), trainer.autocast():
        saved = saved_activation_bytes(lambda: block.forward(x, temb, text_len, rope), _param_ptrs(block))
    return saved / (text_len + n)


def _matmul_rate(device: torch.device, dtype: torch.dtype, dim: int) -> float:
    """Measured matmul FLOP/s on `device` at roughly the model's width."""
    dim = max(256, min(dim, 4096))
    rows = 4096 if device.type == "cuda" else 512
    a = torch.randn(rows, dim, device=device, dtype=dtype)
    b = torch.randn(dim, dim, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    reps, start = 3, time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * rows * dim * dim * reps / max(time.perf_counter() - start, 1e-9)


def largest_batch(trainer) -> tuple[int, int]:
    """(samples, tokens per sample) of the largest batch the plan can make (Frame Pack pads to the longest clip)."""
    t, d = trainer.transformer, trainer.dataset
    text_len = max(d.context(0).shape[0], 1)
    longest: dict = {}
    for i, e in enumerate(d.entries):
        g = d.group(i, trainer.settings.frame_pack)
        lat_t = e.latent_frames + (-e.latent_frames) % t.patch_size_t
        video = (lat_t // t.patch_size_t) * (e.height // 8 // t.patch_size) * (e.width // 8 // t.patch_size)
        longest[g] = max(longest.get(g, 0), video)
    return trainer.settings.batch_size, text_len + max(longest.values())


def estimate(trainer, *, measure_rate: bool = True) -> Estimate:
    """The estimate for `trainer`'s run (see the module docstring)."""
    t, s = trainer.transformer, trainer.settings
    trainable = sum(p.numel() for p in trainer.params)
    trainable_ids = {id(p) for p in trainer.params}
    weights = sum(p.numel() * p.element_size() for p in t.parameters() if id(p) not in trainable_ids)
    weights += sum(b.numel() * b.element_size() for b in t.buffers())
    optimizer = sum(p.numel() * p.element_size() for p in trainer.params) + trainable * (4 + 8)  # grad + 2 moments
    if getattr(trainer, "shard", "none") == "fsdp":  # each rank keeps 1/N, plus two blocks gathered (one prefetched)
        shards = trainer.dist.world_size
        block = sum(p.numel() * p.element_size() for p in t.transformer_blocks[0].parameters())
        weights, optimizer = weights / shards + 2 * block, optimizer / shards

    batch, per_sample = largest_batch(trainer)
    tokens = batch * per_sample
    act_bytes = 2 if (s.mixed_precision == "bf16" or t.dtype in (torch.bfloat16, torch.float16)) else 4
    per_token = block_bytes_per_token(trainer)
    layers = len(t.transformer_blocks)
    if s.gradient_checkpointing:
        activations = layers * tokens * t.inner_dim * act_bytes + per_token * tokens
    else:
        activations = layers * per_token * tokens
    activations += 6 * tokens * t.inner_dim * act_bytes  # embeddings, head, the running gradient

    # FLOPs: every Linear in the blocks sees every token; attention is 2 (S x S x D) products per block
    block_weights = sum(m.weight.numel() for m in t.transformer_blocks[0].modules()
                        if isinstance(m, torch.nn.Linear) and m.weight.ndim == 2)
    forward = 2 * tokens * block_weights * layers + 4 * batch * per_sample**2 * t.inner_dim * layers
    passes = 2.0 + (1.0 if s.full_finetune else 0.05) + (1.0 if s.gradient_checkpointing else 0.0)
    seconds = float("nan")
    if measure_rate:
        dtype = torch.bfloat16 if s.mixed_precision == "bf16" and trainer.device.type == "cuda" else t.dtype
        seconds = forward * passes / _matmul_rate(trainer.device, dtype, t.inner_dim)
    free = None
    if trainer.device.type == "cuda":
        free_now, _ = torch.cuda.mem_get_info(trainer.device)
        free = int(free_now + torch.cuda.memory_allocated(trainer.device))
    return Estimate(int(weights), int(optimizer), int(activations), int(tokens), int(trainable), seconds,
                    max(s.steps - trainer.step, 0), free)
