"""Sharded training (FSDP2 over the expert blocks) with two CPU processes on gloo: a LoRA and a full fine-tune end
with the weights of one process that averages the two ranks' gradients (each rank its own batches and Explicit
Uniform Sampling interval, as DDP), and a sharded run killed after a sharded checkpoint resumes to the weights of
an uninterrupted sharded run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cogvx_core.errors import CogVXError
from cogvx_core.train.dataset import load_manifest, save_manifest
from cogvx_core.train.fsdp import is_sharded_checkpoint
from cogvx_core.train.trainer import Trainer, TrainSettings, latest_checkpoint
from trainkit import load_parts, small_dataset, train_like_ranks
from train_worker import SETTINGS

pytestmark = pytest.mark.slow  # process groups of 2-4 workers (CI runs them; the quick set does not)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
STEPS = 4


@pytest.fixture(scope="module")
def prepared(model_folder, tmp_path_factory):
    """(model folder, manifest of a prepared mixed-duration dataset)."""
    folder = model_folder("5b")
    tmp = tmp_path_factory.mktemp("fsdp")
    _, ds = small_dataset(folder, tmp / "data", frames=(9, 5, 9, 1), cache_dir=tmp / "cache", parts=load_parts(folder))
    return folder, save_manifest(ds, tmp / "dataset.json")


def _torchrun(prepared, *args, check=True):
    folder, manifest = prepared
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(HERE / "fsdp_worker.py"), "--model", str(folder), "--manifest", str(manifest), *args],
                         env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert run.returncode == 0, run.stderr[-3000:]
    return run


def _read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def test_sharded_lora_and_full_finetune_equal_gradient_averaging(prepared, tmp_path):
    run = _torchrun(prepared, "--modes", "lora", "full", "--steps", str(STEPS), "--out", str(tmp_path),
                    "--estimate")
    folder, manifest = prepared
    # the estimate counts each rank's half of the weights and optimizer state (plus two gathered blocks)
    est = [line.split() for line in run.stdout.splitlines() if line.startswith("estimate")]
    assert len(est) == 2
    for mode, (_, _, weights, _, optimizer) in zip(("lora", "full"), est):
        t = Trainer(load_parts(folder)[0], load_manifest(manifest),
                    TrainSettings(steps=STEPS, full_finetune=mode == "full", **SETTINGS), scaling_factor=0.7)
        ids = {id(p) for p in t.params}
        frozen = sum(p.numel() * 4 for p in t.transformer.parameters() if id(p) not in ids)
        frozen += sum(b.numel() * b.element_size() for b in t.transformer.buffers())
        block = sum(p.numel() * 4 for p in t.transformer.transformer_blocks[0].parameters())
        assert int(weights) == frozen // 2 + 2 * block
        assert int(optimizer) == sum(p.numel() for p in t.params) * 16 // 2

    for mode in ("lora", "full"):
        ref = Trainer(load_parts(folder)[0], load_manifest(manifest),
                      TrainSettings(steps=STEPS, full_finetune=mode == "full", **{**SETTINGS, "val_every": 0}),
                      scaling_factor=0.7)
        train_like_ranks(ref, STEPS)
        trained = _read(tmp_path / f"{mode}.safetensors")
        if mode == "lora":
            expected = {"transformer." + k.replace(".lora_adapters.0.down", ".lora_A.weight")
                        .replace(".lora_adapters.0.up", ".lora_B.weight"): p.detach()
                        for k, p in zip(ref.param_names, ref.params)}
        else:
            expected = {k: v for k, v in ref.transformer.state_dict().items()}
        assert trained.keys() == expected.keys() and len(expected) > 0
        worst = max(_rel(trained[k], v) for k, v in expected.items())
        assert worst <= 1e-6, (mode, worst)
        base = load_parts(folder)[0].state_dict()
        moved = [k for k in expected if k in base and not torch.equal(base[k], expected[k])] if mode == "full" else \
            [k for k, v in expected.items() if "lora_B" in k and float(v.abs().max()) > 0]
        assert moved  # training changed the weights


def test_killed_sharded_run_resumes_to_the_uninterrupted_weights(prepared, tmp_path):
    ckpt, straight = tmp_path / "ckpt", tmp_path / "straight"
    straight.mkdir()
    killed = _torchrun(prepared, "--modes", "lora", "--steps", "5", "--out", str(tmp_path), "--checkpoint-dir",
                       str(ckpt), "--die-after", "3", check=False)
    assert killed.returncode != 0 and "step 3" in killed.stdout and "step 4" not in killed.stdout
    assert not (tmp_path / "lora.safetensors").exists()
    last = latest_checkpoint(ckpt / "lora")
    assert last.name == "step-00000002" and is_sharded_checkpoint(last)
    assert len(list(last.glob("*.distcp"))) == 2 and len(list(last.glob("rng-*.safetensors"))) == 2

    done = _torchrun(prepared, "--modes", "lora", "--steps", "5", "--out", str(tmp_path), "--checkpoint-dir",
                     str(ckpt), "--straight", str(straight))
    assert "resumed 2" in done.stdout and "rank 0 step 3" in done.stdout
    a, b = _read(tmp_path / "lora.safetensors"), _read(straight / "lora.safetensors")
    assert a.keys() == b.keys() and len(a) == 16
    assert all(torch.equal(a[k], b[k]) for k in a)

    # an unsharded run refuses the sharded checkpoint, naming the fix
    folder, manifest = prepared
    t = Trainer(load_parts(folder)[0], load_manifest(manifest), TrainSettings(steps=5, **SETTINGS),
                scaling_factor=0.7, checkpoint_dir=ckpt / "lora")
    with pytest.raises(CogVXError, match="sharded.*--shard fsdp"):
        t.resume()


def test_shard_without_torchrun_is_refused(prepared):
    folder, manifest = prepared
    with pytest.raises(CogVXError, match="torchrun"):
        Trainer(load_parts(folder)[0], load_manifest(manifest), TrainSettings(steps=2, **SETTINGS),
                scaling_factor=0.7, shard="fsdp")
