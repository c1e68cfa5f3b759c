"""Input checks shared by the CLI, the public functions and the nodes: each refuses bad input with a CogVXError that
names the value and the fix (never a traceback from deep inside torch), or returns notes for input that works but
is probably not what the user meant."""

from __future__ import annotations

import math

import torch

from .errors import CogVXError

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes


def positive(name: str, value, *, integer: bool = True, allow_none: bool = True):
    """A size, frame count, step count, fps or alpha: None means "not given" (when allowed); 0 or less is refused,
    never read as "not given"."""
    if value is None:
        if allow_none:
            return None
        raise CogVXError(f"{name} is required.")
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        raise CogVXError(f"{name} must be a{' whole' if integer else ''} number, got {value!r}.")
    if value <= 0:
        raise CogVXError(f"{name} must be positive, got {value}; leave it out to use the model's default.")
    return value


def check_seed(seed) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CogVXError(f"seed must be a whole number, got {seed!r}.")
    if not SEED_MIN <= seed <= SEED_MAX:
        raise CogVXError(f"seed {seed} does not fit in 64 bits; use a seed from 0 to {SEED_MAX}.")
    return seed


def parse_device(device) -> torch.device:
    """A device name ('cpu', 'cuda', 'cuda:1', 'mps') checked against what this machine has."""
    if isinstance(device, torch.device):
        dev = device
    else:
        try:
            dev = torch.device(str(device).strip())
        except (RuntimeError, ValueError):
            raise CogVXError(f"Unknown device {device!r}; use cpu, cuda, cuda:N or mps.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CogVXError(f"device {device}: no CUDA device is available; use --device cpu.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CogVXError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"numbered from 0.")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise CogVXError(f"device {device}: MPS is not available on this machine; use cpu.")
    elif dev.type not in ("cpu", "cuda", "mps", "xpu", "meta"):
        raise CogVXError(f"device {device}: not supported; use cpu, cuda, cuda:N or mps.")
    return dev


def parse_numbers(text: str, name: str, kind=int, *, positive_only: bool = True) -> list:
    """'9,17, 25' -> [9, 17, 25]; a bad entry is named (not a ValueError from int())."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = kind(part)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise CogVXError(f"{name}: {part!r} is not {what}; give numbers separated by commas, e.g. "
                             "9,17,25.") from None
        if kind is float and not math.isfinite(value) or positive_only and value <= 0:
            raise CogVXError(f"{name}: {part} must be a positive number.")
        out.append(value)
    if not out:
        raise CogVXError(f"{name}: no numbers in {text!r}; give numbers separated by commas, e.g. 9,17,25.")
    return out


def check_layout(x, name: str, layout: str, channels: dict[int, int] | None = None) -> torch.Tensor:
    """A tensor given to the API: its rank and fixed sizes must match `layout` (e.g. "(B, 3, H, W)")."""
    dims = [d.strip() for d in layout.strip("()").split(",")]
    if not torch.is_tensor(x):
        raise CogVXError(f"{name} must be a tensor {layout}, got {type(x).__name__}.")
    if x.dim() != len(dims) or any(x.shape[i] != n for i, n in (channels or {}).items()):
        fixed = ", ".join(f"{dims[i]} = {n}" for i, n in (channels or {}).items())
        raise CogVXError(f"{name} has shape {tuple(x.shape)} but must be {layout}{' with ' + fixed if fixed else ''}.")
    if x.numel() == 0:
        raise CogVXError(f"{name} is empty (shape {tuple(x.shape)}); it must be {layout} with no zero size.")
    if x.is_floating_point() and not all_finite(x):
        raise CogVXError(f"{name} has NaN or infinite values; check where it came from.")
    return x


def check_generate_inputs(*, image=None, video=None, cond=None, uncond=None, frames=None, height=None, width=None,
                          steps=None, seed=None) -> None:
    """The pipeline API's arguments, before any work: layouts of the tensors, positive sizes, a 64-bit seed."""
    if image is not None:
        check_layout(image, "image", "(B, 3, H, W)", {1: 3})
    if video is not None:
        check_layout(video, "video", "(B, 3, T, H, W)", {1: 3})
    for name, context in (("cond", cond), ("uncond", uncond)):
        if context is not None:
            check_layout(context, name, "(B, L, D)")
    for name, value in (("frames", frames), ("height", height), ("width", width), ("steps", steps)):
        positive(name, value)
    check_seed(seed)


def check_frames(frames, name: str = "frames") -> torch.Tensor:
    """Frames as written and shown: (T, H, W, 3), at least one frame."""
    return check_layout(frames, name, "(T, H, W, 3)", {3: 3})


def all_finite(x: torch.Tensor) -> bool:
    """No NaN and no infinity, in one min/max reduction: min and max carry any NaN, and an infinity is one of them.
    (On a CPU this is ~40x faster than torch.isfinite(x).all(), which makes a bool copy of x first.)"""
    if x.numel() == 0:
        return True
    low, high = torch.aminmax(x.detach())
    return math.isfinite(float(low)) and math.isfinite(float(high))


def require_finite(x: torch.Tensor, where: str) -> None:
    """Stops on NaN or infinite values: one reduction over `x` (used on latents, never on activations)."""
    if not all_finite(x):
        raise CogVXError(f"{where}: the values became NaN or infinite. The usual causes: float16 overflow (use "
                         "bfloat16 or float32), a broken LoRA or weight file, or a guidance scale far too high.")


def finite_tensor(value: torch.Tensor, name: str, source) -> None:
    """A loaded weight: NaN or infinite values name the file and the tensor. fp8 is checked on its bits (no isfinite
    kernel): e4m3fn has only NaN (exponent and mantissa all ones), e5m2 inf and NaN (exponent all ones)."""
    if not value.is_floating_point():
        return
    if value.dtype == torch.float8_e4m3fn:
        ok = not bool(((value.view(torch.uint8) & 0x7F) == 0x7F).any())
    elif value.element_size() == 1:
        ok = not bool(((value.view(torch.uint8) & 0x7C) == 0x7C).any())
    else:
        ok = all_finite(value)
    if not ok:
        raise CogVXError(f"{source}: tensor {name} holds NaN or infinite values; the file is damaged or was saved from "
                         "a diverged training run. Download it again or use an earlier version.")


# ---------------------------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------------------------
def json_object(data, source) -> dict:
    if not isinstance(data, dict):
        raise CogVXError(f"{source}: must hold a JSON object ({{\"key\": value, ...}}), not a {_json_type(data)}; the "
                         "file is damaged or of another kind. Download it again.")
    return data


def _json_type(value) -> str:
    return {dict: "object", list: "list", str: "string", bool: "true/false", type(None): "null", int: "number",
            float: "number"}.get(type(value), type(value).__name__)


def config_types(config: dict, reference: dict, source) -> dict:
    """Every key of `config` that `reference` has must be of the reference value's JSON type (a number where a
    number is expected, a list where a list is); the first that is not is named with the file."""
    for key, ref in reference.items():
        if key not in config or ref is None or config[key] is None:
            continue
        value = config[key]
        if isinstance(ref, bool):
            ok = isinstance(value, bool)
        elif isinstance(ref, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            ok = ok and (isinstance(ref, float) or float(value).is_integer())
        elif isinstance(ref, (list, tuple)):
            ok = isinstance(value, (list, tuple))
        else:
            ok = isinstance(value, type(ref))
        if not ok:
            want = "whole number" if isinstance(ref, int) and not isinstance(ref, bool) else _json_type(ref)
            raise CogVXError(f"{source}: key {key!r} is {value!r} ({_json_type(value)}) but must be a {want} like "
                             f"{ref!r}; the file is damaged or edited. Download it again.")
    return config


def require_keys(config: dict, keys, source) -> dict:
    missing = [k for k in keys if k not in config]
    if missing:
        raise CogVXError(f"{source}: missing key(s) {', '.join(map(repr, missing))}; the file is incomplete. Download "
                         "it again.")
    return config


# ---------------------------------------------------------------------------------------------------------------
# Notes: input that works but is probably not what was meant
# ---------------------------------------------------------------------------------------------------------------
def image_notes(pixels: torch.Tensor, target: tuple[int, int] | None = None) -> list[str]:
    """Notes on a start image (H, W, C) in [0, 1], C = 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA), that is
    tiny, grayscale or transparent: it works, but the video will not look as the user expects."""
    notes = []
    h, w, c = pixels.shape
    if target is not None and (w * 2 < target[1] or h * 2 < target[0]):
        notes.append(f"the start image is {w}x{h}, less than half of the {target[1]}x{target[0]} video; it is "
                     "upscaled and will look soft. Use a larger image.")
    elif target is None and min(w, h) < 64:
        notes.append(f"the start image is only {w}x{h}; it is upscaled and will look soft. Use a larger image.")
    if c < 3 or bool((pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()):
        notes.append("the start image is grayscale; the video starts from gray colours.")
    if c in (2, 4) and float(pixels[..., -1].min()) < 1:
        notes.append("the start image has transparent parts; their hidden colours (often black) are used. Flatten it "
                     "onto a background first.")
    return notes


def denoise_note(denoise: float, empty_latent: bool) -> list[str]:
    if empty_latent and denoise < 1:
        return [f"denoise {denoise:g} on an empty latent: sampling starts part-way from noise with no picture under "
                "it, which only makes a blurrier video. Use denoise 1.0, or encode an input video for video-to-video."]
    return []

