"""LoRA files: every layout published for CogVideoX, read into one form keyed by the diffusers module names.

Layouts (after a known prefix is stripped: `transformer.`, `diffusion_model.`, `model.diffusion_model.`, `lora_unet_`,
`lora_transformer_`, `base_model.model.`):
  peft / diffusers  transformer_blocks.0.attn1.to_q.lora_A.weight / .lora_B.weight; old diffusers .lora.down/.lora.up,
                    .lora_layer.down/up, .lora_linear_layer.down/up
  kohya             lora_unet_transformer_blocks_0_attn1_to_q.lora_down.weight / .lora_up.weight / .alpha
  ComfyUI native    diffusion_model.blocks.0.q.lora_down.weight (or lora_A / lora_B) / .alpha
  SAT               model.diffusion_model.transformer.layers.0.attention.query_key_value.matrix_A.0..2 / matrix_B.0..2
                    (SAT's fused-QKV LoRA keeps one down and one up per q, k, v),
                    attention.dense.matrix_A.0 / matrix_B.0

Scale = alpha / rank. alpha comes from, in this order: the layer's `.alpha` tensor, an `alpha_pattern` entry or
`lora_alpha` in the peft config the file's metadata carries (diffusers' `lora_adapter_metadata` JSON, finetrainers'
`lora_config` JSON), a flat metadata value (`cogvx.alpha`, `lora_alpha`, `ss_network_alpha`). With no alpha anywhere the
scale is 1 (alpha = rank), as diffusers and ComfyUI assume; SAT keys are the exception: SAT's LoraMixin trains at
lora_alpha = 1, i.e. scale 1/rank.
"""

from __future__ import annotations

import json
import logging
import math
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checks import finite_tensor
from ..errors import CheckpointError, CogVXError
from .io import SafetensorsHeader, iter_tensors
from .transformer import COMFY_BLOCK_NAMES, COMFY_TOP_NAMES, detect_layout

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# The layers a CogVideoX LoRA can target, and every spelling of their names
# ---------------------------------------------------------------------------------------------------------------
BLOCK_LAYERS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2",
                "norm1.linear", "norm2.linear")
TOP_LAYERS = ("patch_embed.proj", "patch_embed.text_proj", "time_embedding.linear_1", "time_embedding.linear_2",
              "ofs_embedding.linear_1", "ofs_embedding.linear_2", "norm_out.linear", "proj_out")
_QKV = ("attn1.to_q", "attn1.to_k", "attn1.to_v")
FUSED_QKV = "<qkv>"  # SAT's query_key_value: one layer in the file, three here


def _spellings(names: dict[str, str]) -> dict[str, str]:
    """{spelling: diffusers name} with the kohya spelling (dots as underscores) of each name added."""
    out = {}
    for alias, target in names.items():
        for spelling in (alias, alias.replace(".", "_")):
            if out.setdefault(spelling, target) != target:
                raise AssertionError(f"ambiguous LoRA layer spelling {spelling!r}")
    return out


_BLOCK_ALIASES = _spellings({
    **{n: n for n in BLOCK_LAYERS},
    **{comfy: diff for comfy, diff in COMFY_BLOCK_NAMES.items() if diff in BLOCK_LAYERS},  # q, k, v, attn_out, ..
    "attention.dense": "attn1.to_out.0", "mlp.dense_h_to_4h": "ff.net.0.proj", "mlp.dense_4h_to_h": "ff.net.2",  # SAT
    "attention.query_key_value": FUSED_QKV,
    "attn1.to_out": "attn1.to_out.0",  # old attention-processor LoRAs name the projection without its index
})
_TOP_ALIASES = _spellings({**{n: n for n in TOP_LAYERS}, **COMFY_TOP_NAMES,
                           "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
                           "mixins.final_layer.linear": "proj_out"})
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "lora_unet_",
             "lora_transformer_", "unet.")
_BLOCK = re.compile(r"(?:transformer_blocks|blocks|layers)[._](\d+)[._](.+)")


def layer_name(module_path: str) -> str | None:
    """The diffusers name of the layer a LoRA key's module path means (any layout), FUSED_QKV-suffixed for SAT's
    fused projection, or None when it names no CogVideoX layer."""
    path = module_path
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if path.startswith(prefix):
                path, stripped = path[len(prefix):], True
    path = path.replace(".processor.", ".")
    m = _BLOCK.fullmatch(path)
    if m:
        target = _BLOCK_ALIASES.get(m.group(2))
        return None if target is None else f"transformer_blocks.{m.group(1)}.{target}"
    return _TOP_ALIASES.get(path)


# (regex on a key, role): the module path is group 1
_KEY_FORMS = [
    (re.compile(r"(.+?)\.(?:lora_A|lora_down|lora\.down|lora_layer\.down|lora_linear_layer\.down)(?:\.default)?"
                r"(?:\.weight)?"), "down"),
    (re.compile(r"(.+?)\.(?:lora_B|lora_up|lora\.up|lora_layer\.up|lora_linear_layer\.up)(?:\.default)?"
                r"(?:\.weight)?"), "up"),
    (re.compile(r"(.+?)_lora\.down\.weight"), "down"),  # old attention-processor LoRAs: to_q_lora.down.weight
    (re.compile(r"(.+?)_lora\.up\.weight"), "up"),
    (re.compile(r"(.+)\.alpha"), "alpha"),
    (re.compile(r"(.+)\.matrix_A\.(\d+)"), "sat_down"),
    (re.compile(r"(.+)\.matrix_B\.(\d+)"), "sat_up"),
]
# keys of LoRA-like adapters we recognise but do not apply
_UNSUPPORTED = re.compile(r"\.(diff|diff_b|dora_scale|lora_mid\.weight|hada_\w+|lokr_\w+|oft_\w+|lora_magnitude_vector"
                          r"|lora_B\.bias)$")


# ---------------------------------------------------------------------------------------------------------------
# The normalised form
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraLayer:
    """One layer's LoRA: delta W = (alpha / rank) * up @ down."""

    down: torch.Tensor  # (r, in) for a Linear, (r, in, kh, kw) for a Conv2d
    up: torch.Tensor  # (out, r), (out, r, 1, 1) for a Conv2d
    alpha: float | None  # None: scale 1 (alpha = rank)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape of the weight this LoRA adds to."""
        return (self.up.shape[0], *self.down.shape[1:])


@dataclass
class Lora:
    """A LoRA file, normalised: {diffusers layer name: LoraLayer} plus the keys that name no CogVideoX layer."""

    layers: dict[str, LoraLayer]
    unmatched: list[str] = field(default_factory=list)
    source: str = "<memory>"
    layout: str = "peft"  # "peft", "kohya", "comfy" or "sat": the naming most of its keys use
    metadata: dict[str, str] = field(default_factory=dict)
    identity: tuple = field(default_factory=lambda: ("memory", uuid.uuid4().hex))  # same file unchanged: same id
    notes: list[str] = field(default_factory=list)  # warnings for the user (a missing, NaN or zero alpha)

    @property
    def name(self) -> str:
        return Path(self.source).stem if self.source != "<memory>" else "lora"

    @property
    def ranks(self) -> list[int]:
        return sorted({layer.rank for layer in self.layers.values()})

    def __repr__(self) -> str:
        return (f"Lora({self.name!r}, {len(self.layers)} layers, rank {'/'.join(map(str, self.ranks))}, "
                f"layout {self.layout}, {len(self.unmatched)} unmatched keys)")


# ---------------------------------------------------------------------------------------------------------------
# Alpha from metadata
# ---------------------------------------------------------------------------------------------------------------
def _float(value) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _peft_config(metadata: dict[str, str]) -> dict:
    """The peft LoraConfig fields a file's metadata carries (diffusers' JSON, with or without `transformer.`)."""
    for key in ("lora_adapter_metadata", "transformer_lora_adapter_metadata", "lora_config"):
        raw = metadata.get(key)
        if not raw:
            continue
        try:
            cfg = json.loads(raw)
        except json.JSONDecodeError:
            log.debug("LoRA metadata %s is not JSON; ignored", key)
            continue
        if not isinstance(cfg, dict):
            continue
        prefixed = {k[len("transformer."):]: v for k, v in cfg.items() if k.startswith("transformer.")}
        return prefixed or cfg
    return {}


class _AlphaRule:
    """alpha for a layer from file metadata: peft's alpha_pattern, then lora_alpha, then flat keys."""

    def __init__(self, metadata: dict[str, str], default: float | None):
        cfg = _peft_config(metadata)
        self.pattern = {k: _float(v) for k, v in (cfg.get("alpha_pattern") or {}).items()}
        self.alpha = _float(cfg.get("lora_alpha"))
        if self.alpha is None:
            for key in ("cogvx.alpha", "lora_alpha", "alpha", "ss_network_alpha"):
                self.alpha = _float(metadata.get(key))
                if self.alpha is not None:
                    break
        self.rslora = bool(cfg.get("use_rslora"))
        self.default = default

    def __call__(self, name: str, rank: int) -> float | None:
        alpha = self.alpha
        for pattern, value in self.pattern.items():  # peft matches a pattern at the end of the module name
            if value is not None and re.fullmatch(rf"(.*\.)?({pattern})", name):
                alpha = value
                break
        if alpha is None:
            return self.default
        return alpha * math.sqrt(rank) if self.rslora else alpha  # rsLoRA scales by alpha / sqrt(rank)


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------
def _layout_of(keys: list[str]) -> str:
    votes = {"sat": sum(".matrix_" in k for k in keys),
             "kohya": sum(k.startswith(("lora_unet_", "lora_transformer_")) for k in keys),
             "comfy": sum(bool(re.search(r"(^|\.)blocks\.\d+\.", k)) and "transformer_blocks" not in k for k in keys)}
    best = max(votes, key=votes.get)
    return best if votes[best] else "peft"


def _describe_non_lora(keys: list[str], source: str) -> str:
    try:
        detect_layout(keys, source)
    except CheckpointError as e:
        return str(e)
    return (f"{source}: this is a full CogVideoX transformer checkpoint, not a LoRA; load it as the model "
            f"(CogVXModelLoader / --model), or pick a LoRA file.")


def read_lora(path: str | Path) -> Lora:
    """Reads a LoRA .safetensors file (any layout) into its normalised form. Never unpickles."""
    path = Path(path)
    header = SafetensorsHeader(path)  # refuses pickles, validates the header
    source = str(path)
    stat = path.stat()
    lora = lora_from_state_dict(dict(iter_tensors([header])), header.metadata, source=source)
    lora.identity = ("file", str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    return lora


def lora_from_state_dict(state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, *,
                         source: str = "<memory>") -> Lora:
    """Normalises a LoRA state dict in any layout (see the module docstring); `metadata` as safetensors stores it."""
    metadata = dict(metadata or {})
    keys = list(state)
    layout = _layout_of(keys)
    alpha_rule = _AlphaRule(metadata, default=1.0 if layout == "sat" else None)

    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}  # name -> role -> (file key, tensor)
    unmatched: list[str] = []
    unsupported: list[str] = []
    lora_like = 0

    def put(name: str, role: str, key: str, value: torch.Tensor) -> None:
        slot = parts.setdefault(name, {})
        if role in slot:
            raise CheckpointError(f"{source}: keys {slot[role][0]} and {key} both give the {role} weights of layer "
                                  f"{name}; the file mixes two layouts. Keep one of them.")
        slot[role] = (key, value)

    for key in keys:
        value = state[key]
        if _UNSUPPORTED.search(key):
            lora_like += 1
            unsupported.append(key)
            unmatched.append(f"{key} (not a LoRA down/up weight; not applied)")
            continue
        for form, role in _KEY_FORMS:
            m = form.fullmatch(key)
            if m:
                break
        else:
            unmatched.append(key)
            continue
        lora_like += 1
        name = layer_name(m.group(1))
        if name is None:
            unmatched.append(key)
            continue
        if role.startswith("sat_"):  # matrix_A.i / matrix_B.i: part i of a (possibly fused) projection
            i = int(m.group(2))
            role = role[4:]
            if name.endswith(FUSED_QKV):
                if i > 2:
                    unmatched.append(key)
                    continue
                name = name.replace(FUSED_QKV, _QKV[i])
            elif i != 0:
                unmatched.append(key)
                continue
        put(name, role, key, value)

    if not lora_like:
        raise CheckpointError(_describe_non_lora(keys, source))

    layers: dict[str, LoraLayer] = {}
    for name, slot in parts.items():
        if "down" not in slot or "up" not in slot:
            unmatched.extend(f"{k} (its down/up partner is missing)" for k, _ in slot.values())
            continue
        (down_key, down), (up_key, up) = slot["down"], slot["up"]
        alpha = _float(slot["alpha"][1].float().reshape(-1)[0]) if "alpha" in slot else None
        if name.endswith(FUSED_QKV):  # a fused-QKV LoRA with one up for all three: split the up's rows
            if up.shape[0] % 3:
                raise CheckpointError(f"{source}: {up_key} has {up.shape[0]} rows, which cannot be split into q, k "
                                      "and v; the file is corrupt or not a CogVideoX LoRA.")
            for sub, up_part in zip(_QKV, up.chunk(3, dim=0)):
                sub_name = name.replace(FUSED_QKV, sub)
                layers[sub_name] = _layer(sub_name, down, up_part.contiguous(), alpha, alpha_rule, source, down_key,
                                          up_key)
            continue
        layers[name] = _layer(name, down, up, alpha, alpha_rule, source, down_key, up_key)

    if not layers and unsupported:
        raise CogVXError(f"{source}: this file holds adapter weights of a kind CogVX does not apply (e.g. "
                         f"{unsupported[0]}): only LoRA down/up pairs are supported. Use a plain LoRA.")
    if not layers:
        sample = ", ".join(sorted(keys)[:3])
        raise CogVXError(f"{source}: this LoRA matches no CogVideoX layer: it was made for another base model (its "
                         f"keys look like {sample}). Use a LoRA trained on CogVideoX.")
    return Lora(layers=dict(sorted(layers.items(), key=lambda kv: _natural(kv[0]))), unmatched=unmatched,
                source=source, layout=layout, metadata=metadata, notes=_alpha_notes(parts, layers, metadata, layout))


def _alpha_notes(parts: dict, layers: dict[str, LoraLayer], metadata: dict[str, str], layout: str) -> list[str]:
    """A missing, NaN, zero or negative alpha changes the LoRA's strength without a word otherwise."""
    notes = []
    bad = [slot["alpha"][0] for slot in parts.values() if "alpha" in slot
           and _float(slot["alpha"][1].float().reshape(-1)[0]) is None]
    bad += [f"metadata {k}={metadata[k]!r}" for k in ("cogvx.alpha", "lora_alpha", "alpha", "ss_network_alpha")
            if k in metadata and _float(metadata[k]) is None]
    if bad:
        notes.append(f"alpha is not a finite number ({', '.join(bad[:3])}); those layers use scale 1 (alpha = rank). "
                     "The file is damaged or was saved by a broken tool; check the LoRA's effect.")
    elif layout != "sat" and any(layer.alpha is None for layer in layers.values()):
        notes.append("the file gives no alpha; scale 1 (alpha = rank) is assumed, as diffusers and ComfyUI do. If the "
                     "LoRA looks too strong or too weak, lower or raise its strength.")
    off = sorted(n for n, layer in layers.items() if layer.alpha is not None and layer.alpha <= 0)
    if off:
        what = "zero, so these layers do nothing" if all(layers[n].alpha == 0 for n in off) else \
            "zero or negative (a negative alpha inverts the LoRA)"
        notes.append(f"alpha of {len(off)} layer(s) (e.g. {off[0]}) is {what}; the file may be damaged.")
    return notes


def _layer(name, down, up, alpha, alpha_rule, source, down_key, up_key) -> LoraLayer:
    conv = down.ndim == 4
    if down.ndim not in (2, 4) or up.ndim != down.ndim or (conv and up.shape[2:] != (1, 1)):
        raise CheckpointError(f"{source}: layer {name} has LoRA shapes {tuple(down.shape)} ({down_key}) and "
                              f"{tuple(up.shape)} ({up_key}), which are not a LoRA pair (down (r, in), up (out, r)).")
    if down.shape[0] != up.shape[1]:
        raise CheckpointError(f"{source}: layer {name}: the down weight {down_key} has rank {down.shape[0]} but the up "
                              f"weight {up_key} has rank {up.shape[1]}; the file is corrupt.")
    finite_tensor(down, down_key, source)
    finite_tensor(up, up_key, source)
    if alpha is None:
        alpha = alpha_rule(name, down.shape[0])
    return LoraLayer(down=down, up=up, alpha=alpha)


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
