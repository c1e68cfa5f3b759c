"""What a diffusers-format CogVideoX model folder holds: the one reader of its layout and small config files.

    <root>/model_index.json
    <root>/transformer/   config.json + weights (one file or shards)
    <root>/vae/           config.json (scaling_factor, invert_scale_latents) + weights
    <root>/text_encoder/  T5 config.json + weights;  <root>/tokenizer/
    <root>/scheduler/     scheduler_config.json

The loaders, the pipeline, the trainer and the nodes all learn a folder's parts and settings from `read_model_folder`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError
from ..variants import TRANSFORMER_DEFAULTS, VAE_DEFAULTS, Variant, detect_variant
from .io import read_json

PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass(frozen=True)
class ModelFolder:
    """A model folder's parts (None where absent) and the settings its config files hold (None where unsaid)."""

    root: Path
    transformer: Path | None
    vae: Path | None
    text_encoder: Path | None
    tokenizer: Path | None
    schedule_config: dict | None  # scheduler/scheduler_config.json
    scaling_factor: float | None  # vae/config.json
    invert_scale_latents: bool | None  # vae/config.json (1.5-I2V)
    text_length: int | None  # transformer/config.json max_text_seq_length
    variant: Variant | None  # detected from transformer/config.json


def model_folder_root(path: str | os.PathLike) -> Path | None:
    """The model folder a path is, or is a part of (`<root>/transformer`, `<root>/vae`, ...); None for other paths."""
    path = Path(path)
    if path.is_dir() and ((path / "model_index.json").is_file() or (path / "transformer").is_dir()):
        return path
    if path.is_dir() and path.name in PARTS:
        return path.parent
    return None


def _number(cfg: dict, key: str, source: Path, kind=float):
    value = cfg.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"{source}: {key} is {value!r}, not a number. Restore the file from the model's "
                              "download.")
    return kind(value)


def read_model_folder(path: str | os.PathLike) -> ModelFolder:
    """Reads a diffusers-format folder (or the folder a part folder such as `<root>/text_encoder` belongs to)."""
    root = model_folder_root(path)
    if root is None:
        raise CheckpointError(f"{path}: not a diffusers-format CogVideoX folder (model_index.json, transformer/, "
                              "vae/, text_encoder/, tokenizer/, scheduler/). Point at the folder as downloaded.")
    parts = {name: (root / name if (root / name).is_dir() else None) for name in PARTS}

    def config(part: str, name: str, what: str, reference: dict | None) -> tuple[dict | None, Path]:
        file = root / part / name
        return (read_json(file, what, reference) if file.is_file() else None), file

    transformer_cfg, transformer_file = config("transformer", "config.json", "transformer", TRANSFORMER_DEFAULTS)
    vae_cfg, vae_file = config("vae", "config.json", "VAE", VAE_DEFAULTS)
    schedule_cfg, _ = config("scheduler", "scheduler_config.json", "scheduler", None)  # NoiseSchedule checks it
    invert = (vae_cfg or {}).get("invert_scale_latents")
    return ModelFolder(
        root=root, transformer=parts["transformer"], vae=parts["vae"], text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"], schedule_config=schedule_cfg,
        scaling_factor=_number(vae_cfg or {}, "scaling_factor", vae_file),
        invert_scale_latents=None if invert is None else bool(invert),
        text_length=_number(transformer_cfg or {}, "max_text_seq_length", transformer_file, int),
        variant=detect_variant(transformer_cfg) if transformer_cfg is not None else None)
