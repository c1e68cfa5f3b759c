"""The node graph and the CLI run the same generation path: from the same seed, prompt, settings and input files they
must give bit-identical frames (T2V, I2V with and without an end image, V2V, 1.5 with its front padding, DDIM and the
DPM sampler that draws noise every step), so the two can never drift apart again."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from builders import write_pipeline_folder
from cogvx_core.cli import main
from cogvx_core.video_io import to_uint8
from nodes import NODE_CLASS_MAPPINGS as N

PROMPT = "a small red fox runs along the river under a stormy sky"
NEGATIVE = "blurry"
STEPS, SEED, CFG = 3, 11, 6.0


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("one_path_models")
    for name, variant, seed in [("m-5b", "5b", 0), ("m-1.5", "1.5-5b", 1), ("m-1.5-i2v", "1.5-5b-i2v", 2),
                                ("m-5b-i2v", "5b-i2v", 3)]:
        write_pipeline_folder(root / "cogvideox" / name, variant, seed=seed)
    return root


@pytest.fixture
def models(models_dir, monkeypatch):
    monkeypatch.setenv("COGVX_MODELS_DIR", str(models_dir))
    return models_dir


def picture(h: int, w: int, seed: int) -> Image.Image:
    g = np.random.default_rng(seed)
    base = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3)) * g.uniform(0.3, 1.0, 3)
    return Image.fromarray(np.clip(base + g.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))


def as_image(*pictures: Image.Image) -> torch.Tensor:
    """ComfyUI IMAGE (N, H, W, 3) in [0, 1], as LoadImage makes it from the same files."""
    return torch.from_numpy(np.stack([np.asarray(p) for p in pictures])).float() / 255.0


def cli_frames(tmp_path, folder, *extra) -> np.ndarray:
    out = tmp_path / "cli"
    rc = main(["generate", "--model", str(folder), "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--steps",
               str(STEPS), "--guidance", str(CFG), "--seed", str(SEED), "--dtype", "float32", "--device", "cpu",
               "--out", str(out), *extra])
    assert rc == 0
    return np.stack([np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))])  # (T, H, W, 3) uint8


def node_frames(name: str, latent: dict, *, sampler: str, dynamic: bool = False, denoise: float = 1.0,
                image_cond=None, vae=None) -> np.ndarray:
    (model,) = N["CogVXModelLoader"]().load(name, "fp32")
    (t5,) = N["CogVXT5Loader"]().load(f"{name}/text_encoder", "fp32")
    vae = vae or N["CogVXVAELoader"]().load(f"{name}/vae", "fp32")[0]
    encode = N["CogVXTextEncode"]().encode
    positive, negative = encode(t5, PROMPT)["result"][0], encode(t5, NEGATIVE)["result"][0]
    (samples,) = N["CogVXSampler"]().sample(model, positive, negative, latent, SEED, STEPS, CFG, sampler, dynamic,
                                            denoise, image_cond=image_cond)
    (frames,) = N["CogVXDecode"]().decode(vae, samples, "off")
    return to_uint8(frames)


def empty(name: str, variant: str, frames: int, width: int, height: int) -> dict:
    (model,) = N["CogVXModelLoader"]().load(name, "fp32")
    return N["CogVXEmptyLatent"]().make(variant, frames, width, height, 1, model=model)["result"][0]


@pytest.mark.parametrize("name,variant,sampler", [("m-5b", "5b", "ddim"), ("m-5b", "5b", "dpm"),
                                                  ("m-1.5", "1.5-5b", "dpm")])
def test_text_to_video(models, tmp_path, name, variant, sampler):
    extra = ["--sampler", sampler, "--frames", "9", "--width", "64", "--height", "48"]
    ours = node_frames(name, empty(name, variant, 9, 64, 48), sampler=sampler, dynamic=sampler == "dpm")
    cli = cli_frames(tmp_path, models / "cogvideox" / name, *extra, *(["--dynamic-cfg"] if sampler == "dpm" else []))
    assert cli.shape == ours.shape == (9, 48, 64, 3)
    assert np.array_equal(cli, ours)


@pytest.mark.parametrize("name,variant,end", [("m-1.5-i2v", "1.5-5b-i2v", False), ("m-1.5-i2v", "1.5-5b-i2v", True),
                                              ("m-5b-i2v", "5b-i2v", True)])
def test_image_to_video_with_and_without_an_end_image(models, tmp_path, name, variant, end):
    """1.5-I2V at 9 frames: 3 latent frames padded to 4 at the front; the end image lands on the last one."""
    (model,) = N["CogVXModelLoader"]().load(name, "fp32")
    (vae,) = N["CogVXVAELoader"]().load(f"{name}/vae", "fp32")
    width, height = (48, 32) if variant == "1.5-5b-i2v" else (model.transformer.config["sample_width"] * 8,
                                                               model.transformer.config["sample_height"] * 8)
    start, finish = picture(40, 56, seed=1), picture(40, 56, seed=2)
    start.save(tmp_path / "start.png")
    finish.save(tmp_path / "end.png")
    images = dict(end_image=as_image(finish)) if end else {}
    latent, image_cond = N["CogVXImageToVideo"]().encode(vae, as_image(start), variant, 9, width, height, 1,
                                                         model=model, **images)["result"]
    ours = node_frames(name, latent, sampler="ddim", image_cond=image_cond, vae=vae)
    cli = cli_frames(tmp_path, models / "cogvideox" / name, "--image", str(tmp_path / "start.png"), "--frames", "9",
                     "--width", str(width), "--height", str(height),
                     *(["--end-image", str(tmp_path / "end.png")] if end else []))
    assert cli.shape == ours.shape == (9, height, width, 3)
    assert np.array_equal(cli, ours)


def test_the_end_image_changes_the_video(models, tmp_path):
    folder = models / "cogvideox" / "m-1.5-i2v"
    picture(32, 48, seed=1).save(tmp_path / "start.png")
    picture(32, 48, seed=2).save(tmp_path / "end.png")
    common = ["--image", str(tmp_path / "start.png"), "--frames", "9", "--width", "48", "--height", "32"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    without = cli_frames(tmp_path / "a", folder, *common)
    with_end = cli_frames(tmp_path / "b", folder, *common, "--end-image", str(tmp_path / "end.png"))
    assert not np.array_equal(without, with_end)
    assert np.abs(without[-1].astype(int) - with_end[-1].astype(int)).mean() > 1  # the end is where it acts


def test_end_image_needs_a_start_image(models, tmp_path, capsys):
    picture(32, 48, seed=2).save(tmp_path / "end.png")
    rc = main(["generate", "--model", str(models / "cogvideox" / "m-1.5-i2v"), "--prompt", PROMPT, "--end-image",
               str(tmp_path / "end.png"), "--out", str(tmp_path / "x")])
    assert rc == 2 and "--end-image needs --image" in capsys.readouterr().err


def test_video_to_video(models, tmp_path):
    clip = [picture(40, 56, seed=10 + i) for i in range(11)]  # 11 frames of 56x40: cut to 9, resized to 64x48
    (tmp_path / "clip").mkdir()
    for i, frame in enumerate(clip):
        frame.save(tmp_path / "clip" / f"{i:03d}.png")
    (vae,) = N["CogVXVAELoader"]().load("m-5b/vae", "fp32")
    (latent,) = N["CogVXVideoEncode"]().encode(vae, as_image(*clip), 0, 64, 48)["result"]
    ours = node_frames("m-5b", latent, sampler="dpm", denoise=0.7, vae=vae)
    cli = cli_frames(tmp_path, models / "cogvideox" / "m-5b", "--video", str(tmp_path / "clip"), "--strength", "0.7",
                     "--width", "64", "--height", "48", "--sampler", "dpm")
    assert cli.shape == ours.shape == (9, 48, 64, 3)
    assert np.array_equal(cli, ours)
