"""Resolution and duration buckets, and the batch plan with the paper's Frame Pack.

Every clip is assigned one resolution bucket (the nearest aspect ratio; the clip is resized to cover it and centre
cropped) and one duration bucket (the longest frame count it can fill; images are 1-frame videos). A batch holds
clips of one resolution. With Frame Pack (CogVideoX paper, section 3.1, "Multi-Resolution Frame Pack") clips of
different durations share a batch: the shorter ones are padded to the longest latent length and the padding is
masked out of attention and of the loss (trainer.py), so each clip is trained exactly as if it were alone, no clip
is cut to a common length and no short clip is dropped. Without Frame Pack a batch holds one duration only.

The batch plan is a pure function of (seed, epoch): step s on rank r trains batch s * world_size + r of the
endless sequence of epochs, so data order needs no saved state to resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import CogVXError
from ..variants import Variant, snap_frames
from .rng import generator


@dataclass(frozen=True)
class Buckets:
    resolutions: tuple[tuple[int, int], ...]  # (height, width) pairs, multiples of 16
    frame_counts: tuple[int, ...]  # ascending pixel frame counts 4k+1; 1 is the image bucket

    def describe(self) -> str:
        sizes = ", ".join(f"{w}x{h}" for h, w in self.resolutions)
        return f"sizes {sizes}; frames {', '.join(map(str, self.frame_counts))}"


def parse_resolutions(text: str) -> list[tuple[int, int]]:
    """'720x480,480x720' (width x height, comma separated) -> [(480, 720), (720, 480)] as (height, width)."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            w, h = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise CogVXError(f"Bucket size {part!r}: write sizes as WIDTHxHEIGHT, comma separated, e.g. "
                             "'720x480,480x720'.") from None
        out.append((h, w))
    if not out:
        raise CogVXError("No bucket sizes given; write them as WIDTHxHEIGHT, e.g. '720x480'.")
    return out


def make_buckets(variant: Variant, frames: int, height: int, width: int,
                 resolutions: list[tuple[int, int]] | None = None,
                 frame_counts: list[int] | None = None, *, fixed_size: tuple[int, int] | None = None,
                 name: str | None = None) -> Buckets:
    """The buckets of a run. Durations default to every count the variant was trained on (frame_step * N + 1) up to
    `frames`, plus 1 for images; sizes default to (height, width) alone. Every value is checked here, up front.
    fixed_size: the (height, width) a learned position table allows (default: the variant's, for 5b-I2V); name: the
    model's, for messages."""
    if frames < 1:
        raise CogVXError(f"--frames must be at least 1, got {frames}.")
    if snap_frames(frames) != frames:
        raise CogVXError(f"{frames} frames: the VAE needs 4k+1 frames; use {snap_frames(frames)}.")
    sizes = list(resolutions or [(height, width)])
    for h, w in sizes:
        if h < 16 or w < 16 or h % 16 or w % 16:
            raise CogVXError(f"Bucket size {w}x{h}: sizes must be multiples of 16 (e.g. "
                             f"{max(16, w // 16 * 16)}x{max(16, h // 16 * 16)}).")
    if fixed_size is None and variant.positions == "rope+learned":
        fixed_size = (variant.height, variant.width)
    if fixed_size is not None and any(s != tuple(fixed_size) for s in sizes):
        raise CogVXError(f"{name or variant.title} has learned positions for {fixed_size[1]}x{fixed_size[0]} only; "
                         f"train at that size (leave the size unset for the model's own).")
    if frame_counts is None:
        counts = {1, frames} | {n for n in range(1 + variant.frame_step, frames + 1, variant.frame_step)}
    else:
        counts = set(frame_counts)
        bad = [n for n in counts if n < 1 or snap_frames(n) != n]
        if bad:
            raise CogVXError(f"Duration buckets {bad}: frame counts must be 4k+1 (1, 5, 9, ..., 49).")
    return Buckets(tuple(dict.fromkeys(sizes)), tuple(sorted(counts)))


def buckets_for(transformer, frames: int | None = None, height: int | None = None, width: int | None = None,
                resolutions: list[tuple[int, int]] | None = None, frame_counts: list[int] | None = None) -> Buckets:
    """make_buckets for a loaded transformer: unset (None or 0) frames and sizes are the model's own defaults, and a
    learned position table's size is enforced with the model's name."""
    default_frames, default_height, default_width = transformer.default_size()
    return make_buckets(transformer.variant, frames or default_frames, height or default_height,
                        width or default_width, resolutions, frame_counts, fixed_size=transformer.learned_size,
                        name=transformer.name)


def assign(available_frames: int, height: int, width: int, buckets: Buckets) -> tuple[int, int, int]:
    """(frames, height, width) of the bucket a clip of this size goes to.

    Frames: the longest bucket count the clip fills. Size: the nearest aspect ratio (ties: the first listed).
    """
    fitting = [n for n in buckets.frame_counts if n <= available_frames]
    frames = max(fitting) if fitting else 1
    ratio = math.log(width / height)
    h, w = min(buckets.resolutions, key=lambda hw: abs(math.log(hw[1] / hw[0]) - ratio))
    return frames, h, w


class BatchPlan:
    """Which items each (step, rank) trains on. `groups[i]` is item i's batch group (its size bucket, or its size
    and duration bucket without Frame Pack); a batch never mixes groups."""

    def __init__(self, groups: list, batch_size: int, *, world_size: int = 1, seed: int = 0):
        if not groups:
            raise CogVXError("The dataset is empty: nothing to train on.")
        if batch_size < 1:
            raise CogVXError(f"batch size must be at least 1, got {batch_size}.")
        self.batch_size, self.world_size, self.seed = int(batch_size), int(world_size), int(seed)
        by_group: dict = {}
        for i, g in enumerate(groups):
            by_group.setdefault(g, []).append(i)
        self.groups = list(by_group.values())
        self.batches_per_epoch = sum(math.ceil(len(m) / self.batch_size) for m in self.groups)
        self._epoch: tuple[int, list[list[int]]] | None = None

    def epoch(self, epoch: int) -> list[list[int]]:
        """Every item once (a group's last batch is topped up from its start), in a seeded random order."""
        if self._epoch is not None and self._epoch[0] == epoch:
            return self._epoch[1]
        g = generator(self.seed, "data-order", epoch)
        batches = []
        for members in self.groups:
            order = [members[i] for i in torch.randperm(len(members), generator=g).tolist()]
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                fill = 0
                while len(batch) < self.batch_size:  # top up from the group's own start: shapes stay consistent
                    batch.append(order[fill % len(order)])
                    fill += 1
                batches.append(batch)
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        self._epoch = (epoch, batches)
        return batches

    def batch(self, step: int, rank: int = 0) -> list[int]:
        index = int(step) * self.world_size + int(rank)
        epoch, position = divmod(index, self.batches_per_epoch)
        return self.epoch(epoch)[position]


# ---------------------------------------------------------------------------------------------------------------
# Frame Pack
# ---------------------------------------------------------------------------------------------------------------
def pack(latents: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Clips of one size and any durations, each (C, t_i, h, w) -> (B, C, T, h, w) padded with zeros at the end to
    the longest T, and the frame mask (B, T) of real frames (None when nothing was padded)."""
    longest = max(x.shape[1] for x in latents)
    if all(x.shape[1] == longest for x in latents):
        return torch.stack(latents), None
    batch = latents[0].new_zeros((len(latents), latents[0].shape[0], longest) + tuple(latents[0].shape[2:]))
    mask = torch.zeros(len(latents), longest, dtype=torch.bool)
    for i, x in enumerate(latents):
        batch[i, :, :x.shape[1]] = x
        mask[i, :x.shape[1]] = True
    return batch, mask


def attention_key_mask(frame_mask: torch.Tensor, text_len: int, tokens_per_frame: int, patch_t: int = 1
                       ) -> torch.Tensor:
    """(B, T) real-frame mask -> (B, 1, 1, text_len + N) keys every token may attend to: the text and the real
    frames. Video tokens are ordered (t, h, w), so a latent frame's tokens are one contiguous run."""
    frames = frame_mask[:, ::patch_t]  # one entry per token frame (real frame pairs stay together)
    video = frames.repeat_interleave(tokens_per_frame, dim=1)  # (B, N)
    text = torch.ones(frame_mask.shape[0], text_len, dtype=torch.bool, device=frame_mask.device)
    return torch.cat([text, video], dim=1)[:, None, None, :]
