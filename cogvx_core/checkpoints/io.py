"""Safetensors I/O shared by every loader: validated headers, mmap reads, filling meta-device modules.

Never unpickles: `.pt`, `.ckpt`, `.bin` and `.pth` files are refused with the conversion to make.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors import safe_open

from ..checks import config_types, finite_tensor, json_object, require_keys
from ..errors import CheckpointError

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def refuse_pickle(path: str | os.PathLike) -> None:
    if str(path).lower().endswith(PICKLE_SUFFIXES):
        raise CheckpointError(
            f"{path}: pickled checkpoints ({', '.join(PICKLE_SUFFIXES)}) are never loaded, because unpickling can run "
            "arbitrary code. Convert it to .safetensors once in a trusted environment (safetensors.torch.save_file) "
            "and load that file instead.")


class SafetensorsHeader:
    """The parsed, validated header of one .safetensors file: tensor names, dtypes, shapes and the metadata."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        refuse_pickle(self.path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file. Check the name and the models folder it should be in.")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{self.path}: the file is empty or truncated ({size} bytes); download it again.")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(size - 8, 100 * 2**20):
                raise CheckpointError(
                    f"{self.path}: not a valid .safetensors file (header length {header_len} for a {size}-byte file); "
                    "the file is corrupt, truncated or of another format. Download it again.")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.path}: the safetensors header is corrupt ({e}); download the file again.")
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: the safetensors header is not a JSON object; the file is corrupt or "
                                  "of another format. Download it again.")
        self.metadata: dict = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict) or not all(isinstance(v, str) for v in self.metadata.values()):
            raise CheckpointError(f"{self.path}: the safetensors __metadata__ must map names to strings; the file is "
                                  "corrupt. Download it again.")
        self.tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        end = 0
        for name, info in header.items():
            if not _valid_entry(info):
                raise CheckpointError(f"{self.path}: the header entry of tensor {name!r} is malformed ({info!r:.100}); "
                                      "it needs dtype, shape and data_offsets. The file is corrupt; download it again.")
            dtype = _ST_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}.")
            self.tensors[name] = (dtype, tuple(info["shape"]))
            end = max(end, info["data_offsets"][1])
        expected = 8 + header_len + end
        if size < expected:
            raise CheckpointError(
                f"{self.path}: the file is truncated: it has {size:,} bytes but its header needs {expected:,}. "
                "The download or copy was interrupted; download it again.")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: s for k, (_, s) in self.tensors.items()}


def _valid_entry(info) -> bool:
    def ints(v, n=None):
        return isinstance(v, list) and (n is None or len(v) == n) and all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)

    return isinstance(info, dict) and isinstance(info.get("dtype"), str) and ints(info.get("shape")) \
        and ints(info.get("data_offsets"), 2) and info["data_offsets"][0] <= info["data_offsets"][1]


def open_headers(files: Iterable[str | os.PathLike]) -> list[SafetensorsHeader]:
    return [SafetensorsHeader(f) for f in files]


def iter_tensors(headers: list[SafetensorsHeader], rename: Callable[[str], str | None] = lambda k: k
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (new_name, tensor) one at a time, memory-mapped; `rename` returning None skips a key."""
    for h in headers:
        with safe_open(str(h.path), framework="pt", device="cpu") as f:
            for key in f.keys():
                new = rename(key)
                if new is not None:
                    yield new, f.get_tensor(key)


def set_tensor(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Puts `value` in place of parameter or buffer `name` (works on meta-device modules)."""
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if attr in owner._parameters:
        owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=owner._parameters[attr].requires_grad)
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        raise KeyError(name)


def fill_module(module: torch.nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], *, source: str,
                dtype_for: Callable[[str, torch.Tensor], torch.dtype], device: torch.device | str = "cpu",
                strict: bool = True) -> list[str]:
    """Fills a meta-device module tensor by tensor, converting each straight to its dtype and device.

    Peak memory is the finished module plus one tensor: no full-precision copy of the checkpoint is ever held.
    Returns the unexpected keys; missing or wrongly shaped tensors raise a CheckpointError naming `source`.
    """
    expected = dict(module.state_dict(keep_vars=True))
    unexpected, seen = [], set()
    for name, value in tensors:
        ref = expected.get(name)
        if ref is None:
            unexpected.append(name)
            continue
        if tuple(value.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(value.shape)} but this model needs {tuple(ref.shape)}; "
                "the file belongs to another model or variant.")
        out = value.to(device=device, dtype=dtype_for(name, value))
        finite_tensor(out, name, source)  # one reduction per tensor, on its device
        if out.data_ptr() == value.data_ptr():  # still the file's read-only mmap: own the memory, so that in-place
            out = out.clone()                   # updates (training, LoRA fusing) work and the file may change
        set_tensor(module, name, out)
        seen.add(name)
    missing = [k for k in expected if k not in seen]
    if missing and strict:
        raise CheckpointError(
            f"{source}: {len(missing)} tensors are missing (e.g. {', '.join(missing[:3])}); the file is incomplete or "
            "belongs to another model.")
    return unexpected


def read_json(path: str | os.PathLike, what: str, reference: dict | None = None) -> dict:
    """A JSON object file; with `reference` (a defaults dict) each of its keys must have the reference's type."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no {path.name} in this folder, so it is not a complete diffusers-format "
                              f"{what} folder. Download the folder again, or point at the folder that has {path.name}.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the file is corrupt.") from None
    json_object(data, path)
    return config_types(data, reference, path) if reference is not None else data


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Writes `data` as indented JSON through a temporary file, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def folder_weight_files(folder: str | os.PathLike, what: str) -> list[Path]:
    """The safetensors files of a diffusers model folder: one file, or the shards an index names."""
    folder = Path(folder)
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        weight_map = json_object(require_keys(read_json(index[0], what), ["weight_map"], index[0])["weight_map"],
                                 f"{index[0]} key 'weight_map'")
        files = [folder / n for n in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{folder}: shard {f.name} named in {index[0].name} is missing; the download is "
                                      "incomplete. Download the missing shard.")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in folder.iterdir() if p.name.lower().endswith(PICKLE_SUFFIXES)]
        hint = (f" It has only pickled weights ({', '.join(pickled)}), which are never loaded: convert them to "
                ".safetensors.") if pickled else ""
        raise CheckpointError(f"{folder}: no .safetensors weights in this {what} folder.{hint}")
    return files
