"""Two training runs never share a checkpoint folder, and a damaged checkpoint on resume is named with the previous
good one offered."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cogvx_core.errors import CogVXError
from cogvx_core.train.checkpoint import list_checkpoints
from cogvx_core.train.trainer import Trainer, TrainSettings
from trainkit import load_parts, small_dataset

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(model_folder, tmp_path_factory):
    folder = model_folder("5b")
    data, cache = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("cache")
    parts = load_parts(folder)
    _, ds = small_dataset(folder, data, frames=(5, 5), cache_dir=cache, parts=parts)
    return folder, ds


def _trainer(setup, ckpt):
    folder, ds = setup
    transformer = load_parts(folder)[0]  # a fresh model per trainer (each adds its own LoRA)
    settings = TrainSettings(steps=6, rank=2, batch_size=1, mixed_precision="no", seed=3, keep_checkpoints=3)
    return Trainer(transformer, ds, settings, scaling_factor=0.7, checkpoint_dir=ckpt)


def test_a_second_run_on_a_locked_checkpoint_folder_is_refused(setup, tmp_path):
    ckpt = tmp_path / "ckpt"
    holder = textwrap.dedent("""
        import sys, time
        from cogvx_core.safe_write import FolderLock
        lock = FolderLock(sys.argv[1], "training run")   # what Trainer takes for its checkpoint folder
        print("running", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder, str(ckpt)], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == b"running"
        with pytest.raises(CogVXError, match=rf"another training run \(process {proc.pid}\).*another "
                                             r"--checkpoint-dir"):
            _trainer(setup, ckpt)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert _trainer(setup, ckpt).checkpoint_dir == ckpt  # free again once the other run is gone


@pytest.mark.slow
def test_a_trainer_holds_its_folder_against_other_processes(setup, tmp_path):
    ckpt = tmp_path / "ckpt"
    trainer = _trainer(setup, ckpt)
    probe = [sys.executable, "-c", "import sys\nfrom cogvx_core.safe_write import FolderLock\nFolderLock(sys.argv[1])",
             str(ckpt)]
    r = subprocess.run(probe, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert r.returncode != 0 and f"process {os.getpid()}" in r.stderr
    del trainer
    import gc

    gc.collect()
    r = subprocess.run(probe, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("damage", ["truncate-weights", "state-not-an-object", "state-half-written"])
def test_a_damaged_checkpoint_on_resume_names_it_and_offers_the_previous(setup, tmp_path, damage):
    ckpt = tmp_path / "ckpt"
    t = _trainer(setup, ckpt)
    t.run(until=1)
    t.save_checkpoint()
    t.run(until=2)
    t.save_checkpoint()
    latest = list_checkpoints(ckpt)[-1]
    assert latest.name == "step-00000002"
    if damage == "truncate-weights":
        weights = latest / "trainable.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "state-not-an-object":
        (latest / "state.json").write_text(json.dumps([1, 2]))
    else:
        (latest / "state.json").write_text('{"format": 1, "step": ')
    with pytest.raises(CogVXError) as e:
        _trainer(setup, ckpt).resume()
    msg = str(e.value)
    assert msg.startswith(f"{latest}: this checkpoint is damaged")
    assert f"previous complete checkpoint is {ckpt / 'step-00000001'}" in msg
    # following the advice works: the previous one resumes
    os.rename(latest, tmp_path / "damaged")
    assert _trainer(setup, ckpt).resume() == 1


def test_a_damaged_only_checkpoint_says_there_is_no_earlier_one(setup, tmp_path):
    ckpt = tmp_path / "ckpt"
    t = _trainer(setup, ckpt)
    t.run(until=1)
    path = t.save_checkpoint()
    (path / "trainable.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(CogVXError, match="damaged or incomplete .*no earlier checkpoint"):
        _trainer(setup, ckpt).resume()


def test_a_full_disk_during_a_checkpoint_is_an_error_and_keeps_the_previous(setup, tmpfs):
    mount = tmpfs("1m")
    ckpt = mount / "ckpt"
    t = _trainer(setup, ckpt)
    t.run(until=1)
    first = t.save_checkpoint()
    stat = os.statvfs(mount)
    (mount / "filler").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 2048))  # all but 2 KiB
    t.run(until=2)
    with pytest.raises(CogVXError, match=rf"{ckpt}: cannot write here: the disk is full"):
        t.save_checkpoint()
    assert list_checkpoints(ckpt) == [first]
    assert not list(ckpt.glob(".step-*.tmp-*"))  # the failed write left no temporary folder behind
    (mount / "filler").unlink()
    assert _trainer(setup, ckpt).resume() == 1  # the previous checkpoint is whole


def test_the_train_command_refuses_a_locked_folder_before_loading(tmp_path, capsys):
    from cogvx_core.cli import main
    from cogvx_core.safe_write import FolderLock

    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom cogvx_core.safe_write import FolderLock\n"
                             "lock = FolderLock(sys.argv[1])\nprint('locked', flush=True)\ntime.sleep(60)", str(ckpt)],
                            stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == b"locked"
        model = tmp_path / "model"
        for part in ("transformer", "vae", "text_encoder"):  # never loaded: the lock is checked first
            (model / part).mkdir(parents=True)
        code = main(["train", "--model", str(model), "--data", str(tmp_path), "--out", str(tmp_path / "l.safetensors"),
                     "--steps", "1", "--checkpoint-dir", str(ckpt), "--device", "cpu"])
        assert code == 2 and f"another training run (process {proc.pid})" in capsys.readouterr().err
    finally:
        proc.kill()
        proc.wait(timeout=30)
    FolderLock(ckpt).release()  # this process's refused attempt left nothing held
