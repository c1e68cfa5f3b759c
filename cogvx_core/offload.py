"""Keeping weights off the accelerator until they are needed, without changing a single result.

Modes (`Offload.mode`):
  none    every model stays where it was loaded (on the device);
  model   T5, transformer and VAE each live on the CPU and go to the device only while they run;
  blocks  as `model` for T5 and the VAE; the transformer's small parts go to the device, its first `resident`
          blocks too, and every other block streams in from pinned CPU memory: `prefetch` blocks ahead on a side
          CUDA stream while the current one computes, dropped again after it ran (see `BlockStreamer`).
Offloading only moves weights: the same kernels run on the same values, so frames are bit-identical across modes.
`plan_offload` (memory_plan.py) picks the mode and the resident count for a memory budget ("auto").
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .errors import CogVXError

MODES = ("none", "model", "blocks")


def _tensors(module: nn.Module) -> list[tuple[nn.Module, str, bool]]:
    """(owner, name, is_parameter) of every parameter and buffer of `module`, each tensor once."""
    out, seen = [], set()
    for owner in module.modules():
        for table, is_param in ((owner._parameters, True), (owner._buffers, False)):
            for name, t in table.items():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    out.append((owner, name, is_param))
    return out


def _get(owner: nn.Module, name: str, is_param: bool) -> torch.Tensor:
    return owner._parameters[name].data if is_param else owner._buffers[name]


def _put(owner: nn.Module, name: str, is_param: bool, value: torch.Tensor) -> None:
    if is_param:
        owner._parameters[name].data = value  # same Parameter object: hooks, LoRA and optimizers keep working
    else:
        owner._buffers[name] = value


def pin(module: nn.Module) -> None:
    """Moves `module`'s CPU tensors into page-locked memory (asynchronous copies to CUDA need it)."""
    if not torch.cuda.is_available():
        return
    for owner, name, is_param in _tensors(module):
        t = _get(owner, name, is_param)
        if t.device.type == "cpu" and not t.is_pinned():
            _put(owner, name, is_param, t.pin_memory())


class BlockStreamer:
    """Streams the blocks of a ModuleList through `device` while a model runs them in order (inference only).

    Blocks [0, resident) are moved to the device once. Every other block keeps its tensors in (pinned) CPU memory;
    before block i runs, its copy is on the device and blocks i+1 .. i+prefetch are being copied on a side stream;
    after it ran its device copy is dropped. After the last block the first streamed ones are fetched for the next
    call. So at most `resident + prefetch + 1` blocks are on the device at any time (`peak_loaded` records it).

    CUDA: copies run on `self.stream`; the compute stream waits on each block's event before using it, and every
    copy is `record_stream`-ed on the compute stream, so the allocator reuses its memory only after the block's
    kernels finished. On the CPU (tests) the same logic runs with plain synchronous copies.
    """

    def __init__(self, blocks: nn.ModuleList, device: torch.device | str, resident: int = 0, prefetch: int = 1):
        self.blocks, self.device = blocks, torch.device(device)
        if not 0 <= resident <= len(blocks):
            raise CogVXError(f"resident blocks must be between 0 and {len(blocks)}; got {resident}.")
        if prefetch < 0:
            raise CogVXError(f"prefetch must be 0 or more; got {prefetch}.")
        self.resident, self.prefetch = resident, prefetch
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._index = {id(b): i for i, b in enumerate(blocks)}
        self._host: dict[int, list[torch.Tensor]] = {}  # streamed block -> its CPU tensors (while loaded)
        self._events: dict[int, torch.cuda.Event | None] = {}
        self._hooks: list = []
        self.peak_loaded = 0
        self.loads = 0  # block copies made (a test counts them)

    # -- attach / detach -----------------------------------------------------------------------------------------
    def attach(self) -> "BlockStreamer":
        for i, block in enumerate(self.blocks):
            if i < self.resident:
                block.to(self.device)
            else:
                block.to("cpu")
                pin(block)
                self._hooks.append(block.register_forward_pre_hook(self._before))
                self._hooks.append(block.register_forward_hook(self._after))
        self.peak_loaded = self.loaded()
        return self

    def detach(self, to: torch.device | str = "cpu") -> None:
        """Removes the hooks, drops the device copies and moves every block to `to`."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        for i in list(self._host):
            self._drop(i)
        for block in self.blocks:
            block.to(to)

    def loaded(self) -> int:
        """Blocks whose tensors are on the device now."""
        return self.resident + len(self._host)

    # -- streaming -----------------------------------------------------------------------------------------------
    def _fetch(self, i: int) -> None:
        """Starts copying streamed block i to the device (no-op when resident, out of range or already there)."""
        if i < self.resident or i >= len(self.blocks) or i in self._host:
            return
        entries = _tensors(self.blocks[i])
        host = [_get(*e) for e in entries]
        context = torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()
        with context:
            copies = [torch.empty_like(t, device=self.device).copy_(t, non_blocking=self.cuda) for t in host]
            event = None
            if self.cuda:
                event = torch.cuda.Event()
                event.record(self.stream)
        for e, copy in zip(entries, copies):
            _put(*e, copy)
        self._host[i], self._events[i] = host, event
        self.loads += 1
        self.peak_loaded = max(self.peak_loaded, self.loaded())

    def _drop(self, i: int) -> None:
        """Points streamed block i back at its CPU tensors; its device copies are freed."""
        for e, t in zip(_tensors(self.blocks[i]), self._host.pop(i)):
            _put(*e, t)
        self._events.pop(i, None)

    def _before(self, block: nn.Module, args) -> None:
        i = self._index[id(block)]
        self._fetch(i)
        if self.cuda:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(self._events[i])
            for owner, name, is_param in _tensors(block):
                _get(owner, name, is_param).record_stream(compute)
        for j in range(i + 1, i + 1 + self.prefetch):
            self._fetch(j)

    def _after(self, block: nn.Module, args, output) -> None:
        i = self._index[id(block)]
        self._drop(i)
        if i == len(self.blocks) - 1:  # the next call starts with the first streamed blocks
            for j in range(self.resident, self.resident + self.prefetch):
                self._fetch(j)


@dataclass
class Offload:
    """Where the models run and where they wait. `device`: the compute device; `resident`/`prefetch`: block
    streaming settings (mode "blocks"); `text_device`: where T5 runs ("cpu" keeps it off the device)."""

    mode: str = "none"
    device: torch.device | str | None = None
    resident: int = 0
    prefetch: int = 1
    text_device: torch.device | str | None = None
    streamer: BlockStreamer | None = None  # the live streamer while the transformer's stage runs

    def __post_init__(self):
        if self.mode not in MODES:
            raise CogVXError(f"Unknown offload mode {self.mode!r}; use one of {', '.join(MODES)} (or 'auto' where a "
                             "memory budget picks one).")
        if self.device is not None:
            self.device = torch.device(self.device)

    @classmethod
    def from_plan(cls, plan, device: torch.device | str) -> "Offload":
        """The settings a `memory_plan.Plan` chose (mode, resident blocks, prefetch, where T5 runs) on `device`."""
        r = plan.request
        return cls(r.offload, device=device, resident=r.resident, prefetch=r.prefetch,
                   text_device="cpu" if r.text_device == "cpu" else None)

    @contextlib.contextmanager
    def stage(self, module: nn.Module | None, *, transformer: bool = False, device=None):
        """Runs the body with `module` on its compute device (`device`, default `self.device`) and puts it back on
        the CPU afterwards (modes model/blocks); the transformer streams its blocks in mode blocks."""
        device = torch.device(device or self.device) if (device or self.device) is not None else None
        if self.mode == "none" or module is None or device is None:
            yield
            return
        if transformer and self.mode == "blocks":
            blocks = module.transformer_blocks
            for child in module.children():
                if child is not blocks:
                    child.to(device)
            for name, t in list(module._buffers.items()):
                if t is not None:
                    module._buffers[name] = t.to(device)
            self.streamer = BlockStreamer(blocks, device, self.resident, self.prefetch).attach()
            try:
                yield
            finally:
                self.streamer.detach()
                module.to("cpu")
            return
        module.to(device)
        try:
            yield
        finally:
            module.to("cpu")
