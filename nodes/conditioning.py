"""Conditioning nodes: prompt -> CONDITIONING, the empty video latent, start/end images (I2V) and input video (V2V).

Latents are ComfyUI LATENT dicts {"samples": (B, 16, T, h, w)} in raw VAE space (unscaled, as ComfyUI's own VAE
nodes make them). Encoded images and videos also carry the VAE posterior's moments ("cogvx_moments", (B, 32, T, h, w))
so that the sampler draws the posterior sample from its own seed, before the noise, exactly as the reference
pipelines do; other nodes see the posterior mean in "samples".
"""

from __future__ import annotations

import torch
from PIL import Image

from .core import (
    CogVXError,
    encode_moments,
    frames_to_model_input,
    get_variant,
    image_notes,
    latent_frames,
    pil_to_model_input,
    snap_request,
    snap_video,
    to_uint8,
    VARIANTS,
)

from . import host, preview
from .vae_run import TileSettings, run

MAX_FRAMES = 1024
MAX_SIZE = 8192
T2V_VARIANTS = [n for n, v in VARIANTS.items() if not v.i2v]
I2V_VARIANTS = [n for n, v in VARIANTS.items() if v.i2v]


def variant_rules(names: list[str]) -> dict:
    """Each variant's size and frame rules, handed to web/cogvx.js through the combo's options (one source)."""
    return {n: dict(title=VARIANTS[n].title, generation=VARIANTS[n].generation, i2v=VARIANTS[n].i2v,
                    frames=VARIANTS[n].frames, frame_step=VARIANTS[n].frame_step, max_frames=VARIANTS[n].max_frames,
                    width=VARIANTS[n].width, height=VARIANTS[n].height, fps=VARIANTS[n].fps,
                    positions=VARIANTS[n].positions) for n in names}


def _size_inputs(variant_names: list[str], default: str, zero_means_image: bool = False) -> dict:
    defaults = VARIANTS[default]
    low = 0 if zero_means_image else 16
    size_tip = " 0 takes the start image's size." if zero_means_image else ""
    return {
        "variant": (variant_names, {"default": default, "cogvx_rules": variant_rules(variant_names),
                                    "tooltip": "The model family whose frame and size rules apply (a connected "
                                               "model overrides it)."}),
        "frames": ("INT", {"default": defaults.frames, "min": 1, "max": MAX_FRAMES, "step": 4,
                           "tooltip": "Pixel frames, 4k+1 (1.0 models were trained on 49, 1.5 on 81 or 161)."}),
        "width": ("INT", {"default": 0 if zero_means_image else defaults.width, "min": low, "max": MAX_SIZE,
                          "step": 16, "tooltip": "Multiple of 16." + size_tip}),
        "height": ("INT", {"default": 0 if zero_means_image else defaults.height, "min": low, "max": MAX_SIZE,
                           "step": 16, "tooltip": "Multiple of 16." + size_tip}),
        "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Videos per run."}),
    }


def _rules(variant: str, model) -> tuple:
    """(Variant, released, model) from the connected model when there is one, else from the combo."""
    if model is not None:
        return model.variant, model.transformer.released_size, model
    return get_variant(variant), True, None


def _snap(variant, released, model, frames, height, width, node_id) -> tuple[int, int, int, list[str]]:
    """The valid size for the variant, or the connected model's own (its name, its learned size), with notes."""
    own = {} if model is None else dict(name=model.transformer.name, learned_size=model.transformer.learned_size)
    f, h, w, notes = snap_request(variant, frames, height, width, has_image=variant.i2v, released=released, **own)
    for note in notes:
        host.say(note, node_id)
    return f, h, w, notes


def _empty(batch: int, frames: int, height: int, width: int) -> dict:
    samples = torch.zeros((batch, 16, latent_frames(frames), height // 8, width // 8),
                          device=host.intermediate_device())
    return {"samples": samples}


def _ui(result: tuple, notes: list[str]) -> dict:
    """The node's outputs, and its notes for web/cogvx.js to show (an empty list clears the last run's)."""
    return {"ui": {"text": notes}, "result": result}


class CogVXTextEncode:
    """Prompt -> CONDITIONING with the T5-XXL encoder, padded and cut as the reference pipeline does."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "t5": ("COGVX_T5",),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                    "tooltip": "The prompt. Leave empty for the usual negative prompt."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "CogVX/conditioning"
    DESCRIPTION = ("Encodes a prompt for CogVideoX: exactly the model's text length (226 tokens), EOS and padding as "
                   "the reference; a longer prompt is cut and the node says what was dropped.")

    def encode(self, t5, text, unique_id=None):
        device = t5.managed.load()
        context, info = t5.encoder.encode_with_info([text], device=device)  # (1, L, 4096)
        notes = [note for p in info for note in p.notes]  # a long prompt's end (an excerpt), unknown words
        for note in notes:
            host.say(note, unique_id)
        return _ui(([[context.to(host.intermediate_device()), {}]],), notes)


class CogVXEmptyLatent:
    """An empty video latent of a valid size for the chosen variant (it snaps and says so)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": _size_inputs(T2V_VARIANTS + I2V_VARIANTS, "5b"),
            "optional": {
                "model": ("COGVX_MODEL", {"tooltip": "When connected, the model's own rules apply (also for small or "
                                                     "fine-tuned models of other sizes)."}),
                "vae": ("COGVX_VAE", {"tooltip": "When connected, the sampler's live preview shows this VAE's "
                                                 "colours (without it: the latent's structure only)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "make"
    CATEGORY = "CogVX/latent"
    DESCRIPTION = ("An empty latent (B, 16, (frames-1)/4+1, height/8, width/8). Frames snap to 4k+1 and sizes to "
                   "multiples of 16 (5B-I2V: 720x480; 1.5-I2V: shorter side 768); the node shows what it changed.")

    def make(self, variant, frames, width, height, batch_size, model=None, vae=None, unique_id=None):
        v, released, connected = _rules(variant, model)
        f, h, w, notes = _snap(v, released, connected, frames, height, width, unique_id)
        return _ui((preview.attach(_empty(batch_size, f, h, w), vae),), notes)


def _to_pixels(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """IMAGE (N, H, W, 3) in [0, 1] -> (N, 3, height, width) in [-1, 1], resized as the reference's processor."""
    if images.ndim != 4 or images.shape[-1] < 3:
        raise CogVXError(f"Expected an IMAGE (batch, height, width, 3); got shape {tuple(images.shape)}.")
    return torch.stack([pil_to_model_input(Image.fromarray(a), height, width) for a in to_uint8(images[..., :3])])


def _encode(vae_handle, pixels: torch.Tensor, node_id, what: str) -> torch.Tensor:
    """Posterior moments (B, 32, t, h, w) of pixels (B, 3, T, H, W), one video at a time as the reference."""

    def work(tiling, progress):
        return encode_moments(vae_handle.vae, pixels, tiling=tiling, progress=progress)

    moments = run(vae_handle, work, 1, pixels.shape[-2], pixels.shape[-1], TileSettings("auto"), node_id, what)
    return moments.to(host.intermediate_device())


def encoded_latent(moments: torch.Tensor, vae_handle) -> dict:
    """A LATENT of posterior moments: their mean in "samples" (for other nodes), the moments for the sampler."""
    mean = moments[:, : moments.shape[1] // 2]
    return preview.attach({"samples": mean.float(), "cogvx_moments": moments}, vae_handle)


class CogVXImageToVideo:
    """Start image (and optional end image) -> the image conditioning of the I2V models, plus an empty latent."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("COGVX_VAE",),
                "start_image": ("IMAGE", {"tooltip": "The first frame (resized to the video size)."}),
                **_size_inputs(I2V_VARIANTS, "5b-i2v", zero_means_image=True),
            },
            "optional": {
                "end_image": ("IMAGE", {"tooltip": "The last frame, to interpolate between two images (not part of "
                                                   "the official models' training; results vary)."}),
                "model": ("COGVX_MODEL", {"tooltip": "When connected, the model's own rules apply."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("latent", "image_cond")
    FUNCTION = "encode"
    CATEGORY = "CogVX/conditioning"
    DESCRIPTION = ("Encodes the start image (and an end image) with the VAE for CogVideoX-5B-I2V and 1.5-5B-I2V. "
                   "Connect 'latent' to the sampler's latent and 'image_cond' to its image_cond.")

    def encode(self, vae, start_image, variant, frames, width, height, batch_size, end_image=None, model=None,
               unique_id=None):
        v, released, connected = _rules(variant, model)
        if not v.i2v:
            raise CogVXError(f"{v.title} is a text-to-video model: image-to-video needs 5B-I2V or 1.5-5B-I2V. Load "
                             "an I2V model, or use CogVXEmptyLatent for text-to-video.")
        height = height or int(start_image.shape[1])
        width = width or int(start_image.shape[2])
        f, h, w, notes = _snap(v, released, connected, frames, height, width, unique_id)
        for note in image_notes(start_image[0], (h, w)):
            host.say(note, unique_id)
            notes.append(note)
        images = [start_image] + ([end_image] if end_image is not None else [])
        moments = []
        for image in images:
            if image.shape[0] not in (1, batch_size):
                note = (f"The image batch has {image.shape[0]} images for {batch_size} videos: using the first "
                        "image for every video.")
                host.say(note, unique_id)
                notes.append(note)
                image = image[:1]
            pixels = _to_pixels(image, h, w).expand(batch_size, -1, -1, -1)[:, :, None]  # (B, 3, 1, H, W)
            moments.append(_encode(vae, pixels, unique_id, "encode"))
        image_cond = encoded_latent(torch.cat(moments, dim=2), vae)  # frame 0: start, frame 1: end
        return _ui((preview.attach(_empty(batch_size, f, h, w), vae), image_cond), notes)


class CogVXVideoEncode:
    """IMAGE frames -> LATENT for video-to-video (sample it with denoise below 1)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("COGVX_VAE",),
                "images": ("IMAGE", {"tooltip": "The input video's frames, in order."}),
                "frames": ("INT", {"default": 0, "min": 0, "max": MAX_FRAMES, "tooltip": "Frames to use from the "
                                   "start (0: all); cut down to 4k+1."}),
                "width": ("INT", {"default": 0, "min": 0, "max": MAX_SIZE, "step": 16,
                                  "tooltip": "Resize to this width (0: the video's own, snapped to 16)."}),
                "height": ("INT", {"default": 0, "min": 0, "max": MAX_SIZE, "step": 16,
                                   "tooltip": "Resize to this height (0: the video's own, snapped to 16)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    CATEGORY = "CogVX/conditioning"
    DESCRIPTION = ("Encodes a video (IMAGE frames) with the VAE for video-to-video: connect it to the sampler's "
                   "latent and set denoise below 1 (0.8 keeps the motion, lower keeps more of the input).")

    def encode(self, vae, images, frames, width, height, unique_id=None):
        if images.ndim != 4 or images.shape[0] < 1:
            raise CogVXError(f"Expected IMAGE frames (frames, height, width, 3); got shape {tuple(images.shape)}.")
        available = min(frames or images.shape[0], images.shape[0])
        use, h, w, notes = snap_video(available, height or images.shape[1], width or images.shape[2])
        for note in notes:
            host.say(note, unique_id)
        pixels = frames_to_model_input(images[:use, ..., :3].float(), h, w)[None]  # (1, 3, T, H, W)
        return _ui((encoded_latent(_encode(vae, pixels, unique_id, "encode"), vae),), notes)
