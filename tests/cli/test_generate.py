"""`cogvx generate` against the reference pipelines (diffusers) on small random models saved as diffusers folders.

Same seed, prompt and settings must give the same frames: PSNR of at least 50 dB on the written 8-bit frames.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from builders import psnr, reference_pipeline, write_pipeline_folder
from cogvx_core.cli import main

pytestmark = pytest.mark.slow  # diffusers runs beside every CLI run (CI runs them; the quick set does not)

PROMPT = "a small red fox runs along the river under a stormy sky"
STEPS, FRAMES, SEED = 4, 9, 7


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = write_pipeline_folder(tmp_path_factory.mktemp(variant), variant)
        return cache[variant]

    return get


def _ours(tmp_path, folder, *extra):
    out = tmp_path / f"frames{len(list(tmp_path.glob('frames*')))}"  # a new folder per run (frames never mix)
    rc = main(["generate", "--model", str(folder), "--prompt", PROMPT, "--steps", str(STEPS), "--frames", str(FRAMES),
               "--seed", str(SEED), "--dtype", "float32", "--device", "cpu", "--out", str(out), *extra])
    assert rc == 0
    return np.stack([np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))])


def _reference(folder, kind, sampler="ddim", **kwargs):
    pipe = reference_pipeline(folder, kind, sampler)
    out = pipe(prompt=PROMPT, negative_prompt="", num_inference_steps=STEPS, guidance_scale=6.0,
               generator=torch.Generator().manual_seed(SEED), max_sequence_length=12, output_type="np",
               **({"num_frames": FRAMES} if kind != "v2v" else {}), **kwargs).frames[0]
    return (np.asarray(out) * 255).round().astype(np.uint8)


CASES = {  # name: (variant, kind, our extra args, reference kwargs)
    "t2v-ddim-5b": ("5b", "t2v", ["--height", "96", "--width", "160"], dict(height=96, width=160)),
    "t2v-dpm-dynamic-cfg": ("5b", "t2v", ["--height", "96", "--width", "160", "--sampler", "dpm", "--dynamic-cfg"],
                            dict(height=96, width=160, use_dynamic_cfg=True)),
    "t2v-2b": ("2b", "t2v", ["--height", "96", "--width", "128"], dict(height=96, width=128)),
    "t2v-1.5-padded": ("1.5-5b", "t2v", ["--height", "96", "--width", "128"], dict(height=96, width=128)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_text_to_video_matches_reference(tmp_path, folders, case):
    variant, kind, extra, ref_kwargs = CASES[case]
    folder = folders(variant)
    sampler = "dpm" if "--sampler" in extra else "ddim"
    ours = _ours(tmp_path, folder, *extra)
    ref = _reference(folder, kind, sampler, **ref_kwargs)
    assert ours.shape == ref.shape == (FRAMES, ref_kwargs["height"], ref_kwargs["width"], 3)
    print(f"PSNR {psnr(ours, ref):.1f} dB")
    assert psnr(ours, ref) >= 50
    assert ours.std() > 5  # a real picture, not a flat field


def _image(h, w, seed=0):
    g = np.random.default_rng(seed)
    base = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3)) * g.uniform(0.3, 1.0, 3)
    return Image.fromarray(np.clip(base + g.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))


@pytest.mark.slow
@pytest.mark.parametrize("variant,h,w", [("5b-i2v", 128, 192), ("1.5-5b-i2v", 96, 128)])
def test_image_to_video_matches_reference(tmp_path, folders, variant, h, w):
    folder = folders(variant)
    img = _image(h, w)
    img.save(tmp_path / "start.png")
    ours = _ours(tmp_path, folder, "--image", str(tmp_path / "start.png"), "--height", str(h), "--width", str(w))
    ref = _reference(folder, "i2v", image=img, height=h, width=w)
    assert ours.shape == ref.shape
    print(f"PSNR {psnr(ours, ref):.1f} dB")
    assert psnr(ours, ref) >= 50


def test_video_to_video_matches_reference(tmp_path, folders):
    folder = folders("5b")
    frames = [_image(96, 128, seed=i) for i in range(FRAMES)]
    (tmp_path / "in").mkdir()
    for i, f in enumerate(frames):
        f.save(tmp_path / "in" / f"{i:03d}.png")
    ours = _ours(tmp_path, folder, "--video", str(tmp_path / "in"), "--strength", "0.6")
    ref = _reference(folder, "v2v", video=frames, strength=0.6, height=96, width=128)
    assert ours.shape == ref.shape
    print(f"PSNR {psnr(ours, ref):.1f} dB")
    assert psnr(ours, ref) >= 50


def test_bad_arguments_exit_with_one_line(tmp_path, folders, capsys):
    folder = folders("5b")
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such folder" in err[0]
    img = tmp_path / "i.png"
    _image(96, 128).save(img)
    assert main(["generate", "--model", str(folder), "--prompt", "x", "--image", str(img), "--steps", "1",
                 "--out", str(tmp_path / "o")]) == 2
    assert "text-to-video model and cannot take a start image" in capsys.readouterr().err


@pytest.mark.slow
def test_lora_flag_matches_reference_load_lora_weights(tmp_path, folders):
    """`--lora FILE:0.7` equals diffusers' load_lora_weights + set_adapters(0.7) on the same pipeline."""
    from cogvx_core import load_transformer
    from cogvx_core.lora import add_trainable_lora, save_lora

    folder = folders("5b")
    model = load_transformer(folder / "transformer")
    params = add_trainable_lora(model, rank=4, alpha=8, generator=torch.Generator().manual_seed(3), init="gaussian")
    with torch.no_grad():
        for p in params:  # both factors non-zero so the LoRA changes the video
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    lora = save_lora(tmp_path / "style.safetensors", model, rank=4, alpha=8, variant="5b")

    ours = _ours(tmp_path, folder, "--height", "96", "--width", "160", "--lora", f"{lora}:0.7")
    base = _ours(tmp_path, folder, "--height", "96", "--width", "160")
    pipe = reference_pipeline(folder, "t2v")
    pipe.load_lora_weights(str(lora), adapter_name="style")
    pipe.set_adapters(["style"], [0.7])
    ref = pipe(prompt=PROMPT, negative_prompt="", num_inference_steps=STEPS, guidance_scale=6.0, num_frames=FRAMES,
               height=96, width=160, generator=torch.Generator().manual_seed(SEED), max_sequence_length=12,
               output_type="np").frames[0]
    ref = (np.asarray(ref) * 255).round().astype(np.uint8)
    assert psnr(base, ref) < 40  # the LoRA really changes the frames
    assert psnr(ours, ref) >= 50
