"""Transformer checkpoints: diffusers folders (one file or shards), and single files in the diffusers, ComfyUI-native
or original SAT key layouts, converted to the diffusers names on load. The architecture of a single file is read from
its tensor shapes; weights are streamed from the mmap straight into a meta-device model in the target dtype.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Iterator

import torch

from ..checks import config_types, json_object
from ..errors import CheckpointError
from ..transformer import CogVideoXTransformer, build_transformer
from ..variants import TRANSFORMER_DEFAULTS, get_variant
from .io import SafetensorsHeader, fill_module, folder_weight_files, iter_tensors, read_json, refuse_pickle

log = logging.getLogger(__name__)

FP8_DTYPES = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FP8_FAST = "fp8_e4m3fn_fast"  # fp8 storage with per-tensor scales, fp8 matmuls (modules/fp8.py)

# ---------------------------------------------------------------------------------------------------------------
# Key layouts
# ---------------------------------------------------------------------------------------------------------------
# ComfyUI's names -> diffusers' names, inside a block and at the top level (the LoRA key layouts share them)
COMFY_BLOCK_NAMES = {"q": "attn1.to_q", "k": "attn1.to_k", "v": "attn1.to_v", "norm_q": "attn1.norm_q",
                     "norm_k": "attn1.norm_k", "attn_out": "attn1.to_out.0", "ff_proj": "ff.net.0.proj",
                     "ff_out": "ff.net.2"}
COMFY_TOP_NAMES = {"time_embedding_linear_1": "time_embedding.linear_1",
                   "time_embedding_linear_2": "time_embedding.linear_2",
                   "ofs_embedding_linear_1": "ofs_embedding.linear_1", "ofs_embedding_linear_2": "ofs_embedding.linear_2"}

# SAT substring renames, applied in this order (the converter of the reference)
_SAT_RENAMES = [
    ("transformer.final_layernorm", "norm_final"), ("transformer", "transformer_blocks"), ("attention", "attn1"),
    ("mlp", "ff.net"), ("dense_h_to_4h", "0.proj"), ("dense_4h_to_h", "2"), (".layers", ""), ("dense", "to_out.0"),
    ("input_layernorm", "norm1.norm"), ("post_attn1_layernorm", "norm2.norm"),
    ("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
    ("ofs_embed.0", "ofs_embedding.linear_1"), ("ofs_embed.2", "ofs_embedding.linear_2"),
    ("mixins.patch_embed", "patch_embed"), ("mixins.final_layer.norm_final", "norm_out.norm"),
    ("mixins.final_layer.linear", "proj_out"), ("mixins.final_layer.adaLN_modulation.1", "norm_out.linear"),
    ("mixins.pos_embed.pos_embedding", "patch_embed.pos_embedding"),
]
_SAT_DROP = ("embed_tokens", "freqs_sin", "freqs_cos", "position_embedding")


def detect_layout(keys: list[str], source: str) -> tuple[str, str]:
    """(layout, prefix) of a single-file transformer: layout is "diffusers", "comfy" or "sat"."""
    ks = set(keys)
    for prefix in ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.", ""):
        if any(k.startswith(prefix + "mixins.") or k.startswith(prefix + "transformer.layers.") for k in ks):
            return "sat", prefix
        if prefix + "transformer_blocks.0.norm1.linear.weight" in ks:
            return "diffusers", prefix
        if prefix + "blocks.0.norm1.linear.weight" in ks:
            return "comfy", prefix
    sample = ", ".join(sorted(keys)[:3])
    if any("lora_" in k or ".alpha" in k for k in keys):
        what = "a LoRA; load it with the LoRA loader (CogVXLoraLoader / --lora)"
    elif any(re.search(r"(encoder|decoder)\.(down|up|mid|conv_in)", k) for k in keys):
        what = "a VAE; load it with the VAE loader (CogVXVAELoader / load_vae)"
    elif any(".SelfAttention." in k or "encoder.block." in k for k in keys):
        what = "a T5 text encoder; load it with the T5 loader (CogVXT5Loader)"
    else:
        what = "not a CogVideoX transformer"
    raise CheckpointError(f"{source}: this file is {what} (its keys look like: {sample}).")


def _convert_comfy(key: str, value: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    m = re.match(r"blocks\.(\d+)\.(\w+)\.(.*)", key)
    if m and m.group(2) in COMFY_BLOCK_NAMES:
        yield f"transformer_blocks.{m.group(1)}.{COMFY_BLOCK_NAMES[m.group(2)]}.{m.group(3)}", value
    elif m:
        yield f"transformer_blocks.{m.group(1)}.{m.group(2)}.{m.group(3)}", value
    else:
        head, _, tail = key.partition(".")
        yield f"{COMFY_TOP_NAMES.get(head, head)}.{tail}" if tail else key, value


def _convert_sat(key: str, value: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    if any(d in key for d in _SAT_DROP):
        return
    m = re.match(r"mixins\.adaln_layer\.adaLN_modulations\.(\d+)\.1\.(weight|bias)", key)
    if m:  # 12 chunks: [shift, scale, gate]_msa, [..]_mlp, text [..]_msa, text [..]_mlp
        c = value.chunk(12, dim=0)
        block, kind = m.groups()
        yield f"transformer_blocks.{block}.norm1.linear.{kind}", torch.cat(c[0:3] + c[6:9])
        yield f"transformer_blocks.{block}.norm2.linear.{kind}", torch.cat(c[3:6] + c[9:12])
        return
    m = re.match(r"mixins\.adaln_layer\.(query|key)_layernorm_list\.(\d+)\.(weight|bias)", key)
    if m:
        yield f"transformer_blocks.{m.group(2)}.attn1.norm_{m.group(1)[0]}.{m.group(3)}", value
        return
    for old, new in _SAT_RENAMES:
        key = key.replace(old, new)
    if "query_key_value" in key:
        q, k, v = value.chunk(3, dim=0)
        for name, part in zip(("to_q", "to_k", "to_v"), (q, k, v)):
            yield key.replace("query_key_value", name), part
        return
    yield key, value


def converted(layout: str, prefix: str, items: Iterator[tuple[str, torch.Tensor]]):
    """Streams (diffusers name, tensor) from (file key, tensor); keys outside `prefix` are skipped."""
    for key, value in items:
        if not key.startswith(prefix):
            continue
        key = key[len(prefix):]
        if layout == "diffusers":
            yield key, value
        elif layout == "comfy":
            yield from _convert_comfy(key, value)
        else:
            yield from _convert_sat(key, value)


# ---------------------------------------------------------------------------------------------------------------
# Config from shapes
# ---------------------------------------------------------------------------------------------------------------
RELEASED_LEARNED_TOKENS = 226 + 13 * 30 * 45  # the 5b-I2V table: 226 text + 13x30x45 video positions


def infer_config(shapes: dict[str, tuple[int, ...]], source: str, variant_hint: str | None = None) -> dict:
    """A diffusers transformer config from diffusers-named tensor shapes (the released sizes and small models).

    The weights of a 2b-style (sin-cos) and a 5b-style (RoPE) 1.0 model differ only in size: the released 2b is the
    1920-wide one; for other widths `variant_hint` decides (RoPE when none is given).
    """
    try:
        dim, text_dim = shapes["patch_embed.text_proj.weight"]
        head_dim = shapes["transformer_blocks.0.attn1.norm_q.weight"][0]
        proj = shapes["patch_embed.proj.weight"]
        time_dim = shapes["time_embedding.linear_1.weight"][0]
        proj_out = shapes["proj_out.weight"][0]
    except KeyError as e:
        raise CheckpointError(f"{source}: tensor {e} is missing, so this is not a complete CogVideoX transformer.")
    layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("transformer_blocks."))
    cfg = dict(num_layers=layers, attention_head_dim=head_dim, num_attention_heads=dim // head_dim,
               text_embed_dim=text_dim, time_embed_dim=time_dim,
               attention_bias="transformer_blocks.0.attn1.to_q.bias" in shapes,
               norm_elementwise_affine="norm_final.weight" in shapes)
    if len(proj) == 4:  # 1.0: Conv2d patch embedding
        cfg.update(in_channels=proj[1], patch_size=proj[2], patch_size_t=None,
                   patch_bias="patch_embed.proj.bias" in shapes, out_channels=proj_out // proj[2] ** 2)
        learned = shapes.get("patch_embed.pos_embedding")
        if learned is not None:
            cfg.update(use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True)
            if learned[1] != RELEASED_LEARNED_TOKENS:
                raise CheckpointError(
                    f"{source}: a learned position table of {learned[1]} tokens is not the released 5b-I2V one "
                    "and its sample size cannot be read from the weights; load this model from a folder with its "
                    "config.json.")
        else:
            sincos = get_variant(variant_hint).positions == "sincos" if variant_hint else dim == 1920
            cfg.update(use_rotary_positional_embeddings=not sincos)
    else:  # 1.5: Linear patch embedding over (c, pt=2, p=2, p=2)
        cfg.update(in_channels=proj[1] // 8, patch_size=2, patch_size_t=2, patch_bias=False,
                   out_channels=proj_out // 8, use_rotary_positional_embeddings=True,
                   sample_height=300, sample_width=300, sample_frames=81)
        if "ofs_embedding.linear_1.weight" in shapes:
            cfg["ofs_embed_dim"] = shapes["ofs_embedding.linear_1.weight"][1]
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------
_FP8_WEIGHT = re.compile(r"transformer_blocks\.\d+\.(attn1\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2)|norm[12]\.linear)\.weight$")


def _is_fp8_weight(name: str) -> bool:
    """Big matmul weights that may be stored in fp8; norms, biases, embeddings and the head keep the compute dtype."""
    return _FP8_WEIGHT.match(name) is not None


def _resolve(path: str | Path) -> tuple[dict | None, list[Path], str]:
    """(config or None, weight files, description) for a folder or single file."""
    path = Path(path)
    refuse_pickle(path)
    if path.is_dir():
        if (path / "transformer").is_dir():
            path = path / "transformer"
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{path}: this folder has no config.json, so it is not a complete diffusers-format "
                                  "transformer folder. Download the folder again (config.json with the .safetensors "
                                  "weights), or point at a single .safetensors file instead.")
        cfg = read_json(cfg_file, "transformer", TRANSFORMER_DEFAULTS)
        cls = cfg.get("_class_name", "CogVideoXTransformer3DModel")
        if cls != "CogVideoXTransformer3DModel":
            raise CheckpointError(f"{path}: config.json describes a {cls}, not a CogVideoX transformer.")
        return cfg, folder_weight_files(path, "transformer"), str(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder.")
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path}: not a .safetensors file or a diffusers folder.")
    return None, [path], str(path)


def _meta_config(raw: str, source: str) -> dict:
    """The config a single file carries in its "config" metadata (our own saves do)."""
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{source}: the 'config' metadata is not valid JSON ({e}); the file is "
                              "corrupt.") from None
    return config_types(json_object(config, f"{source} ('config' metadata)"), TRANSFORMER_DEFAULTS,
                        f"{source} ('config' metadata)")


def load_transformer(path: str | Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                     *, variant: str | None = None, weight_dtype: str | torch.dtype | None = None,
                     attention: str = "sdpa", operations=None) -> CogVideoXTransformer:
    """Loads a CogVideoX transformer from a diffusers folder or a single .safetensors file.

    dtype: compute dtype (default: the file's floating dtype; bf16 for fp8 files).
    weight_dtype: "fp8_e4m3fn" stores the big matmul weights in fp8 (half the memory of bf16), computing in `dtype`;
    "fp8_e4m3fn_fast" stores them in fp8 with per-tensor scales and multiplies in fp8 where the GPU can
    (modules/fp8.py; loads in `dtype` first, then quantizes).
    variant: the expected variant ("5b", ...); a file of another variant is refused.
    operations: the layer classes to build from (modules/ops.py; e.g. a host's casting layers), default the core's.
    """
    config, files, source = _resolve(path)
    headers = [SafetensorsHeader(f) for f in files]
    keys = [k for h in headers for k in h.tensors]
    layout, prefix = ("diffusers", "") if config is not None else detect_layout(keys, source)
    if config is None:
        meta = headers[0].metadata.get("config")
        shapes = {k: tuple(v.shape) for k, v in converted(
            layout, prefix, ((k, torch.empty(s, device="meta")) for h in headers for k, s in h.shapes().items()))}
        config = _meta_config(meta, source) if meta else infer_config(shapes, source, variant)
    float_dtypes = [d for h in headers for d, _ in h.tensors.values() if d.is_floating_point]
    file_fp8 = next((d for d in float_dtypes if d.itemsize == 1), None)
    wide = [d for d in float_dtypes if d.itemsize > 1]
    file_dtype = max(set(wide), key=wide.count) if wide else torch.bfloat16
    scaled = any(k.endswith("scale_weight") for k in keys)
    fast = weight_dtype == FP8_FAST
    if fast:
        weight_dtype = None
    if isinstance(weight_dtype, str):
        if weight_dtype in ("default", "auto", "none", ""):
            weight_dtype = None
        elif weight_dtype not in FP8_DTYPES:
            raise CheckpointError(f"weight_dtype {weight_dtype!r}: use one of {', '.join(FP8_DTYPES)}, {FP8_FAST} or "
                                  "None.")
        else:
            weight_dtype = FP8_DTYPES[weight_dtype]
    if weight_dtype is None and file_fp8 is not None and not scaled:
        weight_dtype = file_fp8  # keep fp8 files in fp8
    if dtype is None:
        dtype = torch.bfloat16 if file_fp8 is not None else file_dtype
    device = torch.device(device or "cpu")

    model = build_transformer(config, device="meta", dtype=dtype, operations=operations)
    if variant is not None and get_variant(variant) is not model.variant:
        raise CheckpointError(f"{source}: this is a {model.variant.title} transformer, but a "
                              f"{get_variant(variant).title} one was expected. Pick the matching model file.")

    def dtype_for(name: str, value: torch.Tensor) -> torch.dtype:
        return weight_dtype if weight_dtype is not None and _is_fp8_weight(name) else dtype

    tensors = converted(layout, prefix, iter_tensors(headers))
    if scaled:
        tensors = _dequantize_scaled_fp8(tensors, dtype)
    unexpected = fill_module(model, tensors, source=source, dtype_for=dtype_for, device=device)
    if unexpected:
        log.warning("%s: ignored %d unexpected tensors (e.g. %s)", source, len(unexpected), ", ".join(unexpected[:3]))
    model.set_attention_backend(attention)
    if fast:
        from ..modules.fp8 import to_fp8_fast

        to_fp8_fast(model, names=_is_fp8_weight)
    model.name = model_name(path)
    return model.eval().requires_grad_(False)


def model_name(path: str | Path) -> str:
    """A model's own name for messages: its folder's (also for its transformer/ folder) or its file's stem."""
    path = Path(path).resolve()
    if path.is_file():
        return path.stem
    return path.parent.name if path.name == "transformer" else path.name


def _dequantize_scaled_fp8(items, dtype):
    """ComfyUI "scaled fp8" files store weight / scale in fp8 plus a `scale_weight`: give back weight * scale."""
    pending: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for key, value in items:
        if key.endswith("scaled_fp8") or key.endswith("scale_input"):
            continue
        if key.endswith(".scale_weight"):
            base = key[: -len("scale_weight")] + "weight"
            if base in pending:
                yield base, pending.pop(base).to(dtype) * value.to(dtype)
            else:
                scales[base] = value
            continue
        if key in scales:
            yield key, value.to(dtype) * scales.pop(key).to(dtype)
        elif value.dtype.itemsize == 1 and key.endswith(".weight"):
            pending[key] = value
        else:
            yield key, value
    yield from pending.items()
