"""No user file is damaged or lost: atomic outputs (a SIGKILL mid-write, a full disk), frame folders that never mix
with files already there, encode failures as errors, writability checked first, one training run per folder."""

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from unittest import mock

import pytest
import torch

from cogvx_core.errors import CogVXError
from cogvx_core.safe_write import FolderLock, atomic_path, check_writable, fresh_folder
from cogvx_core.video_io import read_frames, write_frames

ROOT = Path(__file__).resolve().parents[2]


def frames(t=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(t, 32, 32, 3, generator=g)  # (T, H, W, 3)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


# -- a writer killed mid-write -------------------------------------------------------------------------------------
KILL_WRITER = textwrap.dedent("""
    import sys, time
    from cogvx_core.safe_write import atomic_path
    with atomic_path(sys.argv[1]) as tmp:
        with open(tmp, "wb") as f:
            for i in range(100000):                 # a big file written slowly: killed long before the end
                f.write(b"new" * 100000)
                f.flush()
                if i == 3:
                    print("writing", flush=True)
                time.sleep(0.01)
""")


@pytest.mark.slow
def test_sigkill_mid_write_keeps_the_previous_file(tmp_path):
    final = tmp_path / "lora.safetensors"
    final.write_bytes(b"the previous complete file")
    proc = subprocess.Popen([sys.executable, "-c", KILL_WRITER, str(final)], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == b"writing"
    temps = [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert temps and temps[0].stat().st_size > 0  # really mid-write: the new data is going to the side name
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert final.read_bytes() == b"the previous complete file"


@pytest.mark.slow
def test_sigkill_while_encoding_a_video_keeps_the_previous_video(tmp_path):
    final = tmp_path / "clip.mp4"
    write_frames(frames(5, seed=1), final, fps=8)
    before = final.read_bytes()
    script = textwrap.dedent("""
        import sys, torch
        from cogvx_core import video_io
        real = video_io._encode
        def slow(data, path, fps, name):
            real(data[:1], path, fps, name)         # a first part is on disk under the side name
            print("encoding", flush=True)
            import time; time.sleep(60)
        video_io._encode = slow
        video_io.write_frames(torch.rand(9, 32, 32, 3), sys.argv[1], fps=8)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, str(final)], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == b"encoding"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert final.read_bytes() == before
    assert read_frames(final).shape[0] == 5


# -- a full disk ---------------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmpfs):
    """A 512 KiB disk to fill."""
    return tmpfs("512k")


def test_full_disk_leaves_the_previous_file_and_no_half_file(small_disk):
    final = small_disk / "model.safetensors"
    final.write_bytes(b"previous")
    with pytest.raises(CogVXError, match="disk is full"):
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"x" * (2 << 20))  # 2 MiB into 512 KiB
    assert final.read_bytes() == b"previous"
    assert leftovers(small_disk) == []


def test_full_disk_video_encode_is_an_error_and_keeps_the_previous(small_disk):
    final = small_disk / "clip.gif"
    final.write_bytes(b"previous")
    noise = torch.rand(40, 128, 128, 3)  # incompressible: several MB as a GIF
    with pytest.raises(CogVXError, match="disk is full"):
        write_frames(noise, final, fps=8)
    assert final.read_bytes() == b"previous"
    assert leftovers(small_disk) == []


def test_full_disk_frames_folder_is_an_error_with_no_half_folder(small_disk):
    with pytest.raises(CogVXError, match="disk is full"):
        write_frames(torch.rand(40, 128, 128, 3), small_disk / "frames")
    assert not (small_disk / "frames").exists()
    assert leftovers(small_disk) == []


def test_full_disk_lora_save_keeps_the_previous_lora(small_disk):
    from cogvx_core.lora import load_lora, save_lora

    def state(seed, rows):
        g = torch.Generator().manual_seed(seed)
        return {"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(rows, 512, generator=g),
                "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(512, rows, generator=g)}

    final = small_disk / "style.safetensors"
    save_lora(final, state(0, 4), alpha=4)  # small: fits
    before = final.read_bytes()
    with pytest.raises(CogVXError, match="disk is full"):
        save_lora(final, state(1, 256), alpha=4)  # 1 MiB: does not
    assert final.read_bytes() == before and load_lora(final).ranks == [4]
    assert leftovers(small_disk) == []


def test_enospc_from_the_low_level_write_is_named(tmp_path):
    """The same without a mount (simulated: os.replace raises ENOSPC as a full disk's rename of metadata can)."""
    final = tmp_path / "a.gif"
    with mock.patch("cogvx_core.safe_write.os.replace", side_effect=OSError(errno.ENOSPC, "No space left")):
        with pytest.raises(CogVXError, match="disk is full"):
            write_frames(frames(), final)
    assert not final.exists() and leftovers(tmp_path) == []


# -- frame folders -------------------------------------------------------------------------------------------------
def test_frames_into_a_folder_with_files_go_to_a_numbered_subfolder(tmp_path):
    out = tmp_path / "frames"
    out.mkdir()
    (out / "00000.png").write_bytes(b"the user's own file")
    first = write_frames(frames(3, seed=1), out)
    second = write_frames(frames(3, seed=2), out)
    assert (first, second) == (out / "001", out / "002")
    assert (out / "00000.png").read_bytes() == b"the user's own file"
    assert sorted(p.name for p in first.iterdir()) == ["00000.png", "00001.png", "00002.png"]
    assert not torch.equal(read_frames(first), read_frames(second))


def test_frames_into_a_new_or_empty_folder_go_there(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert write_frames(frames(2), empty) == empty
    assert write_frames(frames(2), tmp_path / "new" / "deep") == tmp_path / "new" / "deep"
    assert len(list((tmp_path / "new" / "deep").iterdir())) == 2


def test_frames_onto_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(CogVXError, match="a file of this name exists"):
        fresh_folder(tmp_path / "taken")


# -- encode failures and writability -------------------------------------------------------------------------------
@pytest.mark.parametrize("fps", [0, -8, float("nan"), float("inf"), "8"])
def test_bad_fps_is_refused_before_writing(tmp_path, fps):
    with pytest.raises(CogVXError, match="fps"):
        write_frames(frames(), tmp_path / "v.mp4", fps=fps)
    assert list(tmp_path.iterdir()) == []


def test_read_only_folder_is_an_error_not_a_path(tmpfs):
    ro = tmpfs("64k", read_only=True)
    for name in ("v.mp4", "v.gif", "frames"):
        with pytest.raises(CogVXError, match="not writable"):
            check_writable(ro / name)
        with pytest.raises(CogVXError, match="not writable"):
            write_frames(frames(), ro / name)
        assert not (ro / name).exists()


def test_encoder_failure_is_an_error_naming_the_file(tmp_path):
    final = tmp_path / "v.mp4"
    final.write_bytes(b"previous")
    with mock.patch("imageio.v2.get_writer", side_effect=RuntimeError("ffmpeg exited with code 1\nmore")):
        with pytest.raises(CogVXError, match=r"v\.mp4: \.mp4 encoding failed \(ffmpeg exited with code 1\)"):
            write_frames(frames(), final)
    assert final.read_bytes() == b"previous" and leftovers(tmp_path) == []


def test_writer_that_writes_nothing_is_an_error(tmp_path):
    with pytest.raises(CogVXError, match="without writing anything"):
        with atomic_path(tmp_path / "x.bin"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_cli_checks_the_output_before_generating(tmp_path, tmpfs, capsys):
    """A read-only --out fails in a moment, before the model is even loaded (no model folder here)."""
    from cogvx_core.cli import main

    ro = tmpfs("64k", read_only=True)
    start = time.perf_counter()
    code = main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x", "--out", str(ro / "v.mp4")])
    assert code == 2 and time.perf_counter() - start < 5
    assert "not writable" in capsys.readouterr().err


# -- one training run per folder -----------------------------------------------------------------------------------
HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from cogvx_core.safe_write import FolderLock
    lock = FolderLock(sys.argv[1])
    print("locked", flush=True)
    time.sleep(60)
""")


def test_folder_lock_refuses_a_second_process_and_frees_on_kill(tmp_path):
    folder = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == b"locked"
        with pytest.raises(CogVXError, match=rf"another training run \(process {proc.pid}\) is using this folder"):
            FolderLock(folder)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    FolderLock(folder).release()  # a killed holder leaves no stale lock


@pytest.mark.slow
def test_folder_lock_is_shared_in_one_process_and_released_with_its_holders(tmp_path):
    folder = tmp_path / f"ckpt-{uuid.uuid4().hex}"
    a, b = FolderLock(folder), FolderLock(folder)
    check = [sys.executable, "-c", "import sys\nfrom cogvx_core.safe_write import FolderLock\nFolderLock(sys.argv[1])",
             str(folder)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    a.release()
    assert subprocess.run(check, env=env, capture_output=True).returncode != 0  # b still holds it
    del b
    assert subprocess.run(check, env=env, capture_output=True).returncode == 0


def test_cli_reports_an_os_error_in_one_line(capsys):
    """Whatever command meets a full disk (a cache, a manifest), the CLI says so in one line, exit code 2."""
    from cogvx_core.cli import main
    from cogvx_core.commands import synth

    with mock.patch.object(synth, "run", side_effect=OSError(errno.ENOSPC, "No space left on device", "data/x.png")):
        assert main(["synth", "--out", "data", "--n", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: data/x.png: cannot write here: the disk is full; free some space or write to another disk. "
                   "Nothing was written under this name."]
