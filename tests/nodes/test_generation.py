"""The node chains of the workflows, called as plain Python, against the reference pipelines (diffusers) on small
random models: the same seed, prompt and settings must give the same frames (PSNR >= 50 dB on 8-bit frames)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from builders import psnr, reference_pipeline
from cogvx_core.pipeline import CogVideoXPipeline
from nodes import NODE_CLASS_MAPPINGS as N

PROMPT = "a small red fox runs along the river under a stormy sky"
STEPS, SEED = 3, 7


def load(folder: str):
    (model,) = N["CogVXModelLoader"]().load(folder, "fp32")
    (vae,) = N["CogVXVAELoader"]().load(f"{folder}/vae", "fp32")
    (t5,) = N["CogVXT5Loader"]().load(f"{folder}/text_encoder", "fp32")
    return model, vae, t5


def encode(t5, text):
    return N["CogVXTextEncode"]().encode(t5, text)["result"][0]


def sample(model, t5, latent, *, sampler="ddim", dynamic=False, denoise=1.0, image_cond=None, cfg=6.0, seed=SEED):
    (out,) = N["CogVXSampler"]().sample(model, encode(t5, PROMPT), encode(t5, ""), latent, seed, STEPS, cfg, sampler,
                                        dynamic, denoise, image_cond=image_cond)
    return out


def decode(vae, latent):
    (frames,) = N["CogVXDecode"]().decode(vae, latent, "off")
    return (frames.numpy() * 255).round().astype(np.uint8)


def reference(models_root, folder, kind, sampler="ddim", **kwargs):
    pipe = reference_pipeline(models_root / "cogvideox" / folder, kind, sampler)
    out = pipe(prompt=PROMPT, negative_prompt="", num_inference_steps=STEPS, guidance_scale=6.0,
               generator=torch.Generator().manual_seed(SEED), max_sequence_length=12, output_type="np",
               **kwargs).frames[0]
    return (np.asarray(out) * 255).round().astype(np.uint8)


def picture(h, w, seed=0) -> Image.Image:
    g = np.random.default_rng(seed)
    base = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3)) * g.uniform(0.3, 1.0, 3)
    return Image.fromarray(np.clip(base + g.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))


def as_image(*pictures: Image.Image) -> torch.Tensor:
    """ComfyUI IMAGE (N, H, W, 3) in [0, 1], as LoadImage makes it."""
    return torch.from_numpy(np.stack([np.asarray(p) for p in pictures])).float() / 255.0


def test_text_to_video_matches_reference(models):
    model, vae, t5 = load("tiny-5b")
    latent = N["CogVXEmptyLatent"]().make("5b", 9, 64, 48, 1, model=model)["result"][0]
    assert latent["samples"].shape == (1, 16, 3, 6, 8)
    ours = decode(vae, sample(model, t5, latent))
    ref = reference(models, "tiny-5b", "t2v", num_frames=9, height=48, width=64)
    assert ours.shape == ref.shape == (9, 48, 64, 3)
    assert psnr(ours, ref) >= 50
    assert ours.std() > 5  # a picture, not a flat field


def test_image_to_video_with_front_padding_matches_reference(models):
    """1.5-I2V with an odd latent frame count (9 frames -> 3 latents, padded to 4 at the front)."""
    model, vae, t5 = load("tiny-1.5-i2v")
    start = picture(32, 48)
    latent, image_cond = N["CogVXImageToVideo"]().encode(vae, as_image(start), "1.5-5b-i2v", 9, 48, 32, 1,
                                                         model=model)["result"]
    ours = decode(vae, sample(model, t5, latent, image_cond=image_cond))
    ref = reference(models, "tiny-1.5-i2v", "i2v", image=start, num_frames=9, height=32, width=48)
    assert ours.shape == ref.shape == (9, 32, 48, 3)
    assert psnr(ours, ref) >= 50


def test_video_to_video_matches_reference(models):
    model, vae, t5 = load("tiny-5b")
    clip = [picture(48, 64, seed=i) for i in range(9)]
    (latent,) = N["CogVXVideoEncode"]().encode(vae, as_image(*clip), 0, 0, 0)["result"]
    assert latent["samples"].shape == (1, 16, 3, 6, 8) and latent["cogvx_moments"].shape == (1, 32, 3, 6, 8)
    ours = decode(vae, sample(model, t5, latent, denoise=0.8))
    ref = reference(models, "tiny-5b", "v2v", video=clip, strength=0.8, height=48, width=64)
    assert ours.shape == ref.shape == (9, 48, 64, 3)
    assert psnr(ours, ref) >= 50


def test_dpm_with_dynamic_cfg_matches_the_core_pipeline(models):
    model, vae, t5 = load("tiny-5b")
    latent = N["CogVXEmptyLatent"]().make("5b", 5, 48, 32, 1, model=model)["result"][0]
    ours = sample(model, t5, latent, sampler="dpm", dynamic=True)["samples"]
    pipe = CogVideoXPipeline(model.transformer, vae.vae, t5.encoder, model.schedule)
    with torch.no_grad():  # as the reference pipelines and the sampler node run (grad mode picks other kernels)
        core = pipe.generate(PROMPT, "", frames=5, height=32, width=48, steps=STEPS, sampler="dpm", dynamic_cfg=True,
                             seed=SEED, decode_frames=False)
    assert ours.shape == core.latents.shape == (1, 16, 2, 4, 6)
    # Same draws and steps; only the final unscaling differs (x * (1/sf) here, x / sf there): fp32 rounding.
    torch.testing.assert_close(ours, core.latents.float(), rtol=1e-6, atol=1e-6)
    other_seed = sample(model, t5, latent, sampler="dpm", dynamic=True, seed=SEED + 1)["samples"]
    assert (other_seed - ours).abs().max() > 0.1
