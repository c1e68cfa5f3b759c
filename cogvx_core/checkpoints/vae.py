"""Loading the CogVideoX VAE: a diffusers `vae/` folder (or the model folder holding it), or one .safetensors file
in diffusers layout (optionally prefixed `vae.` / `first_stage_model.`) or in the original SAT layout.

The model is built on the meta device and filled tensor by tensor from the memory-mapped files, converted straight to
the target dtype and device, so no full-precision copy of the checkpoint is ever held.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

from ..checks import config_types
from ..errors import CheckpointError
from ..vae import CausalVAE, build_vae
from ..variants import VAE_DEFAULTS
from .io import (SafetensorsHeader, fill_module, folder_weight_files, iter_tensors, open_headers, read_json,
                 refuse_pickle)

log = logging.getLogger(__name__)

VAE_CLASS = "AutoencoderKLCogVideoX"

# Prefixes under which a VAE is stored inside bigger files (ComfyUI/SAT "first_stage_model.", diffusers-style "vae.").
KEY_PREFIXES = ("first_stage_model.", "vae.", "")

# SAT (THUDM) -> diffusers substring renames, applied in this order (diffusers' convert_cogvideox_to_diffusers.py).
SAT_RENAMES = (
    ("block.", "resnets."),
    ("down.", "down_blocks."),
    ("downsample", "downsamplers.0"),
    ("upsample", "upsamplers.0"),
    ("nin_shortcut", "conv_shortcut"),
    ("encoder.mid.block_1", "encoder.mid_block.resnets.0"),
    ("encoder.mid.block_2", "encoder.mid_block.resnets.1"),
    ("decoder.mid.block_1", "decoder.mid_block.resnets.0"),
    ("decoder.mid.block_2", "decoder.mid_block.resnets.1"),
)

# Key fragments that only a CogVideoX transformer checkpoint has (diffusers, SAT and ComfyUI layouts).
TRANSFORMER_MARKERS = ("transformer_blocks.", "patch_embed.", "time_embedding.", "model.diffusion_model.",
                       "mixins.", "norm_final.")

_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def load_vae(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
             operations=None) -> CausalVAE:
    """The VAE in `path`: a diffusers vae/ folder, a model folder with a vae/ subfolder, or one .safetensors file.

    dtype None keeps the stored floating dtype (fp8 files become bfloat16); device None means CPU.
    operations: the layer classes to build from (modules/ops.py), default the core's.
    `vae.scaling_factor` is None when the file does not say it (a bare single file): the pipeline then takes it
    from the transformer's variant.
    """
    path = Path(path)
    refuse_pickle(path)
    if path.is_dir():
        folder = _vae_folder(path)
        config = read_json(folder / "config.json", "VAE", VAE_DEFAULTS)
        _check_vae_config(config, folder)
        headers = open_headers(folder_weight_files(folder, "VAE"))
        shapes = {k: s for h in headers for k, s in h.shapes().items()}
        rename, names = _key_plan(shapes, folder)
        scaling_known = True
        source = str(folder)
    elif path.exists():
        headers = [SafetensorsHeader(path)]
        if not path.name.lower().endswith(".safetensors"):
            log.info("%s: reading as a .safetensors file", path)
        shapes = headers[0].shapes()
        rename, names = _key_plan(shapes, path)
        config, scaling_known = _single_file_config(headers[0], names, path)
        source = str(path)
    else:
        raise CheckpointError(f"{path}: no such file or folder. Give a diffusers vae/ folder, the model folder that "
                              "holds it, or a VAE .safetensors file.")
    dtype = dtype or _stored_dtype(headers)
    vae = build_vae(config, device="meta", operations=operations)
    unexpected = fill_module(vae, iter_tensors(headers, rename), source=source,
                             dtype_for=lambda name, t: dtype, device=device or "cpu")
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} tensors do not belong to this VAE architecture "
                              f"(e.g. {', '.join(unexpected[:3])}); the file is another model or a modified VAE.")
    if not scaling_known:
        vae.scaling_factor = None
    return vae.eval().requires_grad_(False)


def _vae_folder(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    if (path / "vae").is_dir():
        return path / "vae"
    if (path / "transformer").is_dir() or (path / "model_index.json").is_file():
        raise CheckpointError(f"{path}: this model folder has no vae/ subfolder. Download the VAE (vae/config.json "
                              "and its .safetensors) into it, or point at a VAE file or folder.")
    if any(path.glob("*.safetensors")):
        raise CheckpointError(
            f"{path}: the folder has .safetensors weights but no config.json, so the VAE configuration (and its "
            "latent scaling factor) is unknown. Put the model's vae/config.json next to the weights, or load the "
            ".safetensors file itself (its architecture is then read from the tensor shapes).")
    raise CheckpointError(f"{path}: not a VAE folder (no config.json, no vae/ subfolder, no .safetensors). "
                          "Point at the diffusers vae/ folder or a VAE .safetensors file.")


def _check_vae_config(config: dict, source: Path) -> None:
    name = config.get("_class_name")
    if name and "Transformer" in name:
        raise CheckpointError(f"{source}: this is a transformer ({name}), not the VAE; load it with the model "
                              "(transformer) loader and give the VAE's own folder or file here.")
    if name and name != VAE_CLASS:
        raise CheckpointError(f"{source}: config.json describes a {name}, not the CogVideoX VAE ({VAE_CLASS}).")


def _key_plan(shapes: dict[str, tuple[int, ...]], source: Path
              ) -> tuple[Callable[[str], str | None], dict[str, tuple[int, ...]]]:
    """How to rename the file's keys to diffusers VAE keys, and the renamed shapes. Skips other models' keys and
    SAT's `loss.` (discriminator/LPIPS) tensors."""
    keys = list(shapes)
    prefix = next((p for p in KEY_PREFIXES if any(k.startswith((p + "encoder.", p + "decoder.")) for k in keys)),
                  None)
    if prefix is None:
        if any(m in k for k in keys for m in TRANSFORMER_MARKERS):
            raise CheckpointError(f"{source}: this is a CogVideoX transformer checkpoint, not a VAE. Load it with the "
                                  "model (transformer) loader, and give the VAE file (e.g. cogvideox_vae.safetensors "
                                  "or the vae/ folder) here.")
        raise CheckpointError(f"{source}: no VAE tensors (encoder.* / decoder.*) in this file; it is not a CogVideoX "
                              f"VAE (first keys: {', '.join(keys[:3])}).")
    own = [k[len(prefix):] for k in keys if k.startswith(prefix)]
    sat = any(k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.", "decoder.mid.")) for k in own)
    up_levels = len({k.split(".")[2] for k in own if k.startswith("decoder.up.")})

    def rename(key: str) -> str | None:
        if not key.startswith(prefix):
            return None
        key = key[len(prefix):]
        if not key.startswith(("encoder.", "decoder.")):
            return None
        return _sat_to_diffusers(key, up_levels) if sat else key

    return rename, {new: shapes[k] for k in keys if (new := rename(k)) is not None}


def _sat_to_diffusers(key: str, up_levels: int) -> str | None:
    if "loss" in key:
        return None
    for old, new in SAT_RENAMES:
        key = key.replace(old, new)
    parts = key.split(".")
    if parts[0] == "decoder" and parts[1] == "up":  # SAT counts up levels from the full-resolution end
        parts[1], parts[2] = "up_blocks", str(up_levels - 1 - int(parts[2]))
    return ".".join(parts)


def _single_file_config(header: SafetensorsHeader, shapes: dict[str, tuple[int, ...]], source: Path
                        ) -> tuple[dict, bool]:
    """The config a single file states in its "config" metadata, else one inferred from the tensor shapes."""
    raw = header.metadata.get("config")
    if raw:
        try:
            config = json.loads(raw)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{source}: the 'config' metadata is not valid JSON ({e}); the file is corrupt.")
        if not isinstance(config, dict):
            raise CheckpointError(f"{source}: the 'config' metadata is not a JSON object; the file is corrupt.")
        config_types(config, VAE_DEFAULTS, f"{source} ('config' metadata)")
        _check_vae_config(config, source)
        return config, "scaling_factor" in config
    return infer_vae_config(shapes, source), False


def infer_vae_config(shapes: dict[str, tuple[int, ...]], source: Path | str = "checkpoint") -> dict:
    """The architecture fields of a VAE config, from diffusers-named tensor shapes. The GroupNorm group count and
    the time compression are not visible in weights: the released values (32, 4) are kept."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(f"{source}: tensor {key} is missing, so this is not a complete CogVideoX VAE. "
                                  "Download the VAE file again.")
        return shapes[key]

    def indices(pattern: str) -> set[int]:
        rx = re.compile(pattern)
        return {int(m.group(1)) for k in shapes if (m := rx.match(k))}

    levels = indices(r"encoder\.down_blocks\.(\d+)\.")
    if not levels or levels != set(range(len(levels))):
        raise CheckpointError(f"{source}: no encoder down blocks found; this is not a complete CogVideoX VAE "
                              "(a decoder-only file cannot be loaded).")
    block_out_channels = [shape(f"encoder.down_blocks.{i}.resnets.0.conv1.conv.weight")[0] for i in sorted(levels)]
    n = len(block_out_channels)
    config = {
        "in_channels": shape("encoder.conv_in.conv.weight")[1],
        "out_channels": shape("decoder.conv_out.conv.weight")[0],
        "latent_channels": shape("decoder.conv_in.conv.weight")[1],
        "block_out_channels": block_out_channels,
        "layers_per_block": len(indices(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")),
        "down_block_types": ["CogVideoXDownBlock3D"] * n,
        "up_block_types": ["CogVideoXUpBlock3D"] * n,
    }
    groups = VAE_DEFAULTS["norm_num_groups"]
    if any(c % groups for c in block_out_channels):
        raise CheckpointError(
            f"{source}: the VAE has {block_out_channels} channels, which the released GroupNorm group count "
            f"({groups}) does not divide, and the group count cannot be read from weights. Use a diffusers vae/ "
            "folder with its config.json, or a file with a 'config' metadata entry.")
    return config


def _stored_dtype(headers: list[SafetensorsHeader]) -> torch.dtype:
    counts = Counter(dt for h in headers for dt, _ in h.tensors.values() if dt.is_floating_point)
    if not counts:
        return torch.float32
    dtype = counts.most_common(1)[0][0]
    return dtype if dtype in _COMPUTE_DTYPES else torch.bfloat16
