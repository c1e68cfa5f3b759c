"""The training loop's reliability: exact resume (in process, and after SIGKILL of a training process), atomic
checkpoints, refusal of incompatible checkpoints, NaN skipping and rollback, validation loss, the memory estimate,
models loaded under inference mode, and the saved LoRA."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cogvx_core.checkpoints.lora import read_lora
from cogvx_core.errors import CogVXError
from cogvx_core.train.dataset import load_manifest, save_manifest
from cogvx_core.train.estimate import _param_ptrs, estimate, saved_activation_bytes
from cogvx_core.train.checkpoint import latest_checkpoint, list_checkpoints, write_checkpoint
from cogvx_core.train.trainer import Trainer, TrainSettings
from trainkit import load_parts, small_dataset

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def setup(model_folder, tmp_path_factory):
    """(folder, data, cache, parts): a prepared mixed-duration dataset and the loaded parts (copied per test)."""
    folder = model_folder("5b")
    data = tmp_path_factory.mktemp("data")
    cache = tmp_path_factory.mktemp("cache")
    parts = load_parts(folder)
    small_dataset(folder, data, frames=(9, 5, 9, 1), cache_dir=cache, parts=parts)
    return folder, data, cache, parts


def _trainer(setup, ckpt=None, transformer=None, **overrides):
    folder, data, cache, parts = setup
    fresh = transformer or load_parts(folder)[0]
    _, ds = small_dataset(folder, data, frames=(9, 5, 9, 1), cache_dir=cache, parts=(fresh, parts[1], parts[2]))
    kw = dict(steps=6, rank=4, alpha=2, learning_rate=3e-3, batch_size=2, mixed_precision="no", seed=7,
              lr_schedule="cosine", warmup_steps=2)
    kw.update(overrides)
    return Trainer(fresh, ds, TrainSettings(**kw), scaling_factor=0.7, checkpoint_dir=ckpt)


def _lora(trainer):
    return {n: p.detach().clone() for n, p in zip(trainer.param_names, trainer.params)}


def test_resume_in_process_is_bitwise_exact(setup, tmp_path):
    full = _trainer(setup)
    full.run()
    first = _trainer(setup, tmp_path / "ckpt")
    first.run(until=3)
    first.save_checkpoint()
    first.run(until=4)  # trained past the checkpoint, then "lost"
    second = _trainer(setup, tmp_path / "ckpt")
    assert second.resume() == 3
    second.run()
    a, b = _lora(full), _lora(second)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert second.losses == full.losses
    assert second.optimizer.state_dict()["state"][0]["step"] == full.optimizer.state_dict()["state"][0]["step"]
    # and training did move the LoRA's up weights off zero
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if k.endswith("up"))


@pytest.mark.slow
def test_kill_and_resume_equals_an_uninterrupted_run(setup, tmp_path):
    """A training process SIGKILLed after a checkpoint, then resumed, writes the same LoRA bits as a run never
    interrupted."""
    folder, data, cache, parts = setup
    _, ds = small_dataset(folder, data, frames=(9, 5, 9, 1), cache_dir=cache, parts=parts)
    manifest = save_manifest(ds, tmp_path / "dataset.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

    def cmd(out, ckpt, sleep=0.0):
        return [sys.executable, str(HERE / "train_worker.py"), "--model", str(folder), "--manifest", str(manifest),
                "--checkpoint-dir", str(ckpt), "--out", str(out), "--steps", "8", "--sleep", str(sleep)]

    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen(cmd(tmp_path / "killed.safetensors", ckpt, sleep=0.15), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("step 5"):  # checkpoints at 2 and 4 exist; step 6 is on its way
                time.sleep(0.1)
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed.safetensors").exists()
    assert latest_checkpoint(ckpt).name == "step-00000004"
    done = subprocess.run(cmd(tmp_path / "killed.safetensors", ckpt), env=env, check=True, capture_output=True,
                          text=True, timeout=300)
    assert "resumed 4" in done.stdout and "step 5" in done.stdout and "step 4 " not in done.stdout

    # the uninterrupted run, here in the test process (one thread, as the workers)
    from train_worker import SETTINGS

    straight = Trainer(load_parts(folder)[0], load_manifest(manifest), TrainSettings(steps=8, **SETTINGS),
                       scaling_factor=0.7, checkpoint_dir=tmp_path / "ckpt-straight")
    straight.run()
    straight.save(tmp_path / "straight.safetensors")

    def tensors(path):
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()

    (a, meta_a), (b, meta_b) = tensors(tmp_path / "straight.safetensors"), tensors(tmp_path / "killed.safetensors")
    assert a.keys() == b.keys() and len(a) == 2 * 4 * 2
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert meta_a["cogvx.steps"] == meta_b["cogvx.steps"] == "8"


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    root = tmp_path / "ckpt"
    for step in (2, 4, 6):
        write_checkpoint(root, step, {"param.x": torch.full((2,), float(step))}, {"step": step}, keep=2)
    assert [p.name for p in list_checkpoints(root)] == ["step-00000004", "step-00000006"]
    (root / ".step-00000008.tmp-123").mkdir()  # a write killed half-way
    (root / ".step-00000008.tmp-123" / "state.json").write_text("{")
    (root / "step-00000010").mkdir()  # not a complete checkpoint (never made by rename, but be safe)
    assert latest_checkpoint(root).name == "step-00000006"


def test_resume_refuses_incompatible_checkpoints(setup, tmp_path):
    t = _trainer(setup, tmp_path / "ckpt")
    t.run(until=2)
    t.save_checkpoint()
    with pytest.raises(CogVXError, match=r"other settings \(learning_rate: 0.003 -> 0.001\)"):
        _trainer(setup, tmp_path / "ckpt", learning_rate=1e-3).resume()
    with pytest.raises(CogVXError, match="cosine schedule depends on the total steps; resume with --steps 6"):
        _trainer(setup, tmp_path / "ckpt", steps=9).resume()
    other_base = load_parts(setup[0])[0]
    with torch.no_grad():
        other_base.proj_out.bias.add_(1.0)
    with pytest.raises(CogVXError, match="another base model"):
        _trainer(setup, tmp_path / "ckpt", transformer=other_base).resume()
    # settings outside the trajectory may change
    assert _trainer(setup, tmp_path / "ckpt", val_every=5, save_every=1).resume() == 2
    assert _trainer(setup, tmp_path / "empty").resume() is None


def test_non_finite_loss_skips_the_step_and_rolls_back(setup):
    t = _trainer(setup, nan_patience=2, snapshot_every=2, lr_schedule="constant", warmup_steps=0, steps=10)
    t.run(until=2)  # a snapshot at step 2
    snap = _lora(t)
    good = t.compute_loss
    t.compute_loss = lambda *a, **k: good(*a, **k) * float("nan")
    r3 = t.train_step()
    assert r3.skipped and not r3.rolled_back and math.isnan(r3.loss)
    assert all(torch.equal(v, snap[k]) for k, v in _lora(t).items())  # the bad step changed nothing
    assert t.optimizer.state_dict()["state"][0]["step"] == 2
    r4 = t.train_step()
    assert r4.rolled_back and t.lr_scale == 0.5 and t.lr_at(5) == pytest.approx(1.5e-3)
    t.compute_loss = good
    t.run(until=6)
    assert not any(h["skipped"] for h in t.history[4:])
    # weights that went bad roll back at once
    with torch.no_grad():
        t.params[0][0, 0] = float("inf")
    r = t.train_step()
    assert r.skipped and r.rolled_back and all(bool(torch.isfinite(p).all()) for p in t.params)


def test_validation_loss_is_fixed_noise_and_timesteps(setup):
    t = _trainer(setup, val_timesteps=(50, 950), val_items=3)
    a, b = t.validate(), t.validate()
    assert a["per_timestep"] == b["per_timestep"] and set(a["per_timestep"]) == {50, 950}
    assert a["loss"] == pytest.approx(sum(a["per_timestep"].values()) / 2)
    assert len(t.validation_indices()) == 3
    t.run(until=3)
    assert t.validate()["loss"] != a["loss"]


def test_trains_a_model_loaded_under_inference_mode(setup):
    """ComfyUI loads models under torch.inference_mode; their tensors cannot be saved for backward as they are."""
    from cogvx_core.checkpoints.transformer import load_transformer

    with torch.inference_mode():
        transformer = load_transformer(setup[0] / "transformer", dtype=torch.float32)
        assert transformer.proj_out.weight.is_inference()
    t = _trainer(setup, transformer=transformer, steps=2)
    with torch.inference_mode():  # the node runs the steps inside ComfyUI's inference mode too
        with torch.inference_mode(False), torch.enable_grad():
            t.run()
    assert t.step == 2 and all(math.isfinite(x) for x in t.losses)


def test_memory_estimate_matches_what_autograd_keeps(setup):
    t = _trainer(setup, gradient_checkpointing=False)
    est = estimate(t)
    _, latents, mask, context, noise, ts = t.batch(0)
    assert latents.shape[0] == 2
    # measure the largest batch: two 9-frame clips
    latents = torch.stack([t._clip_latents(i, None, t.dataset) for i in (0, 2)])
    noise = torch.randn(latents.shape)
    measured = saved_activation_bytes(lambda: t.compute_loss(latents, noise, ts, torch.stack(
        [t.dataset.context(i) for i in (0, 2)])), _param_ptrs(t.transformer))
    assert 0.8 < est.activations / measured < 1.35, (est.activations, measured)
    assert est.trainable_params == sum(p.numel() for p in t.params)
    assert est.step_seconds > 0 and "s/step" in est.describe()
    t.settings.gradient_checkpointing = True
    assert estimate(t, measure_rate=False).activations < est.activations


def test_saved_lora_carries_rank_alpha_targets_and_variant(setup, tmp_path):
    t = _trainer(setup, steps=2)
    t.run()
    path = t.save(tmp_path / "out.safetensors")
    lora = read_lora(path)
    meta = lora.metadata
    assert meta["cogvx.rank"] == "4" and meta["cogvx.alpha"] == "2" and meta["cogvx.base_variant"] == "5b"
    assert meta["cogvx.targets"] == "to_k,to_out.0,to_q,to_v" or set(meta["cogvx.targets"].split(",")) == {
        "to_q", "to_k", "to_v", "to_out.0"}
    peft = json.loads(meta["lora_adapter_metadata"])
    assert peft["transformer.r"] == 4 and peft["transformer.lora_alpha"] == 2
    assert meta["cogvx.steps"] == "2" and json.loads(meta["cogvx.trainer"])["learning_rate"] == 3e-3
    assert all(layer.alpha == 2 for layer in lora.layers.values()) and len(lora.layers) == 8
    mem = t.lora()
    assert mem.layers.keys() == lora.layers.keys()
    assert all(torch.equal(mem.layers[n].up, lora.layers[n].up) for n in mem.layers)


def test_full_finetune_trains_every_weight(setup, tmp_path):
    t = _trainer(setup, full_finetune=True, steps=1, learning_rate=1e-4, warmup_steps=0)
    before = t.transformer.proj_out.weight.detach().clone()
    t.run()
    assert not torch.equal(before, t.transformer.proj_out.weight)
    path = t.save(tmp_path / "full.safetensors")
    from cogvx_core.checkpoints.transformer import load_transformer

    again = load_transformer(path)
    assert torch.equal(again.proj_out.weight, t.transformer.proj_out.weight.detach())
    with pytest.raises(CogVXError, match="no LoRA"):
        t.lora()


def test_lr_schedules():
    from types import SimpleNamespace

    s = TrainSettings(steps=10, learning_rate=1.0, warmup_steps=2, lr_schedule="cosine")
    fake = SimpleNamespace(settings=s, lr_scale=1.0)
    lrs = [Trainer.lr_at(fake, k) for k in range(10)]
    assert lrs[:3] == [0.0, 0.5, 1.0] and lrs[2] > lrs[6] > lrs[9] > 0
    assert lrs[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    fake.settings = TrainSettings(steps=10, learning_rate=2.0)
    assert [Trainer.lr_at(fake, k) for k in (0, 9)] == [2.0, 2.0]
    with pytest.raises(CogVXError, match="lr schedule"):
        TrainSettings(lr_schedule="linear").check()


def test_refuses_image_to_video_models_and_datasets_of_another_variant(setup):
    from builders import small_transformer_config
    from cogvx_core.transformer import build_transformer

    folder, data, cache, parts = setup
    _, ds = small_dataset(folder, data, frames=(9, 5, 9, 1), cache_dir=cache, parts=parts)
    i2v = build_transformer(small_transformer_config("5b-i2v"), device="cpu")
    with pytest.raises(CogVXError, match="image-to-video model; CogVX trains text-to-video models only"):
        Trainer(i2v, ds, TrainSettings(steps=1))
    other = build_transformer(small_transformer_config("2b"), device="cpu")
    with pytest.raises(CogVXError, match="prepared for CogVideoX 5b but the model is CogVideoX-2b"):
        Trainer(other, ds, TrainSettings(steps=1))
    with pytest.raises(CogVXError, match="LoRA rank must be at least 1"):
        TrainSettings(rank=0).check()
