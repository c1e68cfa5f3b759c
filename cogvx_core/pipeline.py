"""Text-, image- and video-to-video generation on top of the transformer, VAE, text encoder and samplers.

Each step follows the reference pipelines (diffusers' CogVideoX, CogVideoXImageToVideo and CogVideoXVideoToVideo)
closely enough that the same seed, prompt and settings give the same video, including the order of random draws:
for image- and video-to-video the VAE posterior sample is drawn before the noise. The pieces are functions so that
hosts (the ComfyUI nodes) can run them one at a time.

Latent conventions: "raw" latents are what the VAE encoder makes; the transformer works on "model" latents, raw
times the scaling factor (1.5-I2V's image latents are raw divided by it, as the model was trained).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .errors import CancelledError, CheckpointError, CogVXError
from .offload import Offload
from .samplers import SAMPLERS, randn_like_reference, sample
from .schedule import NoiseSchedule
from .transformer import CogVideoXTransformer
from .variants import Variant, snap_request

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (done, total)


@dataclass
class Generation:
    """What a run produced: frames (B, T, H, W, 3) in [0, 1], the final raw latents and what was changed."""

    frames: torch.Tensor | None
    latents: torch.Tensor  # raw VAE-space latents (B, 16, T, h, w), padding frames removed
    frames_count: int
    height: int
    width: int
    notes: list[str] = field(default_factory=list)


def scaling(vae, variant: Variant) -> tuple[float, bool]:
    """(scaling factor, invert flag for image latents): from the VAE's config when known, else the variant's."""
    sf = getattr(vae, "scaling_factor", None)
    invert = getattr(vae, "invert_scale_latents", None)
    return (variant.scaling_factor if sf is None else float(sf),
            variant.invert_scale_latents if sf is None or invert is None else bool(invert))


def is_released_size(transformer: CogVideoXTransformer) -> bool:
    ref = transformer.variant.transformer_config()
    return all(transformer.config[k] == ref[k] for k in ("num_layers", "num_attention_heads", "attention_head_dim"))


# ---------------------------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------------------------
def latent_shape(transformer: CogVideoXTransformer, batch: int, frames: int, height: int, width: int
                 ) -> tuple[tuple[int, int, int, int, int], int]:
    """Noise shape (B, 16, T, h, w) and the count of padding latent frames at the front (1.5 wants even T)."""
    lat_t = (frames - 1) // 4 + 1
    pad = (transformer.patch_size_t - lat_t % transformer.patch_size_t) % transformer.patch_size_t
    channels = transformer.config["out_channels"]
    return (batch, channels, lat_t + pad, height // 8, width // 8), pad


def encode_condition(vae, pixels: torch.Tensor, generator: torch.Generator | None, dtype: torch.dtype,
                     progress: Progress | None = None) -> torch.Tensor:
    """Raw latents sampled from the VAE posterior, one batch item at a time (the reference's RNG order).

    pixels: (B, 3, T, H, W) in [-1, 1] -> (B, 16, t, h, w) in `dtype`.
    """
    latents = [vae.encode_posterior(p[None].to(vae.device, vae.dtype), progress=progress).sample(generator)
               for p in pixels]
    return torch.cat(latents).to(dtype)


def image_condition(transformer, vae, image: torch.Tensor, noise_shape, generator, dtype) -> torch.Tensor:
    """I2V conditioning (B, 16, T, h, w): the start image's latent at frame 0 (model scale), zeros after it.

    image: (B, 3, H, W) in [-1, 1]. The posterior sample consumes the generator before the noise is drawn.
    """
    sf, invert = scaling(vae, transformer.variant)
    raw = encode_condition(vae, image[:, :, None], generator, dtype)  # (B, 16, 1, h, w)
    first = 1 / sf * raw if invert else sf * raw  # written as the reference computes it
    b, c, t, h, w = noise_shape
    cond = torch.cat([first, first.new_zeros(b, c, t - 1, h, w)], dim=2)
    return cond


def denoise(transformer: CogVideoXTransformer, latents: torch.Tensor, *, cond: torch.Tensor,
            uncond: torch.Tensor | None, schedule: NoiseSchedule, timesteps, num_steps: int, sampler: str = "ddim",
            guidance: float = 6.0, dynamic_cfg: bool = False, generator: torch.Generator | None = None,
            image_latents: torch.Tensor | None = None, ofs: float | None = 2.0,
            callback: Callable | None = None) -> torch.Tensor:
    """The sampling loop on model-scale latents (B, 16, T, h, w): CFG batches are [uncond, cond] as the reference's."""
    if sampler not in SAMPLERS:
        raise CogVXError(f"Unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}.")
    ofs_t = (torch.full((1,), float(ofs), device=latents.device, dtype=latents.dtype)
             if transformer.ofs_embedding is not None and ofs is not None else None)

    def predict(x: torch.Tensor, t: int, do_cfg: bool):
        if do_cfg and uncond is None:
            raise CogVXError("Guidance above 1 needs a negative (unconditional) prompt embedding.")
        context = torch.cat([uncond, cond]) if do_cfg else cond
        x_in = torch.cat([x, x]) if do_cfg else x
        if image_latents is not None:
            img = torch.cat([image_latents, image_latents]) if do_cfg else image_latents
            x_in = torch.cat([x_in, img], dim=1)  # noise channels first
        ts = torch.full((x_in.shape[0],), t, device=x.device, dtype=torch.long)
        v = transformer(x_in, ts, context, ofs_t)
        if do_cfg:
            v_uncond, v_cond = v.chunk(2)
            return v_cond, v_uncond
        return v, None

    return sample(predict, latents, schedule=schedule, timesteps=timesteps, sampler=sampler, guidance=guidance,
                  dynamic_cfg=dynamic_cfg, generator=generator, callback=callback, num_steps=num_steps)


def decode(vae, latents: torch.Tensor, variant: Variant, *, tiled: bool | None = None,
           progress: Progress | None = None, **tile_args) -> torch.Tensor:
    """Model-scale latents (B, 16, T, h, w) -> frames (B, T', H, W, 3) in [0, 1]."""
    sf, _ = scaling(vae, variant)
    z = (1 / sf * latents).to(vae.device, vae.dtype)
    pixels = vae.decode(z, tiled=bool(tiled), progress=progress, **tile_args)  # (B, 3, T, H, W) in [-1, 1]
    return (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1).float()


# ---------------------------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------------------------
class CogVideoXPipeline:
    """transformer + VAE (+ text encoder, schedule): generate(prompt, ...) -> Generation."""

    def __init__(self, transformer: CogVideoXTransformer, vae, text_encoder=None, schedule: NoiseSchedule | None = None,
                 offload: Offload | None = None):
        self.transformer, self.vae, self.text_encoder = transformer, vae, text_encoder
        self.schedule = schedule or NoiseSchedule.for_variant(transformer.variant)
        self.offload = offload or Offload()  # where each model runs; mode none: where it was loaded

    @property
    def variant(self) -> Variant:
        return self.transformer.variant

    @property
    def device(self) -> torch.device:
        """The compute device (the models may wait on the CPU between stages when offloaded)."""
        if self.offload.mode != "none" and self.offload.device is not None:
            return self.offload.device
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def encode_prompt(self, prompt: str | list[str], negative_prompt: str | list[str] = "",
                      batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.text_encoder is None:
            raise CogVXError("This pipeline has no text encoder: load one, or pass prompt embeddings.")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        with self.offload.stage(self.text_encoder.model, device=self.offload.text_device):
            cond = self.text_encoder.encode(prompts, dtype=self.dtype, device=self.device)
            uncond = self.text_encoder.encode(negatives, dtype=self.dtype, device=self.device)
        return cond, uncond

    @torch.no_grad()  # inference kernels, as the reference's __call__; no activations kept
    def generate(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] = "", *,
                 cond: torch.Tensor | None = None, uncond: torch.Tensor | None = None,
                 image: torch.Tensor | None = None, video: torch.Tensor | None = None, strength: float = 0.8,
                 frames: int | None = None, height: int | None = None, width: int | None = None,
                 steps: int = 50, guidance: float = 6.0, dynamic_cfg: bool = False, sampler: str = "ddim",
                 seed: int | None = None, generator: torch.Generator | None = None,
                 progress: Progress | None = None, cancel: Callable[[], bool] | None = None,
                 decode_frames: bool = True, **tile_args) -> Generation:
        """image: (B, 3, H, W) in [-1, 1] at (height, width); video: (B, 3, T, H, W) in [-1, 1] for V2V."""
        variant, transformer = self.variant, self.transformer
        if video is not None and image is not None:
            raise CogVXError("Give either a start image (image-to-video) or a video (video-to-video), not both.")
        if video is not None and variant.i2v:
            raise CogVXError(f"{variant.title} is an image-to-video model; video-to-video needs a text-to-video model.")
        if not 0 < strength <= 1:
            raise CogVXError(f"strength must be in (0, 1], got {strength}.")
        if steps < 1:
            raise CogVXError(f"steps must be at least 1, got {steps}.")
        if video is not None:
            frames, height, width = video.shape[2], video.shape[3], video.shape[4]
        elif image is not None:
            height, width = height or image.shape[-2], width or image.shape[-1]
        frames, height, width = frames or variant.frames, height or variant.height, width or variant.width
        new_f, new_h, new_w, notes = snap_request(variant, frames, height, width, has_image=image is not None,
                                                  released=is_released_size(transformer))
        if video is not None and (new_f, new_h, new_w) != (frames, height, width):
            raise CogVXError(f"The input video has {frames} frames of {width}x{height}; video-to-video needs 4k+1 "
                             "frames and sizes that are multiples of 16. Trim or resize the video first.")
        if image is not None and (new_h, new_w) != tuple(image.shape[-2:]):
            raise CogVXError(f"The start image is {image.shape[-1]}x{image.shape[-2]} but this run is "
                             f"{new_w}x{new_h}; resize it first (the CLI and nodes do this for you).")
        frames, height, width = new_f, new_h, new_w
        for note in notes:
            log.warning(note)

        if cond is None:
            if prompt is None:
                raise CogVXError("Give a prompt (or prompt embeddings).")
            cond, uncond = self.encode_prompt(prompt, negative_prompt)
        batch = cond.shape[0]
        if generator is None:
            generator = torch.Generator("cpu")
            if seed is not None:
                generator.manual_seed(int(seed))
            else:
                generator.seed()
        dtype, device = self.dtype, self.device
        cond = cond.to(device, dtype)
        uncond = None if uncond is None else uncond.to(device, dtype)

        shape, pad = latent_shape(transformer, batch, frames, height, width)
        timesteps = self.schedule.timesteps(steps)
        image_latents = None
        if video is not None:
            if pad:
                raise CogVXError(f"{variant.title} needs an even latent frame count for video-to-video; use "
                                 f"{frames - 4} or {frames + 4} frames.")
            timesteps = self.schedule.strength_timesteps(timesteps, strength)
            sf, _ = scaling(self.vae, variant)
            with self.offload.stage(self.vae):
                init = sf * encode_condition(self.vae, video, generator, dtype).to(device)
            noise = randn_like_reference(shape, generator, dtype, device)
            latents = self.schedule.add_noise(init, noise, int(timesteps[0]))
        else:
            if image is not None:
                with self.offload.stage(self.vae):
                    image_latents = image_condition(transformer, self.vae, image, shape, generator, dtype).to(device)
            latents = randn_like_reference(shape, generator, dtype, device)

        def on_step(i, n, x, x0):
            if progress is not None:
                progress(i + 1, n)
            if cancel is not None and cancel():
                raise CancelledError("generation cancelled")

        with self.offload.stage(transformer, transformer=True):
            latents = denoise(transformer, latents, cond=cond, uncond=uncond, schedule=self.schedule,
                              timesteps=timesteps, num_steps=steps, sampler=sampler, guidance=guidance,
                              dynamic_cfg=dynamic_cfg, generator=generator, image_latents=image_latents,
                              callback=on_step)
        latents = latents[:, :, pad:]
        frames_out = None
        if decode_frames:
            with self.offload.stage(self.vae):
                frames_out = decode(self.vae, latents, variant, **tile_args)
        sf, _ = scaling(self.vae, variant)
        return Generation(frames_out, latents / sf, frames, height, width, notes)


def load_pipeline(path: str | Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                  offload: Offload | None = None, text_weight_dtype: torch.dtype | None = None,
                  **transformer_kwargs) -> CogVideoXPipeline:
    """A whole diffusers-format model folder (model_index.json, transformer/, vae/, text_encoder/, tokenizer/,
    scheduler/), as the released models are downloaded.

    offload: with a mode other than none the models are loaded to the CPU and run on `offload.device` (default
    `device`); `text_weight_dtype` (fp8) stores T5's big weights in fp8. Extra keywords go to `load_transformer`
    (`weight_dtype`, `attention`, `operations`)."""
    from .checkpoints.io import read_json
    from .checkpoints.transformer import load_transformer
    from .checkpoints.vae import load_vae
    from .text import load_text_encoder

    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a folder. load_pipeline needs a diffusers-format model folder "
                              "(model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/).")
    missing = [d for d in ("transformer", "vae") if not (root / d).is_dir()]
    if missing:
        raise CheckpointError(f"{root}: missing the {' and '.join(missing)} folder(s); this is not a complete "
                              "diffusers-format CogVideoX folder. Download it again.")
    offload = offload or Offload()
    if offload.mode != "none":
        offload.device = torch.device(offload.device or device or "cpu")
        device = "cpu"  # each model goes to offload.device only while it runs
    text_device = offload.text_device if offload.text_device is not None and offload.mode == "none" else device
    operations = transformer_kwargs.get("operations")
    transformer = load_transformer(root / "transformer", dtype=dtype, device=device, **transformer_kwargs)
    dtype = transformer.dtype
    vae = load_vae(root / "vae", dtype=dtype, device=device, operations=operations)
    text_encoder = None
    if (root / "text_encoder").is_dir():
        text_encoder = load_text_encoder(root, dtype=dtype, device=text_device, operations=operations,
                                         max_length=transformer.config["max_text_seq_length"],
                                         weight_dtype=text_weight_dtype)
    schedule = None
    if (root / "scheduler" / "scheduler_config.json").is_file():
        schedule = NoiseSchedule.from_config(read_json(root / "scheduler" / "scheduler_config.json", "scheduler"))
    return CogVideoXPipeline(transformer, vae, text_encoder, schedule, offload)
