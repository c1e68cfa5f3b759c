"""Data-parallel training: `cogvx train` under torchrun with two CPU processes on gloo (each encoding its share of
the clips, then DDP) ends with the LoRA of one process that averages the two ranks' gradients, each rank with its
own batches and its own Explicit Uniform Sampling intervals."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cogvx_core.train.buckets import make_buckets
from cogvx_core.train.dataset import prepare_dataset
from cogvx_core.train.trainer import Trainer, TrainSettings
from trainkit import CAPTIONS, load_parts, train_like_ranks, write_clip

STEPS = 3


@pytest.mark.slow
@pytest.mark.parametrize("shard", ["none", "fsdp"])
def test_torchrun_two_gloo_processes_equal_gradient_averaging(model_folder, tmp_path, shard):
    """DDP, and FSDP sharding (--shard fsdp, with the per-process memory estimate every rank helps make)."""
    folder = model_folder("5b")
    data = tmp_path / "data"
    data.mkdir()
    for i, n in enumerate((9, 5, 9, 9)):
        write_clip(data / f"clip{i}.mp4", n, 40, 56, seed=i, caption=CAPTIONS[i])
    write_clip(data / "still.png", 1, 40, 56, seed=9, caption=CAPTIONS[4])
    out = tmp_path / "lora.safetensors"
    root = str(Path(__file__).resolve().parents[2])  # the package is not installed: the workers find it here
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "cogvx_core", "train", "--model", str(folder), "--data", str(data), "--out", str(out),
                          "--steps", str(STEPS), "--rank", "4", "--alpha", "2", "--lr", "3e-3", "--batch-size", "2",
                          "--frames", "9", "--height", "32", "--width", "48", "--seed", "5", "--device", "cpu",
                          "--schedule", "cosine", "--warmup", "1", "--shard", shard,
                          *(["--no-estimate"] if shard == "none" else [])],
                         env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("train [") >= 1 and "5 clips" in run.stderr  # rank 0 reports, once
    assert run.stderr.count("estimate: peak memory") == (shard == "fsdp")
    assert len(list((data / ".cogvx_cache" / "latents").glob("*/*.safetensors"))) == 5  # both shards were encoded

    # one process doing what the two ranks do: rank r's batch and timesteps, gradients averaged
    transformer, vae, text = load_parts(folder)
    ds = prepare_dataset(data, vae=vae, text_encoder=text, variant=transformer.variant,
                         buckets=make_buckets(transformer.variant, 9, 32, 48))  # every entry is in the cache now
    settings = TrainSettings(steps=STEPS, rank=4, alpha=2, learning_rate=3e-3, batch_size=2, seed=5,
                             mixed_precision="no", lr_schedule="cosine", warmup_steps=1)
    ref = Trainer(transformer, ds, settings, scaling_factor=vae.scaling_factor)
    seen_t = train_like_ranks(ref, STEPS)
    with safe_open(str(out), "pt") as f:
        trained = {k: f.get_tensor(k) for k in f.keys()}
    expected = {k.replace(".lora_adapters.0.down", ".lora_A.weight").replace(".lora_adapters.0.up", ".lora_B.weight"):
                p.detach() for k, p in zip(ref.param_names, ref.params)}
    assert len(trained) == len(expected) == 16
    for k, v in expected.items():
        torch.testing.assert_close(trained[f"transformer.{k}"], v, rtol=1e-4, atol=1e-6)
    assert any(float(v.abs().max()) > 0 for k, v in trained.items() if "lora_B" in k)
    # the four timesteps of a step (2 ranks x batch 2) fall in the four quarters of the range
    for step in range(STEPS):
        ts = torch.cat(seen_t[2 * step:2 * step + 2]).tolist()
        assert [t * 4 // 1000 for t in ts] == [0, 1, 2, 3]
