"""Offloading moves weights and never changes a result: frames are bit-identical across modes, and the block
streamer never holds more blocks than its budget (checked by an independent hook, not the streamer's counter)."""

import pytest
import torch
from torch import nn

from cogvx_core.errors import CogVXError
from cogvx_core.models import TINY_MODEL
from cogvx_core.offload import BlockStreamer, Offload
from cogvx_core.pipeline import load_pipeline

PROMPT = "a red circle moves to the left on a black background"


def _run(offload: Offload, watch=None) -> torch.Tensor:
    pipe = load_pipeline(TINY_MODEL, offload=offload)
    if watch is not None:
        watch(pipe)
    return pipe.generate(PROMPT, steps=3, seed=7, frames=9, height=64, width=64).frames


class Residency:
    """After each block runs (before the streamer drops it), counts the streamed blocks whose weights are not their
    original CPU tensors, i.e. have a device copy."""

    def __init__(self, pipe, resident: int):
        self.blocks = pipe.transformer.transformer_blocks
        self.resident = resident
        self.original = [[p.data_ptr() for p in b.parameters()] for b in self.blocks]
        self.counts, self.ran_on_copy = [], []
        for block in self.blocks:
            block.register_forward_hook(self._after)

    def _copied(self, i: int) -> bool:
        return any(p.data_ptr() != ptr for p, ptr in zip(self.blocks[i].parameters(), self.original[i]))

    def _after(self, block, args, out):
        i = next(j for j, b in enumerate(self.blocks) if b is block)
        if i >= self.resident:
            self.ran_on_copy.append(self._copied(i))
        self.counts.append(sum(self._copied(j) for j in range(self.resident, len(self.blocks))))


@pytest.fixture(scope="module")
def reference_frames():
    return _run(Offload("none"))


def test_model_offload_gives_the_same_frames(reference_frames):
    assert torch.equal(_run(Offload("model", device="cpu")), reference_frames)


@pytest.mark.parametrize("resident,prefetch", [(0, 1), (1, 2), (2, 0), (0, 3), (4, 1)])
def test_block_streaming_gives_the_same_frames_within_the_budget(reference_frames, resident, prefetch):
    watched = {}

    def watch(pipe):
        watched["r"] = Residency(pipe, resident)
        watched["pipe"] = pipe

    frames = _run(Offload("blocks", device="cpu", resident=resident, prefetch=prefetch), watch)
    assert torch.equal(frames, reference_frames)
    r, streamer = watched["r"], watched["pipe"].offload.streamer
    n = len(r.blocks)
    streamed = n - resident
    assert max(r.counts) <= min(prefetch + 1, streamed)  # the budget: the running block + the prefetched ones
    if streamed:
        assert max(r.counts) == min(prefetch + 1, streamed)  # and it does prefetch
        assert all(r.ran_on_copy)  # every streamed block ran on its device copy
    assert streamer.peak_loaded <= resident + prefetch + 1
    # 3 steps, one CFG-batched call each: every streamed block copied once per call, plus the wrap-around prefetch
    assert streamer.loads == 3 * streamed + min(prefetch, streamed)
    # afterwards every block points at its own CPU tensors again
    assert all(not r._copied(i) for i in range(resident, n))


def test_block_streamer_on_plain_modules_and_its_refusals():
    torch.manual_seed(0)
    blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(5)])
    x = torch.randn(3, 8)
    want = x
    for b in blocks:
        want = b(want)
    streamer = BlockStreamer(blocks, "cpu", resident=1, prefetch=1).attach()
    got = x
    for b in blocks:
        got = b(got)
    assert torch.equal(got, want)
    assert streamer.peak_loaded == 3 and streamer.loaded() == 2  # block 1 prefetched for the next call
    streamer.detach()
    assert streamer.loaded() == 1 and not streamer._host
    with pytest.raises(CogVXError, match="resident"):
        BlockStreamer(blocks, "cpu", resident=6)
    with pytest.raises(CogVXError, match="prefetch"):
        BlockStreamer(blocks, "cpu", prefetch=-1)
    with pytest.raises(CogVXError, match="offload mode"):
        Offload("fast")


def test_t5_on_the_cpu_gives_the_same_frames(reference_frames):
    pipe = load_pipeline(TINY_MODEL, offload=Offload("model", device="cpu", text_device="cpu"))
    assert pipe.text_encoder.device.type == "cpu"
    frames = pipe.generate(PROMPT, steps=3, seed=7, frames=9, height=64, width=64).frames
    assert torch.equal(frames, reference_frames)
