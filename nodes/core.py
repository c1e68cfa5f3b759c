"""The nodes' one import point for the core: every core name a node uses comes from here.

Inside ComfyUI the pack is one package (custom_nodes/<any folder name>/) and the core is its sub-package; in plain
Python (tests, scripts) the pack root is on sys.path and the core is the top-level `cogvx_core`. Only public names are
listed: the nodes speak to the core through its public API.
"""

from __future__ import annotations

from importlib import import_module

try:  # inside ComfyUI
    from .. import cogvx_core as _package
except ImportError:  # plain Python
    import cogvx_core as _package


def _names(module: str, names: str) -> list:
    """The named attributes of a core module (`module` relative to the core package)."""
    found = import_module(f"{_package.__name__}.{module}")
    return [getattr(found, name) for name in names.split()]


caption = import_module(f"{_package.__name__}.caption")
ddp = import_module(f"{_package.__name__}.train.ddp")

[CogVXError] = _names("errors", "CogVXError")
denoise_note, image_notes = _names("checks", "denoise_note image_notes")
CACHE_KINDS, DEFAULT_THRESHOLDS, CacheRun, StepCache, resolve_cache = _names(
    "cache", "CACHE_KINDS DEFAULT_THRESHOLDS CacheRun StepCache resolve")
[compile_blocks] = _names("compile", "compile_blocks")
[Lora] = _names("checkpoints.lora", "Lora")
[load_transformer] = _names("checkpoints.transformer", "load_transformer")
[load_vae] = _names("checkpoints.vae", "load_vae")
DEFAULT_TARGETS, applied_loras, apply_loras, load_lora, remove_trainable_lora, save_lora = _names(
    "lora", "DEFAULT_TARGETS applied_loras apply_loras load_lora remove_trainable_lora save_lora")
[available_attention_backends] = _names("modules.attention", "available_attention_backends")
run_denoise, decode_latents, encode_moments, latent_shape, prepare_latents, to_raw = _names(
    "pipeline", "denoise decode encode_moments latent_shape prepare_latents to_raw")
[SAMPLERS] = _names("samplers", "SAMPLERS")
[NoiseSchedule] = _names("schedule", "NoiseSchedule")
DEFAULT_MAX_LENGTH, TextEncoder, fit_context, load_text_encoder = _names(
    "text", "DEFAULT_MAX_LENGTH TextEncoder fit_context load_text_encoder")
buckets_for, parse_resolutions = _names("train.buckets", "buckets_for parse_resolutions")
[clear_checkpoints] = _names("train.checkpoint", "clear_checkpoints")
TrainingDataset, prepare_dataset, scan_folder = _names("train.dataset", "CogVXDataset prepare_dataset scan_folder")
[builtin_models] = _names("models", "builtin_models")
[estimate] = _names("train.estimate", "estimate")
loss_chart, running_mean = _names("train.plot", "loss_chart running_mean")
Trainer, TrainSettings = _names("train.trainer", "Trainer TrainSettings")
[CogVideoXTransformer] = _names("transformer", "CogVideoXTransformer")
[Tiling] = _names("vae", "Tiling")
VARIANTS, Variant, get_variant, latent_frames, pixel_frames, snap_request, snap_video = _names(
    "variants", "VARIANTS Variant get_variant latent_frames pixel_frames snap_request snap_video")
frames_to_model_input, pil_to_model_input, to_uint8 = _names(
    "video_io", "frames_to_model_input pil_to_model_input to_uint8")
[read_model_folder] = _names("checkpoints.folder", "read_model_folder")
