"""Shared pieces of the trainer tests: tiny model folders, clip writers, loaded parts, prepared datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cogvx_core.checkpoints.transformer import load_transformer
from cogvx_core.checkpoints.vae import load_vae
from cogvx_core.text import load_text_encoder
from cogvx_core.train.buckets import make_buckets
from cogvx_core.train.dataset import prepare_dataset
from cogvx_core.video_io import write_frames

CAPTIONS = ["a small red fox runs", "a big blue owl flies", "a grey dog on the road", "a gold cat in the grass",
            "a pink bird at the beach", "a dark horse on the hill"]


def load_parts(folder: Path):
    """(transformer fp32, vae, text encoder) of a folder made by builders.write_pipeline_folder."""
    transformer = load_transformer(Path(folder) / "transformer", dtype=torch.float32)
    text = load_text_encoder(folder, dtype=torch.float32, max_length=transformer.config["max_text_seq_length"])
    return transformer, load_vae(Path(folder) / "vae", dtype=torch.float32), text


def clip_frames(frames: int, height: int, width: int, seed: int) -> torch.Tensor:
    """A smooth moving pattern (T, H, W, 3) in [0, 1]: compresses and decodes like video, unlike noise."""
    g = torch.Generator().manual_seed(seed)
    phase = torch.rand(3, generator=g) * 6.28
    t = torch.arange(frames, dtype=torch.float32)[:, None, None, None]
    y = torch.linspace(0, 3, height)[None, :, None, None]
    x = torch.linspace(0, 3, width)[None, None, :, None]
    return (0.5 + 0.4 * torch.sin(x * 2 + y + 0.5 * t + phase)).clamp(0, 1)


def write_clip(path: Path, frames: int, height: int = 48, width: int = 64, seed: int = 0, caption: str | None = None,
               fps: int = 8) -> Path:
    """A clip at `path`: .mp4 / .gif / .png (one frame) or, without a suffix, a folder of PNG frames; and its
    caption beside it (unless caption is None)."""
    path = Path(path)
    data = clip_frames(frames, height, width, seed)
    if path.suffix.lower() in (".png", ".jpg"):
        Image.fromarray((data[0].numpy() * 255).round().astype(np.uint8)).save(path)
    else:
        write_frames(data, path, fps=fps)
    if caption is not None:
        (path.with_name(path.stem + ".txt") if path.suffix else path.with_name(path.name + ".txt")).write_text(caption)
    return path


def small_dataset(folder: Path, data: Path, *, frames=(9, 9, 5, 1), size=(32, 48), bucket_frames: int = 9,
                  cache_dir=None, parts=None, **kw):
    """Writes clips of the given frame counts (1: a PNG image) into `data` and prepares them."""
    data.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(frames):
        name = f"img{i}.png" if n == 1 else f"clip{i}"
        if not (data / name).exists():
            write_clip(data / name, n, 40, 56, seed=i, caption=CAPTIONS[i % len(CAPTIONS)])
    transformer, vae, text = parts or load_parts(folder)
    buckets = make_buckets(transformer.variant, bucket_frames, *size)
    ds = prepare_dataset(data, vae=vae, text_encoder=text, variant=transformer.variant, buckets=buckets,
                         cache_dir=cache_dir, fps=0, **kw)
    return transformer, ds


def train_like_ranks(trainer, steps: int, world_size: int = 2) -> list:
    """Trains `trainer` (one process) as `world_size` data-parallel ranks would: each step takes every rank's batch
    and timesteps and averages their gradients. Returns the timesteps drawn, per step and rank."""
    from cogvx_core.train import ddp
    from cogvx_core.train.buckets import BatchPlan
    from cogvx_core.train.timesteps import TimestepSampler

    s, ds = trainer.settings, trainer.dataset
    trainer.plan = BatchPlan([ds.group(i) for i in range(len(ds))], s.batch_size, world_size=world_size, seed=s.seed)
    trainer.sampler = TimestepSampler(1000, s.timestep_sampling, world_size=world_size, batch_size=s.batch_size,
                                      seed=s.seed)
    seen = []
    for step in range(steps):
        for group in trainer.optimizer.param_groups:
            group["lr"] = trainer.lr_at(step)
        for rank in range(world_size):
            trainer.dist = ddp.DistInfo(rank=rank, world_size=world_size)  # only the batch choice reads it here
            _, latents, mask, context, noise, t = trainer.batch(step)
            trainer.dist = ddp.DistInfo()
            seen.append(t)
            (trainer.compute_loss(latents, noise, t, context, mask).mean() / world_size).backward()
        torch.nn.utils.clip_grad_norm_(trainer.params, s.max_grad_norm)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
    return seen
