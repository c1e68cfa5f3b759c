"""CogVXSampler: the CogVideoX DDIM / DPM sampling loop on a LATENT, with CFG, dynamic CFG, denoise (V2V) and image
conditioning (I2V).

A seed gives the reference pipeline's video: noise comes from a CPU generator seeded with it, drawn in the
reference's layout and order (the VAE posterior samples of the start image or input video first, then the noise).
LATENT in and out is raw VAE space; the model's latent scale is applied here, on the way in and out.
"""

from __future__ import annotations

import logging

import torch

from .core import (
    CacheRun,
    applied_loras,
    apply_loras,
    CogVXError,
    denoise_note,
    fit_context,
    latent_shape,
    pixel_frames,
    prepare_latents,
    run_denoise,
    SAMPLERS,
    to_raw,
)

from . import host, preview

log = logging.getLogger("cogvx")


def _context(conditioning, model, name: str, node_id) -> torch.Tensor:
    """The (B, L, D) text context of a ComfyUI CONDITIONING [[tensor, {...}], ...], fitted to the model's length."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning or not isinstance(conditioning[0], (list, tuple)):
        raise CogVXError(f"{name}: expected CONDITIONING from a text encode node; got {type(conditioning).__name__}.")
    if len(conditioning) > 1:
        host.say(f"{name}: the conditioning has {len(conditioning)} entries (combined or scheduled); CogVideoX takes "
                 "one, so the first is used.", node_id)
    context = conditioning[0][0]
    width = model.transformer.config["text_embed_dim"]
    if not isinstance(context, torch.Tensor) or context.ndim != 3:
        raise CogVXError(f"{name}: the conditioning is not a (batch, tokens, channels) text embedding.")
    if context.shape[-1] != width:
        raise CogVXError(f"{name}: the text embedding has {context.shape[-1]} channels but {model.transformer.name} "
                         f"takes {width} (T5-XXL). Encode the prompt with CogVXTextEncode, or with CLIPTextEncode "
                         "from a T5-XXL text encoder (not CLIP-L/G).")
    return fit_context(context, model.transformer.text_length)


def _batched(context: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    if context.shape[0] == batch:
        return context
    if context.shape[0] == 1:
        return context.expand(batch, -1, -1)
    raise CogVXError(f"{name}: {context.shape[0]} prompts for a latent batch of {batch}; use one prompt, or as many "
                     "as videos.")


def _encoded(latent: dict) -> torch.Tensor:
    """An encoded LATENT for the core: the VAE posterior's moments when the encoder left them (the sampler then draws
    the posterior sample from its own seed, as the reference does), else "samples" as they are (e.g. from ComfyUI's
    own VAE nodes)."""
    moments = latent.get("cogvx_moments")
    return latent["samples"] if moments is None else moments


class CogVXSampler:
    """Samples a CogVideoX video latent."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("COGVX_MODEL",),
                "positive": ("CONDITIONING", {"tooltip": "The prompt (CogVXTextEncode, or CLIPTextEncode with a "
                                                         "T5-XXL text encoder)."}),
                "negative": ("CONDITIONING", {"tooltip": "The negative prompt; the reference uses an empty one."}),
                "latent": ("LATENT", {"tooltip": "The size (CogVXEmptyLatent / CogVXImageToVideo), or an encoded "
                                                 "video to transform with denoise below 1 (CogVXVideoEncode)."}),
                "seed": ("INT", {"default": 42, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": "The same seed gives "
                                 "the reference pipeline's video."}),
                "steps": ("INT", {"default": 50, "min": 1, "max": 1000}),
                "cfg": ("FLOAT", {"default": 6.0, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Guidance scale; 1 or below skips the negative pass."}),
                "sampler": (list(SAMPLERS), {"default": "ddim", "tooltip": "ddim: CogVideoX DDIM (deterministic). "
                                             "dpm: CogVideoX SDE DPM-Solver++(2M) (the 5B default, draws noise every "
                                             "step)."}),
                "dynamic_cfg": ("BOOLEAN", {"default": False, "tooltip": "The reference's cosine guidance schedule "
                                            "(recommended with dpm)."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                      "tooltip": "1: from pure noise. Below 1: video-to-video strength on an "
                                                 "encoded input video."}),
            },
            "optional": {
                "image_cond": ("LATENT", {"tooltip": "The image conditioning of CogVXImageToVideo (I2V models "
                                                     "only)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    CATEGORY = "CogVX/sampling"
    DESCRIPTION = ("CogVideoX sampling (DDIM or DPM, CFG and dynamic CFG) for text-, image- and video-to-video. "
                   "Shows a progress bar, a live preview when previews are on, and stops within a step on Cancel.")

    def sample(self, model, positive, negative, latent, seed, steps, cfg, sampler, dynamic_cfg, denoise=1.0,
               image_cond=None, unique_id=None):
        variant, transformer = model.variant, model.transformer
        samples = latent.get("samples") if isinstance(latent, dict) else None
        if not isinstance(samples, torch.Tensor) or samples.ndim != 5:
            shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else None
            raise CogVXError(f"The latent must be a video latent (B, 16, T, h, w); got {shape}. Make it with "
                             "CogVXEmptyLatent, CogVXImageToVideo or CogVXVideoEncode.")
        b, c, t, h, w = samples.shape
        if c != transformer.out_channels:
            raise CogVXError(f"The latent has {c} channels; CogVideoX latents have {transformer.out_channels}. "
                             "It comes from another model's VAE; encode with the CogVideoX VAE.")
        if h % 2 or w % 2:
            raise CogVXError(f"The latent is {w * 8}x{h * 8} pixels; CogVideoX needs multiples of 16. Make the latent "
                             "with CogVXEmptyLatent, which snaps the size.")
        if variant.i2v and image_cond is None:
            raise CogVXError(f"{transformer.name} is an image-to-video model: connect CogVXImageToVideo's image_cond "
                             "(and its latent), or load a text-to-video model.")
        if not variant.i2v and image_cond is not None:
            raise CogVXError(f"{transformer.name} is a text-to-video model and cannot take image_cond: load an "
                             "image-to-video model (5B-I2V or 1.5-5B-I2V), or disconnect it.")
        video_to_video = denoise < 1.0
        for note in denoise_note(denoise, empty_latent=not bool(samples.any())):
            host.say(note, unique_id)
        if video_to_video and variant.i2v:
            raise CogVXError("denoise below 1 (video-to-video) works with text-to-video models only; set denoise to "
                             "1 for image-to-video.")
        start = end = None
        if image_cond is not None:
            encoded = _encoded(image_cond) if isinstance(image_cond, dict) else None
            if not isinstance(encoded, torch.Tensor) or encoded.ndim != 5:
                raise CogVXError("image_cond must be the image_cond output of CogVXImageToVideo.")
            start, end = encoded[:, :, :1], (encoded[:, :, 1:2] if encoded.shape[2] > 1 else None)

        cond = _batched(_context(positive, model, "positive", unique_id), b, "positive")
        uncond = _batched(_context(negative, model, "negative", unique_id), b, "negative") if cfg > 1 else None
        frames = pixel_frames(t)
        shape, _ = latent_shape(transformer, b, frames, h * 8, w * 8)
        device = model.managed.load(transformer.activation_bytes(shape, guidance=cfg > 1))
        if model.loras or applied_loras(transformer):  # this handle's LoRAs, none left from another handle's run
            apply_loras(transformer, model.loras)
        sf, dtype = model.scaling_factor, transformer.dtype
        generator = torch.Generator("cpu").manual_seed(int(seed))
        prepared = prepare_latents(
            transformer, model.schedule, batch=b, frames=frames, height=h * 8, width=w * 8, steps=steps,
            generator=generator, scaling_factor=sf, invert_scale_latents=model.invert_scale_latents,
            start_image=start, end_image=end, video=_encoded(latent) if video_to_video else None,
            strength=denoise if video_to_video else 1.0, dtype=dtype, device=device)

        bar = host.Progress(len(prepared.timesteps))
        colours = preview.colours(latent, image_cond)
        show = host.previews_enabled()

        def on_step(i, n, x, x0):
            image = preview.latent_to_image(to_raw(x0, prepared.pad, sf), colours) if show else None
            bar.update(i + 1, image)

        passes = CacheRun(model.cache, len(prepared.timesteps))
        with torch.no_grad():
            out = run_denoise(transformer, prepared.latents, cond=cond.to(device, dtype),
                              uncond=None if uncond is None else uncond.to(device, dtype), schedule=model.schedule,
                              timesteps=prepared.timesteps, num_steps=steps, sampler=sampler, guidance=float(cfg),
                              dynamic_cfg=bool(dynamic_cfg), generator=generator,
                              image_latents=prepared.image_latents, callback=on_step, cache_run=passes)
        if model.cache is not None:
            host.say(passes.summary(), unique_id)
        else:
            log.info(passes.summary())
        result = {"samples": to_raw(out, prepared.pad, sf).float().to(host.intermediate_device())}
        if colours is not None:
            result[preview.KEY] = colours
        return (result,)
