"""LoRAs on a loaded CogVideoX transformer: applied and re-weighted without reloading it, trained, and saved.

A LoRA lives beside its layer, never inside the layer's weight: each target Linear / Conv2d gets a `lora_adapters`
list and one forward hook that adds  sum_i strength_i * (alpha_i / rank_i) * up_i(down_i(x))  to the layer's output,
in the input's dtype. So fp8-stored weights keep working, a new strength is one float, and removing the LoRAs gives
the exact base model back. `fuse=True` adds the deltas into the (non-fp8) weights instead, for speed.

    report = apply_loras(model, [("style.safetensors", 0.8), (load_lora("motion.safetensors"), -0.5)])
    apply_loras(model, [("style.safetensors", 0.3), ...])   # same files: only the strengths change
    remove_loras(model)

Training (the trainer builds on this):
    params = add_trainable_lora(model, rank=64, alpha=32)         # peft init: A kaiming-uniform, B zeros
    ...
    save_lora("out.safetensors", model, variant="5b")             # diffusers/peft layout + metadata
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from .checkpoints.lora import Lora, LoraLayer, lora_from_state_dict, read_lora
from .errors import CheckpointError, CogVXError
from .safe_write import atomic_path

log = logging.getLogger(__name__)

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TRAINABLE = ("trainable",)  # the key of the one trainable adapter per layer
FORMAT_VERSION = "1"
# the metadata keys save_lora writes itself
WRITTEN_KEYS = frozenset({"format", "lora_adapter_metadata", "cogvx.format_version", "cogvx.rank", "cogvx.alpha",
                          "cogvx.targets", "cogvx.base_variant"})
_MAX_LISTED = 20


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------
def load_lora(path: str | os.PathLike) -> Lora:
    """A LoRA file (any layout, see checkpoints/lora.py) or a diffusers LoRA folder, normalised."""
    path = Path(path)
    if path.is_dir():
        files = [path / "pytorch_lora_weights.safetensors"]
        if not files[0].is_file():
            files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise CheckpointError(f"{path}: a LoRA folder needs exactly one .safetensors file (found "
                                  f"{len(files)}); point at the file itself.")
        path = files[0]
    return read_lora(path)


# ---------------------------------------------------------------------------------------------------------------
# One LoRA on one layer
# ---------------------------------------------------------------------------------------------------------------
class LoraAdapter(nn.Module):
    """down (r, in[, kh, kw]) and up (out, r[, 1, 1]); adds strength * alpha / r * up(down(x)) to its layer."""

    def __init__(self, key: tuple, down: torch.Tensor, up: torch.Tensor, alpha: float | None, strength: float = 1.0,
                 trainable: bool = False, name: str = ""):
        super().__init__()
        self.key = key
        self.name = name
        self.alpha = alpha  # None: scale 1
        self.strength = strength
        self.fused = 0.0  # the multiplier currently merged into the layer's weight
        if trainable:
            self.down, self.up = nn.Parameter(down), nn.Parameter(up)
        else:  # not in the model's state_dict, but moved by model.to()
            self.register_buffer("down", down, persistent=False)
            self.register_buffer("up", up, persistent=False)

    @property
    def trainable(self) -> bool:
        return isinstance(self.down, nn.Parameter)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    @property
    def multiplier(self) -> float:
        return self.strength * self.scale

    def output(self, layer: nn.Module, x: torch.Tensor, multiplier: float) -> torch.Tensor:
        down = self.down.to(device=x.device, dtype=x.dtype)  # no-ops when they agree
        up = self.up.to(device=x.device, dtype=x.dtype)
        if down.ndim == 4:  # a Conv2d layer: down is a conv like the layer's, up a 1x1 conv
            h = F.conv2d(x, down, None, layer.stride, layer.padding, layer.dilation, layer.groups)
            return F.conv2d(h * multiplier, up)
        return F.linear(F.linear(x, down) * multiplier, up)  # scale the (.., r) tensor, the smallest one

    def weight_delta(self, multiplier: float) -> torch.Tensor:
        """multiplier * up @ down in fp32, in the layer weight's shape."""
        delta = self.up.detach().float().flatten(1) @ self.down.detach().float().flatten(1)
        return (delta * multiplier).reshape(self.up.shape[0], *self.down.shape[1:])

    def extra_repr(self) -> str:
        return f"{self.name or self.key}, rank={self.rank}, alpha={self.alpha}, strength={self.strength}"


def _lora_hook(layer: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    x = args[0]
    for adapter in layer.lora_adapters:
        multiplier = adapter.multiplier - adapter.fused  # what is not merged into the weight yet
        if multiplier == 0:
            continue
        delta = adapter.output(layer, x, multiplier)
        out = out + delta if torch.is_grad_enabled() else out.add_(delta)  # in place when no gradient is needed
    return out


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{name: layer} of every layer a LoRA can target (Linear and Conv2d), by diffusers name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _adapters(layer: nn.Module) -> list[LoraAdapter]:
    return list(layer.lora_adapters) if "lora_adapters" in layer._modules else []


def _set_adapters(layer: nn.Module, adapters: list[LoraAdapter]) -> None:
    current = _adapters(layer)
    if [id(a) for a in current] == [id(a) for a in adapters]:
        return
    if adapters:
        layer.lora_adapters = nn.ModuleList(adapters)
        if layer.__dict__.get("_lora_hook") is None:
            layer.__dict__["_lora_hook"] = layer.register_forward_hook(_lora_hook)
    else:
        del layer._modules["lora_adapters"]
        layer.__dict__.pop("_lora_hook").remove()


def _fuse(layer: nn.Module, adapter: LoraAdapter, target: float) -> None:
    """Changes the part of `adapter` merged into `layer.weight` to `target` (0: unmerged). In fp32, in place."""
    change = target - adapter.fused
    if change == 0:
        return
    w = layer.weight
    with torch.no_grad():
        w.copy_((w.float() + adapter.weight_delta(change).to(w.device)).to(w.dtype))
    adapter.fused = target


def _is_fp8(t: torch.Tensor) -> bool:
    return t.dtype.is_floating_point and t.dtype.itemsize == 1


def _compute_dtype(model: nn.Module, layer: nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype.itemsize > 1:
        return dtype
    return torch.bfloat16 if _is_fp8(layer.weight) else layer.weight.dtype


# ---------------------------------------------------------------------------------------------------------------
# Applying a set of LoRAs
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class LoraReportEntry:
    name: str
    source: str
    strength: float
    layers: int  # layers of the model it changes
    ranks: list[int]
    unmatched: list[str] = field(default_factory=list)  # file keys or layers this model does not have


@dataclass
class LoraReport:
    entries: list[LoraReportEntry]
    fused: bool

    def __str__(self) -> str:
        if not self.entries:
            return "no LoRA"
        lines = []
        for e in self.entries:
            extra = f", {len(e.unmatched)} unmatched keys" if e.unmatched else ""
            lines.append(f"{e.name} @ {e.strength:g}: {e.layers} layers, rank {'/'.join(map(str, e.ranks))}{extra}")
        return "\n".join(lines) + ("\n(fused into the weights)" if self.fused else "")


def _title(model: nn.Module) -> str:
    variant = getattr(model, "variant", None)
    return getattr(variant, "title", "this model")


def _listed(keys: list[str]) -> str:
    more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def _match(model: nn.Module, layers: dict[str, nn.Module], lora: Lora) -> tuple[dict[str, LoraLayer], list[str]]:
    """(the LoRA's layers this model has, unmatched keys); errors for no match and for wrong shapes."""
    matched = {n: spec for n, spec in lora.layers.items() if n in layers}
    if not matched:
        sample = ", ".join(list(lora.layers)[:3])
        raise CogVXError(f"{lora.source}: this LoRA matches no layer of this model ({_title(model)}): it was made for "
                         f"another base model (its layers are named like {sample}). Use a LoRA trained on "
                         f"{_title(model)}.")
    for n, spec in matched.items():
        shape = tuple(layers[n].weight.shape)
        if spec.weight_shape != shape:
            raise CogVXError(f"{lora.source}: layer {n} of this LoRA changes a weight of shape {spec.weight_shape}, "
                             f"but this model's {n} has shape {shape}: the LoRA was made for another CogVideoX "
                             f"variant (a 2b LoRA on a 5b model, or the reverse). Use a LoRA made for "
                             f"{_title(model)}.")
    absent = [f"{n} (not in this model)" for n in lora.layers if n not in layers]
    return matched, list(lora.unmatched) + absent


def apply_loras(model: nn.Module, loras: Iterable[tuple[Lora | str | os.PathLike, float]] = (), *,
                fuse: bool = False) -> LoraReport:
    """Makes `loras` [(LoRA or path, strength), ...] the model's whole LoRA set, in that order.

    LoRAs already on the model (same file, unchanged) are kept and only re-weighted: no reload, no weight copy.
    LoRAs not in the list are removed; the trainable LoRA (add_trainable_lora) is left alone. Nothing changes when
    a LoRA fails to match. fuse=True merges the deltas into the weights (faster sampling; not for fp8 weights).
    """
    wanted = []
    seen: collections.Counter = collections.Counter()
    for item in loras:
        lora, strength = (item, 1.0) if isinstance(item, (Lora, str, os.PathLike)) else item
        if not isinstance(lora, Lora):
            lora = load_lora(lora)
        strength = float(strength)
        if not math.isfinite(strength):
            raise CogVXError(f"LoRA strength {strength} for {lora.name}: use a finite number (negative subtracts).")
        seen[lora.identity] += 1
        wanted.append(((*lora.identity, seen[lora.identity]), lora, strength))  # the same file twice: two entries

    layers = lora_layers(model)
    on_model = {a.key for layer in layers.values() for a in _adapters(layer)}
    plan, entries = [], []
    for key, lora, strength in wanted:
        matched, unmatched = _match(model, layers, lora)
        made_for = lora.metadata.get("cogvx.base_variant")
        variant = getattr(getattr(model, "variant", None), "name", None)
        first_time = key not in on_model  # warn once per LoRA, not on every change of strength
        if first_time and made_for and variant and made_for != variant:
            log.warning("%s was made for CogVideoX %s; applying it to %s.", lora.name, made_for, _title(model))
        for note in lora.notes if first_time else ():
            log.warning("%s: %s", lora.source, note)
        if first_time and unmatched:
            log.warning("%s: %d keys of this LoRA match no layer of %s and are ignored: %s", lora.source,
                        len(unmatched), _title(model), _listed(unmatched))
        if fuse:
            fp8 = [n for n in matched if _is_fp8(layers[n].weight)]
            if fp8:
                raise CogVXError(f"Cannot fuse {lora.name} into fp8-stored weights (e.g. {fp8[0]}); apply it "
                                 "unfused (fuse=False), which costs a little speed and no precision.")
        plan.append((key, lora, strength, matched))
        entries.append(LoraReportEntry(lora.name, lora.source, strength, len(matched), lora.ranks, unmatched))

    touched = {n for n, layer in layers.items() if _adapters(layer)}
    touched.update(n for *_, matched in plan for n in matched)
    for n in sorted(touched):
        layer = layers[n]
        old = {a.key: a for a in _adapters(layer)}
        new = [a for a in old.values() if a.trainable]
        for key, lora, strength, matched in plan:
            spec = matched.get(n)
            if spec is None:
                continue
            adapter = old.pop(key, None)
            if adapter is None:
                dtype, device = _compute_dtype(model, layer), layer.weight.device
                with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; a trainer may run later
                    down, up = (t.to(device, dtype, copy=True) for t in (spec.down, spec.up))
                adapter = LoraAdapter(key, down, up, spec.alpha, name=lora.name)
            adapter.strength = strength
            new.append(adapter)
        for adapter in old.values():
            if not adapter.trainable:
                _fuse(layer, adapter, 0.0)
        for adapter in new:
            if not adapter.trainable:
                _fuse(layer, adapter, adapter.multiplier if fuse else 0.0)
        _set_adapters(layer, new)
    model.__dict__["_lora_order"] = [key for key, *_ in plan]
    return LoraReport(entries, fused=fuse)


def remove_loras(model: nn.Module, *, trainable: bool = True) -> None:
    """Takes every LoRA off the model (fused ones are subtracted again); trainable=False keeps the trainable one."""
    for layer in lora_layers(model).values():
        adapters = _adapters(layer)
        for adapter in adapters:
            if not adapter.trainable or trainable:
                _fuse(layer, adapter, 0.0)
        if adapters:
            _set_adapters(layer, [a for a in adapters if a.trainable and not trainable])


def remove_trainable_lora(model: nn.Module) -> None:
    """Takes the trainable LoRA off the model for good (applied LoRAs stay)."""
    for layer in lora_layers(model).values():
        adapters = _adapters(layer)
        if any(a.trainable for a in adapters):
            _set_adapters(layer, [a for a in adapters if not a.trainable])


def applied_loras(model: nn.Module) -> list[tuple[str, float]]:
    """[(name, strength)] of the LoRAs on the model (trainable one included), in the order applied."""
    found: dict[tuple, tuple[str, float]] = {}
    for layer in lora_layers(model).values():
        for adapter in _adapters(layer):
            found.setdefault(adapter.key, (adapter.name, adapter.strength))
    order = {key: i for i, key in enumerate(model.__dict__.get("_lora_order", []))}
    return [found[k] for k in sorted(found, key=lambda k: order.get(k, len(order)))]


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
def _trainable(model: nn.Module) -> dict[str, LoraAdapter]:
    return {n: a for n, layer in lora_layers(model).items() for a in _adapters(layer) if a.trainable}


def add_trainable_lora(model: nn.Module, rank: int = 64, alpha: float | None = None,
                       targets: Iterable[str] = DEFAULT_TARGETS, init: str | Lora = "peft",
                       dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None
                       ) -> list[nn.Parameter]:
    """Adds a trainable LoRA to every layer whose name is or ends with one of `targets`; returns its parameters.

    init: "peft" (peft's default: A kaiming-uniform(a=sqrt 5), B zeros, so the model starts unchanged), "gaussian"
    (A normal with std 1/rank, B zeros), or a Lora to continue from (its layers, ranks and alphas; `rank`, `alpha`
    and `targets` are then ignored). alpha defaults to rank (scale 1). The parameters are kept in `dtype`.
    """
    if _trainable(model):
        raise CogVXError("This model already has a trainable LoRA; save it and call remove_loras(model) before "
                         "adding another.")
    layers = lora_layers(model)
    if isinstance(init, Lora):
        specs = {n: spec for n, spec in init.layers.items() if n in layers}
        if not specs:
            _match(model, layers, init)  # raises the no-match error
        for n, spec in specs.items():
            if spec.weight_shape != tuple(layers[n].weight.shape):
                _match(model, layers, init)  # raises the shape error
    else:
        if int(rank) < 1:
            raise CogVXError(f"LoRA rank must be at least 1, got {rank}.")
        if init not in ("peft", "gaussian"):
            raise CogVXError(f"Unknown LoRA init {init!r}: use 'peft', 'gaussian' or a loaded LoRA to continue from.")
        targets = (targets,) if isinstance(targets, str) else tuple(targets)
        names = [n for n in layers if any(n == t or n.endswith("." + t) for t in targets)]
        if not names:
            raise CogVXError(f"LoRA targets {list(targets)} match no layer of this model; use layer-name endings such "
                             "as to_q, to_k, to_v, to_out.0, ff.net.0.proj, ff.net.2, norm1.linear, proj_out.")
        specs = {}
        for n in names:
            w = layers[n].weight
            down = torch.empty((int(rank), *w.shape[1:]), dtype=torch.float32, device=w.device)
            if init == "peft":
                nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
            else:
                nn.init.normal_(down, std=1 / int(rank), generator=generator)
            up = torch.zeros((w.shape[0], int(rank), *[1] * (w.ndim - 2)), device=w.device)
            specs[n] = LoraLayer(down, up, float(rank if alpha is None else alpha))
    params = []
    for n, spec in specs.items():
        layer = layers[n]
        device = layer.weight.device
        adapter = LoraAdapter(TRAINABLE, spec.down.detach().to(device, dtype).clone(),
                              spec.up.detach().to(device, dtype).clone(), spec.alpha, trainable=True, name="trainable")
        _set_adapters(layer, _adapters(layer) + [adapter])
        params += [adapter.down, adapter.up]
    return params


def lora_state_dict(model: nn.Module, prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    """The trainable LoRA in the diffusers/peft layout: {prefix + layer + ".lora_A.weight": down, ".lora_B...": up}."""
    adapters = _trainable(model)
    if not adapters:
        raise CogVXError("This model has no trainable LoRA (add_trainable_lora) to take a state dict of.")
    out = {}
    for n, a in adapters.items():
        out[f"{prefix}{n}.lora_A.weight"] = a.down.detach()
        out[f"{prefix}{n}.lora_B.weight"] = a.up.detach()
    return out


# ---------------------------------------------------------------------------------------------------------------
# Saving (diffusers/peft layout)
# ---------------------------------------------------------------------------------------------------------------
def _common(values: dict[str, float]) -> tuple[float, dict[str, float]]:
    """(the most common value, {layer: value} where it differs), as peft's r/rank_pattern and alpha/alpha_pattern."""
    common = collections.Counter(values.values()).most_common(1)[0][0]
    return common, {n: v for n, v in values.items() if v != common}


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def save_lora(path: str | os.PathLike, model_or_state: nn.Module | Lora | dict[str, torch.Tensor], *,
              rank: int | None = None, alpha: float | None = None, targets: Iterable[str] | None = None,
              variant: str | None = None, extra_metadata: dict | None = None, dtype: torch.dtype | None = None
              ) -> Path:
    """Writes a LoRA as `.safetensors` in the diffusers/peft layout (transformer.<layer>.lora_A/lora_B.weight).

    model_or_state: a model with a trainable LoRA, a Lora (any layout: this converts it), or a peft-layout state dict
    (with or without the `transformer.` prefix; alpha from `alpha`, else alpha = rank).
    The metadata holds the peft config diffusers reads back (`lora_adapter_metadata`: r, lora_alpha, target_modules,
    per-layer patterns), so `CogVideoXPipeline.load_lora_weights` applies the same scale for any alpha, and
    `cogvx.rank`, `cogvx.alpha`, `cogvx.targets`, `cogvx.base_variant` plus `extra_metadata`. A Lora's own `cogvx.*`
    metadata (training settings, steps) is kept, save_lora's own keys rewritten.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise CogVXError(f"{path}: LoRAs are saved as .safetensors; use a name ending in .safetensors.")
    if isinstance(model_or_state, nn.Module):
        adapters = _trainable(model_or_state)
        if not adapters:
            raise CogVXError("This model has no trainable LoRA (add_trainable_lora) to save.")
        specs = {n: (a.down.detach(), a.up.detach(), a.alpha) for n, a in adapters.items()}
        variant = variant or getattr(getattr(model_or_state, "variant", None), "name", None)
    elif isinstance(model_or_state, Lora):
        specs = {n: (s.down, s.up, s.alpha) for n, s in model_or_state.layers.items()}
        variant = variant or model_or_state.metadata.get("cogvx.base_variant")
        kept = {k: v for k, v in model_or_state.metadata.items() if k.startswith("cogvx.") and k not in WRITTEN_KEYS}
        extra_metadata = {**kept, **(extra_metadata or {})}
    elif isinstance(model_or_state, dict):
        state = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in model_or_state.items()}
        lora = lora_from_state_dict(state, {"lora_alpha": str(alpha)} if alpha is not None else None)
        if lora.unmatched:
            raise CogVXError(f"These keys are not LoRA weights of CogVideoX layers: {_listed(lora.unmatched)}.")
        specs = {n: (s.down, s.up, s.alpha) for n, s in lora.layers.items()}
    else:
        raise CogVXError(f"save_lora takes a model, a Lora or a state dict, not {type(model_or_state).__name__}.")

    ranks = {n: d.shape[0] for n, (d, _, _) in specs.items()}
    alphas = {n: float(ranks[n] if a is None else a) for n, (_, _, a) in specs.items()}
    # rank and alpha describe the weights; given ones are checked, never used to relabel them
    if rank is not None and set(ranks.values()) != {int(rank)}:
        raise CogVXError(f"save_lora: rank={rank} was given but the LoRA has ranks {sorted(set(ranks.values()))}.")
    if alpha is not None and set(alphas.values()) != {float(alpha)}:
        raise CogVXError(f"save_lora: alpha={alpha} was given but the LoRA was made with alpha "
                         f"{sorted(set(alphas.values()))}; saving it under another alpha would change its strength.")
    r, rank_pattern = _common(ranks)
    lora_alpha, alpha_pattern = _common(alphas)
    names = sorted(specs, key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])
    if targets is None:
        targets = sorted({re.sub(r"^transformer_blocks\.\d+\.(attn1\.)?", "", n) for n in names})

    tensors = {}
    for n in names:
        down, up, _ = specs[n]
        for kind, t in (("lora_A", down), ("lora_B", up)):
            t = t.detach().to("cpu", dtype or t.dtype).contiguous()
            tensors[f"transformer.{n}.{kind}.weight"] = t
    peft_config = {"r": int(r), "lora_alpha": _number(lora_alpha), "target_modules": names,
                   # peft matches patterns as regexes at the end of a module name: anchor and escape them
                   "rank_pattern": {f"^{re.escape(n)}": int(v) for n, v in rank_pattern.items()},
                   "alpha_pattern": {f"^{re.escape(n)}": _number(v) for n, v in alpha_pattern.items()}}
    metadata = {
        "format": "pt",
        "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in peft_config.items()}, sort_keys=True),
        "cogvx.format_version": FORMAT_VERSION,
        "cogvx.rank": str(int(r)),
        "cogvx.alpha": str(_number(lora_alpha)),
        "cogvx.targets": ",".join(targets),
    }
    if variant:
        metadata["cogvx.base_variant"] = str(variant)
    for k, v in (extra_metadata or {}).items():
        if k in metadata:
            raise CogVXError(f"extra_metadata key {k!r} is written by save_lora itself; use another name.")
        metadata[str(k)] = v if isinstance(v, str) else json.dumps(v)
    with atomic_path(path) as tmp:  # never a half-written LoRA under the real name (kill, full disk)
        save_file(tensors, str(tmp), metadata=metadata)
    return path
