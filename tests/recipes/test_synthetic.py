"""Synthetic clips: captions, geometry of the rendered frames, the held-out design, the dataset folder, the CLI."""

import hashlib
import itertools
import json
import math

import numpy as np
import pytest
import torch

from cogvx_core import cli
from cogvx_core.errors import CogVXError
from cogvx_core.recipes import synthetic
from cogvx_core.recipes.synthetic import Clip, Combo, caption, make_dataset, random_clip, render, split
from cogvx_core.video_io import read_frames


def test_captions_have_the_exact_form():
    assert caption(Clip("circle", "red", "left", "black")) == "a red circle moves to the left on a black background"
    assert caption(Clip("square", "white", "up", "blue")) == "a white square moves up on a blue background"
    assert (caption(Clip("triangle", "green", "right", "gray"))
            == "a green triangle moves to the right on a gray background")
    assert caption(Combo("yellow", "circle", "down", "white")) == "a yellow circle moves down on a white background"


@pytest.mark.parametrize("kwargs, words", [
    (dict(colour="blue", background="blue"), ["invisible", "background"]),
    (dict(frames=10), ["4k+1"]),
    (dict(colour="orange"), ["colour", "red, green, blue"]),
    (dict(shape="hexagon"), ["shape", "circle, square, triangle"]),
    (dict(height=8), ["16x16"]),
])
def test_bad_specs_name_the_problem(kwargs, words):
    spec = dict(shape="circle", colour="red", direction="left", background="black") | kwargs
    with pytest.raises(CogVXError) as e:
        Clip(**spec)
    for word in words:
        assert word in str(e.value)


def _random_clips(frames=9, height=64, width=64, seed=0):
    rng = np.random.default_rng(seed)
    return [random_clip(c, rng, frames, height, width) for c in synthetic.all_combos() + synthetic.spare_combos()]


@pytest.mark.parametrize("frames, height, width", [(9, 64, 64), (5, 48, 80), (17, 96, 72)])
def test_shapes_stay_fully_visible_and_move_clearly(frames, height, width):
    for clip in _random_clips(frames, height, width)[::7]:
        video = render(clip)  # (T, H, W, 3)
        assert video.shape == (frames, height, width, 3) and video.dtype == torch.float32
        bg, fg = torch.tensor(synthetic.PALETTE[clip.background]), torch.tensor(synthetic.PALETTE[clip.colour])
        alpha = ((video - bg) @ (fg - bg)) / ((fg - bg) @ (fg - bg))  # (T, H, W) coverage
        # Fully visible: the frame edges are pure background and the covered area is the same in every frame.
        edges = torch.cat([alpha[:, 0], alpha[:, -1], alpha[:, :, 0], alpha[:, :, -1]], dim=1)
        assert edges.abs().max() < 1e-5, caption(clip)
        area = alpha.sum(dim=(1, 2))
        assert (area.max() - area.min()) / area.mean() < 0.015  # supersampling jitter
        # Clear motion: the centroid travels along the caption's direction by at least a fifth of the frame.
        ys, xs = torch.arange(height).float(), torch.arange(width).float()
        cx = (alpha.sum(1) @ xs) / area
        cy = (alpha.sum(2) @ ys) / area
        dx, dy = synthetic.DIRECTION_VECTORS[clip.direction]
        travel = float(((cx[-1] - cx[0]) * dx + (cy[-1] - cy[0]) * dy) / (width if dx else height))
        assert travel > 0.2, caption(clip)
        assert float(abs(cx[-1] - cx[0]) * abs(dy) + abs(cy[-1] - cy[0]) * abs(dx)) < 0.2  # no sideways drift (pixels)


@pytest.mark.parametrize("shape, area_factor", [("circle", math.pi), ("square", 4.0), ("triangle", 2.0)])
def test_antialiased_coverage_has_the_shapes_area(shape, area_factor):
    # Off-grid centre and radius: the supersampled coverage still integrates to the analytic area.
    clip = Clip(shape, "white", "right", "black", speed=0.1, size=0.4, start=(0.41, 0.53), height=80, width=80)
    video = render(clip)[..., 0]  # white on black: coverage = red channel
    radius = 0.4 * 80 / 2
    assert float(video[0].sum()) == pytest.approx(area_factor * radius * radius, rel=0.01)
    # Anti-aliased: edge pixels take intermediate values, and the sub-pixel motion changes them between frames.
    partial = (video > 0.02) & (video < 0.98)
    assert int(partial[0].sum()) > 10
    assert not torch.equal(partial[0], partial[1])


def test_render_is_deterministic_and_exact_at_the_core():
    clip = random_clip(Combo("yellow", "square", "down", "blue"), np.random.default_rng(5))
    video = render(clip)
    assert torch.equal(video, render(clip))
    colours = {tuple(round(v, 4) for v in p) for p in video.reshape(-1, 3).tolist()}
    assert tuple(round(v, 4) for v in synthetic.PALETTE["yellow"]) in colours
    assert tuple(round(v, 4) for v in synthetic.PALETTE["blue"]) in colours


def test_split_holds_out_compositions_only():
    train, heldout = split()
    valid = set(synthetic.all_combos())
    assert set(train) | set(heldout) == valid and not set(train) & set(heldout)
    assert len(heldout) >= 50  # enough distinct prompts for a 50-prompt evaluation
    assert all(c.colour != c.background for c in valid)
    # The documented rule, spelled out independently.
    names = (synthetic.COLOUR_NAMES, synthetic.SHAPES, synthetic.DIRECTIONS, synthetic.BACKGROUND_NAMES)
    for combo in valid:
        assert (combo in heldout) == (sum(n.index(w) for n, w in zip(names, combo)) % 5 == 0)
    # Every word, and every pair of words in two slots, is still seen in training: only the 4-way combination is new.
    for i, j in itertools.combinations(range(4), 2):
        seen = {(c[i], c[j]) for c in train}
        assert all((c[i], c[j]) in seen for c in heldout), (i, j)
    for slot, words in enumerate(names):
        assert {c[slot] for c in train} == set(words)
    # The spare colour is in neither; its own split uses nothing else.
    assert not any(c.colour in synthetic.SPARE_COLOUR_NAMES for c in valid)
    assert {c.colour for c in synthetic.spare_combos()} == set(synthetic.SPARE_COLOUR_NAMES)


def test_dataset_clips_are_seeded_balanced_and_prefix_stable():
    a = synthetic.dataset_clips(40, seed=1)
    assert a == synthetic.dataset_clips(40, seed=1)
    assert a[:15] == synthetic.dataset_clips(15, seed=1)
    assert a != synthetic.dataset_clips(40, seed=2)
    train, heldout = split()
    full = synthetic.dataset_clips(len(heldout), seed=0, split="heldout")
    assert sorted(c.combo for c in full) == sorted(heldout)  # one full round covers every combination once
    assert all(c.combo in set(train) for c in a)
    with pytest.raises(CogVXError, match="split"):
        synthetic.dataset_clips(3, split="test")


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_make_dataset_writes_the_trainer_layout(tmp_path):
    paths = make_dataset(tmp_path / "a", 6, seed=4, frames=5, height=48, width=64, split="heldout")
    assert [p.name for p in paths] == [f"{i:05d}" for i in range(6)]
    records = [json.loads(line) for line in (tmp_path / "a" / "clips.jsonl").read_text().splitlines()]
    heldout = {caption(c) for c in split()[1]}
    for path, record in zip(paths, records):
        text = (tmp_path / "a" / f"{path.name}.txt").read_text().strip()
        assert text == record["caption"] and text in heldout
        frames = read_frames(path)
        clip = Clip(**{k: v for k, v in record.items() if k not in ("name", "caption")})
        assert caption(clip) == text
        assert frames.shape == (5, 48, 64, 3)
        assert (frames - render(clip)).abs().max() <= 0.5 / 255 + 1e-6  # lossless up to 8-bit rounding
    make_dataset(tmp_path / "b", 6, seed=4, frames=5, height=48, width=64, split="heldout")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    # Rewriting a dataset with fewer clips leaves none of the old ones behind; a foreign folder is refused.
    make_dataset(tmp_path / "b", 2, seed=4, frames=5, height=48, width=64, split="heldout")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["00000", "00000.txt", "00001", "00001.txt",
                                                                    "clips.jsonl"]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(CogVXError, match="not empty"):
        make_dataset(tmp_path / "c", 2)


def test_make_dataset_mp4(tmp_path):
    pytest.importorskip("imageio_ffmpeg", reason="mp4 clips need imageio-ffmpeg")
    paths = make_dataset(tmp_path, 2, frames=9, video_format="mp4")
    assert [p.name for p in paths] == ["00000.mp4", "00001.mp4"]
    assert read_frames(paths[0]).shape == (9, 64, 64, 3)
    assert (tmp_path / "00001.txt").is_file()


def test_synth_command(tmp_path, capsys):
    assert cli.main(["synth", "--out", str(tmp_path / "ds"), "--n", "3", "--seed", "7", "--frames", "5",
                     "--height", "32", "--width", "48", "--split", "spare"]) == 0
    captions = sorted(p.read_text().strip() for p in (tmp_path / "ds").glob("*.txt"))
    assert len(captions) == 3 and all(c.startswith("a purple ") for c in captions)
    assert read_frames(tmp_path / "ds" / "00002").shape == (5, 32, 48, 3)
    assert cli.main(["synth", "--out", str(tmp_path / "bad"), "--n", "2", "--frames", "8"]) == 2
    assert "4k+1" in capsys.readouterr().err
