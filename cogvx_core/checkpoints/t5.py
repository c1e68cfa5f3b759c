"""T5 v1.1 encoders (the CogVideoX text encoder) and their tokenizers, from every layout users keep them in.

Model layouts:
  * a diffusers model folder (`text_encoder/` with config.json and one or sharded .safetensors, `tokenizer/`), or the
    `text_encoder/` folder itself;
  * one .safetensors file as ComfyUI users keep it in models/text_encoders (`t5xxl_fp16`, `t5xxl_fp8_e4m3fn`,
    `t5xxl_fp8_e4m3fn_scaled`, `google_t5-v1_1-xxl_encoderonly-*`), with the plain transformers key names
    (`shared.weight`, `encoder.block.N.layer.0.SelfAttention.q.weight`, ...) under any prefix
    (`text_encoders.t5xxl.transformer.`, `t5xxl.transformer.`, `text_encoder.`, ...), or with the `encoder.` level
    dropped (`block.N...`, `embed_tokens.weight`). A single file has no config: it is read from the tensor shapes.

fp8 storage is dequantised to the compute dtype while loading: plain fp8 by a cast, ComfyUI's "scaled fp8" by
`weight * scale_weight` (the legacy `scaled_fp8` marker) or `weight * weight_scale` (the newer `comfy_quant` layers).

The model is the transformers `T5EncoderModel`, built on the meta device and filled tensor by tensor in its final
dtype, as `T5EncoderModel.from_pretrained(torch_dtype=...)` would leave it: in float16 the feed-forward output
projections (`wo`) stay in float32, transformers' `_keep_in_fp32_modules` rule, which T5 v1.1 needs to not overflow.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..errors import CheckpointError, CogVXError
from ..modules import ops as core_ops
from .io import SafetensorsHeader, fill_module, folder_weight_files, read_json, refuse_pickle

logger = logging.getLogger(__name__)

# The tensor every T5 encoder stack has exactly once; finding it finds the stack's key prefix.
_ANCHOR = "block.0.layer.0.SelfAttention.relative_attention_bias.weight"
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")  # ComfyUI `comfy_quant` formats that are one scale per weight
# Quantisation side tensors next to a weight (read by the dequantiser, never loaded as parameters).
_QUANT_SUFFIXES = (".scale_weight", ".weight_scale", ".weight_scale_2", ".scale_input", ".input_scale", ".comfy_quant")
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
TOKENIZER_HINT = ("a T5 tokenizer folder (one with tokenizer.json or spiece.model), e.g. the `tokenizer/` folder of "
                  "THUDM/CogVideoX-2b or ComfyUI's comfy/text_encoders/t5_tokenizer")


# ---------------------------------------------------------------------------------------------------------------------
# Key layout


@dataclass(frozen=True)
class T5KeyLayout:
    """Where the encoder's tensors are in a checkpoint: `stack` is the prefix of `block.N...` and `final_layer_norm`,
    `root` the prefix of `shared.weight` (the token embedding may also be `{stack}embed_tokens.weight`)."""

    stack: str
    root: str

    def canonical(self, key: str) -> str | None:
        """The transformers `T5EncoderModel` name of a checkpoint key, or None for keys that are not the encoder's
        (a decoder, other text encoders, a diffusion model sharing the file, quantisation side tensors)."""
        if key == f"{self.root}shared.weight" or key == f"{self.stack}embed_tokens.weight":
            return "shared.weight"
        if key.startswith(self.stack) and not key.endswith(_QUANT_SUFFIXES):
            rest = key[len(self.stack):]
            if rest.startswith("block.") or rest.startswith("final_layer_norm."):
                return "encoder." + rest
        return None


def find_t5_layout(keys, source: str) -> T5KeyLayout:
    """Finds the T5 encoder stack among `keys` (a checkpoint may also hold a decoder, CLIP, or a whole model)."""
    stacks = [k[: -len(_ANCHOR)] for k in keys if k.endswith(_ANCHOR)]
    stacks = [s for s in stacks if not s.endswith("decoder.")]
    if not stacks:
        raise CheckpointError(
            f"{source}: no T5 encoder in this file (no tensor named *{_ANCHOR}). It is not a T5 text encoder: give "
            "a T5-XXL encoder such as t5xxl_fp16.safetensors, t5xxl_fp8_e4m3fn.safetensors, or the text_encoder/ "
            "folder of a diffusers CogVideoX model.")
    if len(stacks) > 1:
        named = [s for s in stacks if "t5" in s.lower()]
        if len(named) != 1:
            raise CheckpointError(
                f"{source}: holds {len(stacks)} T5 encoder stacks ({', '.join(repr(s) for s in stacks)}), so it is "
                "unclear which one is the text encoder. Extract the T5-XXL encoder into its own file.")
        stacks = named
    stack = stacks[0]
    root = stack[: -len("encoder.")] if stack.endswith("encoder.") else stack
    return T5KeyLayout(stack=stack, root=root)


def t5_config_from_shapes(shapes: dict[str, tuple[int, ...]], layout: T5KeyLayout, source: str):
    """The T5Config of an encoder-only checkpoint, read from its tensor shapes (T5 v1.1 defaults for the rest)."""
    from transformers import T5Config

    canon = {layout.canonical(k): s for k, s in shapes.items()}
    canon.pop(None, None)

    def need(name: str) -> tuple[int, ...]:
        if name not in canon:
            raise CheckpointError(f"{source}: the T5 tensor {name} is missing; the file is incomplete or is not a "
                                  "T5 encoder. Download it again.")
        return canon[name]

    vocab_size, d_model = need("shared.weight")
    num_buckets, num_heads = need("encoder." + _ANCHOR)
    inner_dim = need("encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    if inner_dim % num_heads:
        raise CheckpointError(f"{source}: attention width {inner_dim} is not a multiple of the {num_heads} heads "
                              "that relative_attention_bias has; the file is not a T5 encoder.")
    num_layers = 1 + max(int(m.group(1)) for k in canon if (m := re.match(r"encoder\.block\.(\d+)\.", k)))
    if "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in canon:  # v1.1: gated GELU, wi_0 * wi_1
        d_ff, feed_forward_proj = canon["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0], "gated-gelu"
    else:  # the original T5: one ReLU projection
        d_ff, feed_forward_proj = need("encoder.block.0.layer.1.DenseReluDense.wi.weight")[0], "relu"
    return T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=inner_dim // num_heads, d_ff=d_ff, num_layers=num_layers,
        num_heads=num_heads, relative_attention_num_buckets=num_buckets, relative_attention_max_distance=128,
        feed_forward_proj=feed_forward_proj, layer_norm_epsilon=1e-6, dropout_rate=0.0,
        is_encoder_decoder=False, use_cache=False)


# ---------------------------------------------------------------------------------------------------------------------
# Reading tensors, with fp8 dequantisation


def _quant_formats(headers: list[SafetensorsHeader], layout: T5KeyLayout) -> dict[str, str]:
    """canonical layer name -> ComfyUI quantisation format, from `.comfy_quant` tensors or `_quantization_metadata`."""
    from safetensors import safe_open

    formats = {}
    for h in headers:
        meta = h.metadata.get("_quantization_metadata")
        if meta:
            try:
                layers = json.loads(meta).get("layers", {})
            except (json.JSONDecodeError, AttributeError) as e:
                raise CheckpointError(f"{h.path}: its _quantization_metadata is not valid JSON ({e}); the file is "
                                      "corrupt. Download it again.")
            for layer, conf in layers.items():
                name = layout.canonical(layer + ".weight")
                if name:
                    formats[name[: -len(".weight")]] = conf.get("format") if isinstance(conf, dict) else conf
        quant_keys = [k for k in h.tensors if k.endswith(".comfy_quant")]
        if quant_keys:
            with safe_open(str(h.path), framework="pt", device="cpu") as f:
                for k in quant_keys:
                    name = layout.canonical(k[: -len(".comfy_quant")] + ".weight")
                    if name:
                        conf = json.loads(f.get_tensor(k).numpy().tobytes())
                        formats[name[: -len(".weight")]] = conf.get("format")
    return formats


def _weight_scales(headers: list[SafetensorsHeader], layout: T5KeyLayout) -> dict[str, torch.Tensor]:
    """canonical weight name -> its fp8 dequantisation scale (float32): `X.scale_weight` (ComfyUI's legacy scaled fp8)
    or `X.weight_scale` (its newer `comfy_quant` layers)."""
    from safetensors import safe_open

    scales = {}
    for h in headers:
        keys = [k for k in h.tensors if k.endswith((".scale_weight", ".weight_scale"))]
        if not keys:
            continue
        with safe_open(str(h.path), framework="pt", device="cpu") as f:
            for k in keys:
                name = layout.canonical(k.rsplit(".", 1)[0] + ".weight")
                if name:
                    scales[name] = f.get_tensor(k).to(torch.float32)
    return scales


def _dequantise(name: str, weight: torch.Tensor, scale: torch.Tensor, source: str) -> torch.Tensor:
    if scale.numel() == 1:
        scale = scale.reshape(())
    elif scale.numel() == weight.shape[0]:  # one scale per output row
        scale = scale.reshape(-1, *([1] * (weight.ndim - 1)))
    else:
        raise CheckpointError(
            f"{source}: {name} has a scale of shape {tuple(scale.shape)} for a weight of shape {tuple(weight.shape)} "
            "(block-wise quantisation), which CogVX cannot dequantise. Use t5xxl_fp16.safetensors or "
            "t5xxl_fp8_e4m3fn_scaled.safetensors instead.")
    return weight.to(torch.float32) * scale  # float32: one rounding, to the target dtype, in fill_module


def iter_t5_tensors(headers: list[SafetensorsHeader], layout: T5KeyLayout, source: str
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """(transformers name, tensor) for each encoder tensor, memory-mapped and fp8-dequantised one at a time. The
    token embedding comes once, as `shared.weight`, whichever of its two names the file uses."""
    from safetensors import safe_open

    formats = _quant_formats(headers, layout)
    bad = {layer: fmt for layer, fmt in formats.items() if fmt not in _FP8_FORMATS}
    if bad:
        layer, fmt = next(iter(bad.items()))
        raise CheckpointError(
            f"{source}: {len(bad)} layers (e.g. {layer}) are quantised as {fmt!r}, which CogVX cannot dequantise "
            f"(it reads {', '.join(_FP8_FORMATS)} with per-tensor scales). Use t5xxl_fp16.safetensors or "
            "t5xxl_fp8_e4m3fn_scaled.safetensors instead.")
    scales = _weight_scales(headers, layout)
    seen = set()
    for h in headers:
        with safe_open(str(h.path), framework="pt", device="cpu") as f:
            for key in f.keys():
                name = layout.canonical(key)
                if name is None or name in seen:
                    continue
                seen.add(name)
                value = f.get_tensor(key)
                if not value.is_floating_point():
                    raise CheckpointError(
                        f"{source}: {key} is stored as {value.dtype}, a quantised format CogVX does not read. Use "
                        "t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn(_scaled).safetensors instead.")
                if name in scales:
                    value = _dequantise(key, value, scales[name], source)
                yield name, value


def storage_dtype(headers: list[SafetensorsHeader], layout: T5KeyLayout) -> torch.dtype:
    """The dtype a checkpoint keeps its attention weights in; fp8 storage computes in bfloat16."""
    for h in headers:
        for key, (dtype, _) in h.tensors.items():
            if layout.canonical(key) == "encoder.block.0.layer.0.SelfAttention.q.weight":
                return torch.bfloat16 if dtype in _FP8_DTYPES else dtype
    return torch.float32


# ---------------------------------------------------------------------------------------------------------------------
# Building the model


def _keeps_fp32(name: str) -> bool:
    """transformers keeps T5's `_keep_in_fp32_modules` (the FF output `wo`) in float32 when loading in float16."""
    from transformers import T5EncoderModel

    modules = getattr(T5EncoderModel, "_keep_in_fp32_modules", None) or ("wo",)
    return any(m in name.split(".") for m in modules)


# Matmul weights that may be stored in fp8 (computed in `dtype` by the operations' Linear). Not `wo`: transformers
# casts the FF activations to wo's dtype, and not the embeddings or norms.
_FP8_STORABLE = re.compile(
    r"encoder\.block\.\d+\.layer\.\d+\.(SelfAttention\.[qkvo]|DenseReluDense\.wi(_[01])?)\.weight$")


def build_t5_encoder(config, tensors, *, dtype: torch.dtype, device: torch.device | str, source: str,
                     operations=None, weight_dtype: torch.dtype | None = None):
    """A `T5EncoderModel` built on the meta device and filled from `tensors` in `dtype` (float16 keeps `wo` in float32,
    as transformers does), in eval mode without gradients. Its Linear and Embedding layers take the classes of
    `operations` (default the core's, which compute in the input's dtype); `weight_dtype` (an fp8 dtype) stores the
    attention and FF input weights in it, half the memory of bf16."""
    from transformers import T5EncoderModel

    with torch.device("meta"):
        model = core_ops.adopt(T5EncoderModel(config), operations)

    def dtype_for(name: str, value: torch.Tensor) -> torch.dtype:
        if weight_dtype is not None and _FP8_STORABLE.match(name):
            return weight_dtype
        return torch.float32 if dtype == torch.float16 and _keeps_fp32(name) else dtype

    unexpected = fill_module(model, tensors, source=source, dtype_for=dtype_for, device=device, strict=False)
    if unexpected:
        logger.warning("%s: ignored %d tensors that a T5 encoder does not have (e.g. %s)", source, len(unexpected),
                       ", ".join(unexpected[:3]))
    # The stack's embedding is the shared one (transformers ties them); the files store it once.
    model.encoder.embed_tokens.weight = model.shared.weight
    missing = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if missing:
        raise CheckpointError(
            f"{source}: {len(missing)} T5 tensors are missing (e.g. {', '.join(missing[:3])}); the file is incomplete "
            "or is not a T5 encoder. Download it again.")
    return model.eval().requires_grad_(False)


def load_t5_encoder(path: str | os.PathLike, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                    operations=None, weight_dtype: torch.dtype | None = None):
    """A transformers `T5EncoderModel` from a diffusers model folder, its `text_encoder/` folder, or one .safetensors
    file. `dtype=None` keeps the checkpoint's own dtype (bfloat16 for fp8 storage). `operations`, `weight_dtype`: see
    `build_t5_encoder`."""
    path = Path(path)
    refuse_pickle(path)
    if path.is_dir():
        folder = path / "text_encoder" if (path / "text_encoder").is_dir() else path
        config = _folder_config(folder)
        headers = [SafetensorsHeader(f) for f in folder_weight_files(folder, "T5 text encoder")]
        source = str(folder)
    elif path.is_file():
        headers = [SafetensorsHeader(path)]
        config = None
        source = str(path)
    else:
        raise CheckpointError(f"{path}: no such file or folder. Give a T5 encoder .safetensors file (e.g. "
                              "models/text_encoders/t5xxl_fp16.safetensors) or a diffusers CogVideoX model folder.")
    keys = [k for h in headers for k in h.tensors]
    layout = find_t5_layout(keys, source)
    if config is None:
        config = t5_config_from_shapes({k: s for h in headers for k, s in h.shapes().items()}, layout, source)
    dtype = dtype or storage_dtype(headers, layout)
    return build_t5_encoder(config, iter_t5_tensors(headers, layout, source), dtype=dtype, device=device,
                            source=source, operations=operations, weight_dtype=weight_dtype)


def _folder_config(folder: Path):
    from transformers import T5Config

    raw = read_json(folder / "config.json", "T5 text encoder")
    if raw.get("model_type", "t5") != "t5":
        raise CheckpointError(f"{folder}: config.json describes a {raw.get('model_type')!r} model, not a T5 encoder. "
                              "Give the text_encoder/ folder of a CogVideoX model (T5 v1.1 XXL).")
    config = T5Config.from_dict(raw)
    config.is_encoder_decoder, config.use_cache = False, False
    return config


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer


def is_tokenizer_folder(folder: Path) -> bool:
    return folder.is_dir() and any((folder / n).is_file() for n in TOKENIZER_FILES)


def find_tokenizer_folder(model_path: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> Path:
    """The tokenizer folder for a T5 checkpoint: `tokenizer` if given (or its `tokenizer/` sub-folder), else the one
    that belongs to the model (`tokenizer/` beside `text_encoder/`, or beside a single file)."""
    if tokenizer is not None:
        candidates = [Path(tokenizer), Path(tokenizer) / "tokenizer"]
    else:
        p = Path(model_path)
        if p.is_dir():
            candidates = [p / "tokenizer", p, p.parent / "tokenizer"]
        else:
            candidates = [p.parent / "tokenizer", p.parent]
    for c in candidates:
        if is_tokenizer_folder(c):
            return c
    looked = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise CogVXError(f"No T5 tokenizer for {model_path}: looked in {looked} for {' or '.join(TOKENIZER_FILES)}. "
                     f"Give {TOKENIZER_HINT}.")


def load_t5_tokenizer(folder: str | os.PathLike):
    """The tokenizer diffusers' CogVideoXPipeline uses: `T5Tokenizer` for a folder with spiece.model (the diffusers
    layout), `T5TokenizerFast` for one with only tokenizer.json (ComfyUI's bundled t5_tokenizer)."""
    import transformers
    from transformers import T5Tokenizer, T5TokenizerFast

    folder = Path(folder)
    if not is_tokenizer_folder(folder):
        raise CogVXError(f"{folder}: not a T5 tokenizer folder (no {' or '.join(TOKENIZER_FILES)}). Give "
                         f"{TOKENIZER_HINT}.")
    spiece_only = not (folder / "tokenizer.json").is_file()
    major = int(transformers.__version__.split(".")[0])
    if spiece_only and major >= 5 and importlib.util.find_spec("google.protobuf") is None:
        raise CogVXError(
            f"{folder}: this tokenizer is only a spiece.model, which transformers {transformers.__version__} can read "
            "only with the protobuf package. Install it (pip install protobuf), or give a tokenizer folder with "
            "tokenizer.json, such as ComfyUI's comfy/text_encoders/t5_tokenizer.")
    cls = T5Tokenizer if (folder / "spiece.model").is_file() else T5TokenizerFast
    try:
        return cls.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, ImportError, RuntimeError) as e:
        raise CogVXError(f"{folder}: could not load the T5 tokenizer ({e}). Give {TOKENIZER_HINT}.") from e
