"""Frame and size rules per variant (snapped with a note, or refused), and the pipeline's progress/cancel hooks."""

import pytest
import torch

from builders import write_pipeline_folder
from cogvx_core import CancelledError, CheckpointError, CogVXError, load_pipeline
from cogvx_core.variants import VARIANTS, snap_frames, snap_request


@pytest.mark.parametrize("frames,want", [(1, 1), (2, 1), (3, 5), (8, 9), (9, 9), (48, 49), (50, 49), (80, 81)])
def test_frames_snap_to_4k_plus_1(frames, want):
    assert snap_frames(frames) == want


def test_valid_request_unchanged_and_no_notes():
    assert snap_request(VARIANTS["5b"], 49, 480, 720, has_image=False) == (49, 480, 720, [])
    assert snap_request(VARIANTS["1.5-5b"], 81, 768, 1360, has_image=False) == (81, 768, 1360, [])


def test_snapping_says_what_changed():
    f, h, w, notes = snap_request(VARIANTS["5b"], 50, 470, 730, has_image=False)
    assert (f, h, w) == (49, 464, 736)
    assert any("frames 50 -> 49" in n for n in notes) and any("730x470 -> 736x464" in n for n in notes)
    # 8N+1 / 16N+1 are recommendations: a hint, not a change
    f, _, _, notes = snap_request(VARIANTS["1.5-5b"], 45, 768, 1360, has_image=False)
    assert f == 45 and any("16N+1" in n for n in notes)


def test_release_limits():
    _, h, w, notes = snap_request(VARIANTS["5b-i2v"], 49, 512, 512, has_image=True)
    assert (w, h) == (720, 480) and "learned positions" in notes[0]
    _, h, w, _ = snap_request(VARIANTS["1.5-5b-i2v"], 81, 1080, 1920, has_image=True)
    assert (w, h) == (1360, 768)
    _, h, w, _ = snap_request(VARIANTS["1.5-5b-i2v"], 81, 1280, 720, has_image=True)  # portrait
    assert (w, h) == (768, 1360)
    _, h, w, _ = snap_request(VARIANTS["1.5-5b-i2v"], 81, 768, 1024, has_image=True)
    assert (w, h) == (1024, 768)
    # small (non-released) models keep only the structural rules
    assert snap_request(VARIANTS["5b-i2v"], 9, 64, 96, has_image=True, released=False)[:3] == (9, 64, 96)


def test_refusals():
    with pytest.raises(CogVXError, match="image-to-video model: give it a start image"):
        snap_request(VARIANTS["1.5-5b-i2v"], 81, 768, 1360, has_image=False)
    with pytest.raises(CogVXError, match="text-to-video model and cannot take a start image"):
        snap_request(VARIANTS["2b"], 49, 480, 720, has_image=True)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return load_pipeline(write_pipeline_folder(tmp_path_factory.mktemp("p"), "1.5-5b"), dtype=torch.float32)


def test_pipeline_progress_cancel_and_padding(pipe):
    seen = []
    out = pipe.generate("a red fox", frames=9, height=64, width=64, steps=3, seed=1,
                        progress=lambda d, t: seen.append((d, t)), decode_frames=False)
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert out.latents.shape[2] == 3  # 9 frames -> 3 latent frames; the 1.5 pad frame was dropped
    with pytest.raises(CancelledError):
        pipe.generate("a red fox", frames=9, height=64, width=64, steps=3, seed=1, cancel=lambda: True)


def test_pipeline_seed_reproduces_and_snaps(pipe, caplog):
    a = pipe.generate("a red fox", frames=10, height=60, width=64, steps=2, seed=5, decode_frames=False)
    b = pipe.generate("a red fox", frames=9, height=64, width=64, steps=2, seed=5, decode_frames=False)
    assert (a.frames_count, a.height) == (9, 64) and any("frames 10 -> 9" in n for n in a.notes)
    assert torch.equal(a.latents, b.latents)
    c = pipe.generate("a red fox", frames=9, height=64, width=64, steps=2, seed=6, decode_frames=False)
    assert not torch.equal(a.latents, c.latents)


def test_load_pipeline_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        load_pipeline(tmp_path / "missing")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "transformer").mkdir()
    with pytest.raises(CheckpointError, match="missing the vae folder"):
        load_pipeline(tmp_path / "half")
