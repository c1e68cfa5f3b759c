"""Data-parallel training: two CPU processes on gloo under torchrun end with identical weights, equal to one process
that averages the two ranks' gradients (each rank with its own batches and Explicit Uniform Sampling intervals)."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from cogvx_core.train import ddp
from cogvx_core.train.buckets import BatchPlan
from cogvx_core.train.dataset import save_manifest
from cogvx_core.train.timesteps import TimestepSampler
from cogvx_core.train.trainer import Trainer, TrainSettings
from trainkit import load_parts, small_dataset

HERE = Path(__file__).resolve().parent
STEPS = 3


def test_two_gloo_processes_equal_gradient_averaging(model_folder, tmp_path):
    from train_worker import SETTINGS

    folder = model_folder("5b")
    parts = load_parts(folder)
    _, ds = small_dataset(folder, tmp_path / "data", frames=(9, 5, 9, 1, 9), parts=parts)
    manifest = save_manifest(ds, tmp_path / "dataset.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(HERE / "train_worker.py"), "--model", str(folder), "--manifest", str(manifest),
                          "--checkpoint-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "lora.safetensors"),
                          "--steps", str(STEPS), "--dump", str(tmp_path / "params")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    def load(path):
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()

    (r0, meta0), (r1, meta1) = load(tmp_path / "params.rank0.safetensors"), load(tmp_path / "params.rank1.safetensors")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # DDP keeps the ranks in step
    assert meta0["losses"] == meta1["losses"]  # the logged loss is the mean over ranks on both

    # one process doing what the two ranks do: rank r's batch and timesteps, gradients averaged
    settings = TrainSettings(steps=STEPS, **{**SETTINGS, "save_every": 0, "val_every": 0})
    ref = Trainer(load_parts(folder)[0], ds, settings, scaling_factor=0.7)
    groups = [ds.group(i) for i in range(len(ds))]
    ref.plan = BatchPlan(groups, settings.batch_size, world_size=2, seed=settings.seed)
    ref.sampler = TimestepSampler(1000, "explicit", world_size=2, batch_size=settings.batch_size, seed=settings.seed)
    losses, seen_t = [], []
    for step in range(STEPS):
        for group in ref.optimizer.param_groups:
            group["lr"] = ref.lr_at(step)
        total = 0.0
        for rank in range(2):
            ref.dist = ddp.DistInfo(rank=rank, world_size=2)  # only the batch choice reads it here
            _, latents, mask, context, noise, t = ref._batch(step)
            ref.dist = ddp.DistInfo()
            seen_t.append(t)
            loss = ref.compute_loss(latents, noise, t, context, mask).mean()
            (loss / 2).backward()
            total += loss.item() / 2
        torch.nn.utils.clip_grad_norm_(ref.params, settings.max_grad_norm)
        ref.optimizer.step()
        ref.optimizer.zero_grad()
        losses.append(total)
    expected = dict(zip(ref.param_names, ref.params))
    for k in r0:
        torch.testing.assert_close(r0[k], expected[k].detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.tensor(eval(meta0["losses"])), torch.tensor(losses), rtol=1e-5, atol=0)
    # the four timesteps of a step (2 ranks x batch 2) fall in the four quarters of the range
    for step in range(STEPS):
        ts = torch.cat(seen_t[2 * step:2 * step + 2]).tolist()
        assert [t * 4 // 1000 for t in ts] == [0, 1, 2, 3]
    assert (tmp_path / "lora.safetensors").is_file()
