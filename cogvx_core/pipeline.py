"""Text-, image- and video-to-video generation on top of the transformer, VAE, text encoder and samplers.

Each step follows the reference pipelines (diffusers' CogVideoX, CogVideoXImageToVideo and CogVideoXVideoToVideo)
closely enough that the same seed, prompt and settings give the same video, including the order of random draws:
for image- and video-to-video the VAE posterior sample is drawn before the noise. The steps are public functions so
that hosts (the ComfyUI nodes) run exactly the same ones, one node at a time:

    encode_moments (VAE)  ->  prepare_latents (every random draw)  ->  denoise  ->  to_raw  ->  decode

Latent conventions: "raw" latents are what the VAE encoder makes; the transformer works on "model" latents, raw
times the scaling factor (1.5-I2V's image latents are raw divided by it, as the model was trained). Encoded images
and videos travel as the encoder's posterior moments (B, 2C, t, h, w) so that the sample is drawn from the run's own
generator, at the reference's place in the order.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .cache import CacheRun, StepCache, attached
from .checks import check_generate_inputs
from .errors import CancelledError, CheckpointError, CogVXError
from .noise import randn_like_reference
from .offload import Offload
from .parallel import cfg as cfg_parallel
from .parallel.groups import ParallelGroups
from .parallel.sequence import sequence_parallel
from .parallel.vae_split import decode_split
from .samplers import SAMPLERS, sample
from .schedule import NoiseSchedule
from .transformer import CogVideoXTransformer
from .vae import DiagonalGaussian, Tiling
from .variants import Variant, latent_frames, pixel_frames, snap_request
from .video_io import model_output_to_frames

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (done, total)
# on_step(step_index, num_steps, latents, x0): model-scale latents (B, C, T + pad, h, w); may raise to cancel
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


@dataclass
class Generation:
    """What a run produced: frames (B, T, H, W, 3) in [0, 1], the final raw latents and what was changed."""

    frames: torch.Tensor | None
    latents: torch.Tensor  # raw VAE-space latents (B, 16, T, h, w), padding frames removed
    frames_count: int
    height: int
    width: int
    notes: list[str] = field(default_factory=list)
    passes: CacheRun | None = None  # transformer passes computed and skipped (passes.summary())


@dataclass
class PreparedLatents:
    """Where sampling starts: every random draw of a run but the sampler's own, made in the reference's order."""

    latents: torch.Tensor  # (B, C, T + pad, h, w) model scale: pure noise, or the noised input video
    image_latents: torch.Tensor | None  # (B, C, T + pad, h, w) model-scale image conditioning (I2V), else None
    timesteps: torch.Tensor  # the steps to run (the last ones only, for video-to-video)
    pad: int  # latent frames padded at the front (1.5 patches pairs of frames); to_raw drops them


def scaling(vae, variant: Variant) -> tuple[float, bool]:
    """(scaling factor, invert flag for image latents): from the VAE's config when known, else the variant's."""
    sf = getattr(vae, "scaling_factor", None)
    invert = getattr(vae, "invert_scale_latents", None)
    return (variant.scaling_factor if sf is None else float(sf),
            variant.invert_scale_latents if sf is None or invert is None else bool(invert))


# ---------------------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------------------
def latent_shape(transformer: CogVideoXTransformer, batch: int, frames: int, height: int, width: int
                 ) -> tuple[tuple[int, int, int, int, int], int]:
    """Noise shape (B, C, T + pad, h, w) for `frames` pixel frames of height x width, and the count of padding latent
    frames at the front (1.5 patches two latent frames together, so it wants an even count)."""
    lat_t = latent_frames(frames)
    pad = (transformer.patch_size_t - lat_t % transformer.patch_size_t) % transformer.patch_size_t
    return (batch, transformer.out_channels, lat_t + pad, height // 8, width // 8), pad


def encode_moments(vae, pixels: torch.Tensor, *, tiling: Tiling | None = None,
                   progress: Progress | None = None) -> torch.Tensor:
    """The VAE posterior's moments (B, 2C, t, h, w) of pixels (B, 3, T, H, W) in [-1, 1], one video at a time as the
    reference encodes them. No random draw: prepare_latents samples them."""
    return torch.cat([vae.encode_posterior(p[None].to(vae.device, vae.dtype), tiling=tiling,
                                           progress=progress).parameters for p in pixels])


def posterior_sample(encoded: torch.Tensor, generator: torch.Generator | None, latent_channels: int,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Raw latents (B, C, t, h, w) of an encoded image or video, on `device`.

    Posterior moments (B, 2C, t, h, w) are sampled one batch item at a time from `generator` (the reference's order);
    latents without moments (B, C, t, h, w), e.g. from another pack's VAE node, are taken as they are.
    """
    encoded = encoded.to(device) if device is not None else encoded
    if encoded.shape[1] == latent_channels:
        return encoded
    if encoded.shape[1] != 2 * latent_channels:
        raise CogVXError(f"An encoded image or video has {encoded.shape[1]} channels; CogVideoX latents have "
                         f"{latent_channels} (posterior moments {2 * latent_channels}). Encode it with the CogVideoX VAE.")
    return torch.cat([DiagonalGaussian(m[None]).sample(generator) for m in encoded])


def _check_encoded(what: str, encoded: torch.Tensor, shape: tuple[int, ...]) -> None:
    b, _, _, h, w = shape
    if encoded.ndim != 5 or tuple(encoded.shape[-2:]) != (h, w):
        got = tuple(encoded.shape)
        raise CogVXError(f"The {what} is encoded as {got} but the video's latents are {w}x{h} cells "
                         f"({w * 8}x{h * 8} pixels): encode it at the video's size.")
    if encoded.shape[0] not in (1, b):
        raise CogVXError(f"The {what} has {encoded.shape[0]} items for {b} videos; give one, or one per video.")


def prepare_latents(transformer: CogVideoXTransformer, schedule: NoiseSchedule, *, batch: int, frames: int,
                    height: int, width: int, steps: int, generator: torch.Generator | None,
                    scaling_factor: float, invert_scale_latents: bool = False,
                    start_image: torch.Tensor | None = None, end_image: torch.Tensor | None = None,
                    video: torch.Tensor | None = None, strength: float = 1.0,
                    dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> PreparedLatents:
    """Initial latents, image conditioning and timesteps of a run: the one place the reference's draw order lives.

    frames, height, width: the run's pixel size, valid for the model (see variants.snap_request).
    start_image, end_image: encoded images (B or 1, 2C or C, 1, h, w) for image-to-video (the end image is this
    project's addition: the last latent frame, for interpolation). video: an encoded video (B, 2C or C, t, h, w) for
    video-to-video, noised to `strength` (1: pure noise, as text-to-video).
    Draws: the start image's posterior samples, then the end image's, or the video's, then the noise.
    """
    variant = transformer.variant
    dtype = dtype or transformer.dtype
    device = torch.device(device) if device is not None else transformer.device
    channels = transformer.out_channels
    if steps < 1:
        raise CogVXError(f"steps must be at least 1, got {steps}.")
    if not 0 < strength <= 1:
        raise CogVXError(f"strength (denoise) must be in (0, 1], got {strength}.")
    if video is not None and (start_image is not None or end_image is not None):
        raise CogVXError("Give either a start image (image-to-video) or a video (video-to-video), not both.")
    if video is not None and variant.i2v:
        raise CogVXError(f"{transformer.name} is an image-to-video model; video-to-video needs a text-to-video model.")
    if variant.i2v and start_image is None:
        raise CogVXError(f"{transformer.name} is an image-to-video model: give it a start image, or load a "
                         "text-to-video model.")
    if not variant.i2v and (start_image is not None or end_image is not None):
        raise CogVXError(f"{transformer.name} is a text-to-video model and cannot take a start or end image: load an "
                         "image-to-video model (5B-I2V or 1.5-5B-I2V), or remove the image.")

    shape, pad = latent_shape(transformer, batch, frames, height, width)
    timesteps = schedule.timesteps(steps)
    image_latents = None
    if video is not None:
        _check_encoded("input video", video, shape)
        if video.shape[2] != shape[2] - pad:
            raise CogVXError(f"The input video has {pixel_frames(video.shape[2])} frames but the run has {frames}.")
        if pad:
            raise CogVXError(f"{transformer.name} needs an even latent frame count for video-to-video; this video has "
                             f"{shape[2] - pad} latent frames ({frames} pixel frames): use {frames - 4} or "
                             f"{frames + 4} frames.")
        timesteps = schedule.strength_timesteps(timesteps, strength)
        init = scaling_factor * posterior_sample(video, generator, channels, device).to(device, dtype)
        noise = randn_like_reference(shape, generator, dtype, device)
        latents = schedule.add_noise(init, noise, int(timesteps[0]))
    else:
        if start_image is not None:
            image_latents = _image_latents(start_image, end_image, shape, pad, generator, scaling_factor,
                                           invert_scale_latents, dtype, device)
        latents = randn_like_reference(shape, generator, dtype, device)
    return PreparedLatents(latents, image_latents, timesteps, pad)


def _image_latents(start: torch.Tensor, end: torch.Tensor | None, shape, pad: int, generator, sf: float,
                   invert: bool, dtype, device) -> torch.Tensor:
    """Model-scale I2V conditioning (B, C, T + pad, h, w): the start image's latent at frame 0 of the padded sequence
    (the reference's 1.5 front padding adds a noise frame, not an image frame), the end image's at the last frame,
    zeros between."""
    b, c, t_padded, h, w = shape
    cond = torch.zeros(shape, device=device, dtype=dtype)
    for what, encoded, frame in (("start image", start, 0), ("end image", end, t_padded - 1)):
        if encoded is None:
            continue
        _check_encoded(what, encoded, shape)
        if what == "end image" and t_padded - pad < 2:
            raise CogVXError("An end image needs at least 5 frames (two latent frames).")
        raw = posterior_sample(encoded, generator, c, device).to(dtype)  # (B or 1, C, 1, h, w)
        scaled = 1 / sf * raw if invert else sf * raw  # written as the reference computes it
        cond[:, :, frame:frame + 1] = scaled.expand(b, -1, -1, -1, -1)
    return cond


def denoise(transformer: CogVideoXTransformer, latents: torch.Tensor, *, cond: torch.Tensor,
            uncond: torch.Tensor | None, schedule: NoiseSchedule, timesteps, num_steps: int, sampler: str = "ddim",
            guidance: float = 6.0, dynamic_cfg: bool = False, generator: torch.Generator | None = None,
            image_latents: torch.Tensor | None = None, ofs: float | None = 2.0,
            callback: StepCallback | None = None, cache_run: CacheRun | None = None,
            parallel: ParallelGroups | None = None) -> torch.Tensor:
    """The sampling loop on model-scale latents (B, C, T, h, w): CFG batches are [uncond, cond] as the reference's.

    cache_run: a cache.CacheRun for len(timesteps) steps; each pass goes through it (step caching, pass counts).
    parallel: run on several processes (parallel/): the CFG halves on two ranks and/or the video tokens split over a
    sequence group. Every rank must call this with the same inputs; every rank returns the same latents.
    """
    if sampler not in SAMPLERS:
        raise CogVXError(f"Unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}.")
    ofs_t = (torch.full((1,), float(ofs), device=latents.device, dtype=latents.dtype)
             if transformer.ofs_embedding is not None and ofs is not None else None)

    def predict(x: torch.Tensor, t: int, do_cfg: bool):
        if do_cfg and uncond is None:
            raise CogVXError("Guidance above 1 needs a negative (unconditional) prompt embedding.")
        split_cfg = do_cfg and parallel is not None and parallel.cfg_degree == 2
        if split_cfg:  # this rank's half only; the other half comes from its CFG partner
            do_cfg, context = False, cfg_parallel.guidance_context(uncond, cond, parallel)
        else:
            context = torch.cat([uncond, cond]) if do_cfg else cond
        x_in = torch.cat([x, x]) if do_cfg else x
        if image_latents is not None:
            img = torch.cat([image_latents, image_latents]) if do_cfg else image_latents
            x_in = torch.cat([x_in, img], dim=1)  # noise channels first
        ts = torch.full((x_in.shape[0],), t, device=x.device, dtype=torch.long)
        v = transformer(x_in, ts, context, ofs_t)
        if split_cfg:
            v_uncond, v_cond = cfg_parallel.exchange(v, parallel)
            return v_cond, v_uncond
        if do_cfg:
            v_uncond, v_cond = v.chunk(2)
            return v_cond, v_uncond
        return v, None

    with contextlib.ExitStack() as context:
        context.enter_context(attached(transformer, cache_run))
        if parallel is not None:
            context.enter_context(sequence_parallel(transformer, parallel))
            context.enter_context(cfg_parallel.cfg_parallel(transformer, parallel))
        return sample(predict, latents, schedule=schedule, timesteps=timesteps, sampler=sampler, guidance=guidance,
                      dynamic_cfg=dynamic_cfg, generator=generator, callback=callback, num_steps=num_steps)


def to_raw(latents: torch.Tensor, pad: int, scaling_factor: float) -> torch.Tensor:
    """Sampled model-scale latents (B, C, T + pad, h, w) -> raw VAE latents (B, C, T, h, w), in the model dtype as the
    reference unscales them before decoding."""
    return 1 / scaling_factor * latents[:, :, pad:]


def decode(vae, raw: torch.Tensor, *, tiling: Tiling | None = None, progress: Progress | None = None,
           parallel: ParallelGroups | None = None) -> torch.Tensor | None:
    """Raw latents (B, C, T, h, w) -> frames (B, T', H, W, 3) float32 in [0, 1]. parallel: the tiles are split over
    the ranks and the frames returned on rank 0 only (None elsewhere)."""
    if parallel is not None:
        pixels = decode_split(vae, raw, tiling, parallel)
        return None if pixels is None else model_output_to_frames(pixels)
    pixels = vae.decode(raw.to(vae.device, vae.dtype), tiling=tiling, progress=progress)  # (B, 3, T, H, W)
    return model_output_to_frames(pixels)


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
                 image: torch.Tensor | None = None, end_image: torch.Tensor | None = None,
                 video: torch.Tensor | None = None, strength: float = 0.8,
                 frames: int | None = None, height: int | None = None, width: int | None = None,
                 steps: int = 50, guidance: float = 6.0, dynamic_cfg: bool = False, sampler: str = "ddim",
                 seed: int | None = None, generator: torch.Generator | None = None,
                 progress: Progress | None = None, cancel: Callable[[], bool] | None = None,
                 decode_frames: bool = True, tiling: Tiling | None = None,
                 cache: StepCache | CacheRun | None = None, parallel: ParallelGroups | None = None) -> Generation:
        """image, end_image: (B, 3, H, W) in [-1, 1] at (height, width); video: (B, 3, T, H, W) in [-1, 1] for V2V.
        cache: step caching (cache.parse_cache, with TeaCache's coefficients resolved: cache.resolve), or a CacheRun
        for this run's steps to use as it is.
        parallel: every rank of a torchrun launch calls this with the same arguments (parallel.make_groups); they
        share rank 0's generator state, split the sampling and the VAE tiles, and rank 0 gets the frames (the other
        ranks' Generation has frames None; all have the latents)."""
        check_generate_inputs(image=image, video=video, cond=cond, uncond=uncond, frames=frames, height=height,
                              width=width, steps=steps, seed=seed)
        variant, transformer = self.variant, self.transformer
        if end_image is not None and image is None:
            raise CogVXError("An end image needs a start image too (image-to-video).")
        if video is not None:
            frames, height, width = video.shape[2], video.shape[3], video.shape[4]
        elif image is not None:
            height, width = height or image.shape[-2], width or image.shape[-1]
        default_frames, default_height, default_width = transformer.default_size()
        frames, height, width = frames or default_frames, height or default_height, width or default_width
        new_f, new_h, new_w, notes = snap_request(variant, frames, height, width, has_image=image is not None,
                                                  released=transformer.released_size, name=transformer.name,
                                                  learned_size=transformer.learned_size)
        if video is not None and (new_f, new_h, new_w) != (frames, height, width):
            raise CogVXError(f"The input video has {frames} frames of {width}x{height}; video-to-video needs 4k+1 "
                             "frames and sizes that are multiples of 16. Trim or resize the video first.")
        for what, picture in (("start image", image), ("end image", end_image)):
            if picture is not None and (new_h, new_w) != tuple(picture.shape[-2:]):
                raise CogVXError(f"The {what} is {picture.shape[-1]}x{picture.shape[-2]} but this run is "
                                 f"{new_w}x{new_h}; resize it first (the CLI and nodes do this for you).")
        frames, height, width = new_f, new_h, new_w
        for note in notes:
            log.warning(note)

        if cond is None:
            if prompt is None:
                raise CogVXError("Give a prompt (or prompt embeddings).")
            cond, uncond = self.encode_prompt(prompt, negative_prompt)
        if generator is None:
            generator = torch.Generator("cpu")
            if seed is not None:
                generator.manual_seed(int(seed))
            else:
                generator.seed()
        if parallel is not None:
            cfg_parallel.share_generator(generator, parallel)
        dtype, device = self.dtype, self.device
        cond = cond.to(device, dtype)
        uncond = None if uncond is None else uncond.to(device, dtype)

        def encoded(pixels: torch.Tensor | None) -> torch.Tensor | None:
            if pixels is None:
                return None
            with self.offload.stage(self.vae):
                return encode_moments(self.vae, pixels)

        sf, invert = scaling(self.vae, variant)
        prepared = prepare_latents(
            transformer, self.schedule, batch=cond.shape[0], frames=frames, height=height, width=width, steps=steps,
            generator=generator, scaling_factor=sf, invert_scale_latents=invert,
            start_image=encoded(None if image is None else image[:, :, None]),
            end_image=encoded(None if end_image is None else end_image[:, :, None]),
            video=encoded(video), strength=strength if video is not None else 1.0, dtype=dtype, device=device)

        def on_step(i, n, x, x0):
            if progress is not None:
                progress(i + 1, n)
            if cancel is not None and cancel():
                raise CancelledError("generation cancelled")

        passes = cache if isinstance(cache, CacheRun) else CacheRun(cache, len(prepared.timesteps))
        with self.offload.stage(transformer, transformer=True):
            latents = denoise(transformer, prepared.latents, cond=cond, uncond=uncond, schedule=self.schedule,
                              timesteps=prepared.timesteps, num_steps=steps, sampler=sampler, guidance=guidance,
                              dynamic_cfg=dynamic_cfg, generator=generator, image_latents=prepared.image_latents,
                              callback=on_step, cache_run=passes, parallel=parallel)
        raw = to_raw(latents, prepared.pad, sf)
        frames_out = None
        if decode_frames:
            with self.offload.stage(self.vae):
                frames_out = decode(self.vae, raw, tiling=tiling, parallel=parallel)
        return Generation(frames_out, raw, frames, height, width, notes, passes)


def load_pipeline(path: str | Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                  offload: Offload | None = None, text_weight_dtype: torch.dtype | None = None,
                  **transformer_kwargs) -> CogVideoXPipeline:
    """A whole diffusers-format model folder (model_index.json, transformer/, vae/, text_encoder/, tokenizer/,
    scheduler/), as the released models are downloaded.

    offload: with a mode other than none the models are loaded to the CPU and run on `offload.device` (default
    `device`); `text_weight_dtype` (fp8) stores T5's big weights in fp8. Extra keywords go to `load_transformer`
    (`weight_dtype`, `attention`, `operations`)."""
    from .checkpoints.folder import read_model_folder
    from .checkpoints.transformer import load_transformer
    from .checkpoints.vae import load_vae
    from .text import load_text_encoder

    if not Path(path).is_dir():
        raise CheckpointError(f"{path}: not a folder. load_pipeline needs a diffusers-format model folder "
                              "(model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/).")
    folder = read_model_folder(path)
    missing = [name for name in ("transformer", "vae") if getattr(folder, name) is None]
    if missing:
        raise CheckpointError(f"{folder.root}: missing the {' and '.join(missing)} folder(s); this is not a complete "
                              "diffusers-format CogVideoX folder. Download it again.")
    offload = offload or Offload()
    if offload.mode != "none":
        offload.device = torch.device(offload.device or device or "cpu")
        device = "cpu"  # each model goes to offload.device only while it runs
    text_device = offload.text_device if offload.text_device is not None and offload.mode == "none" else device
    operations = transformer_kwargs.get("operations")
    transformer = load_transformer(folder.transformer, dtype=dtype, device=device, **transformer_kwargs)
    dtype = transformer.dtype
    vae = load_vae(folder.vae, dtype=dtype, device=device, operations=operations)
    text_encoder = None
    if folder.text_encoder is not None:
        text_encoder = load_text_encoder(folder.root, dtype=dtype, device=text_device, operations=operations,
                                         max_length=folder.text_length or transformer.text_length,
                                         weight_dtype=text_weight_dtype)
    schedule = NoiseSchedule.from_config(folder.schedule_config) if folder.schedule_config else None
    return CogVideoXPipeline(transformer, vae, text_encoder, schedule, offload)
