"""The only module that touches ComfyUI's own APIs (folders, devices, memory, progress, interrupt).

Outside ComfyUI every function has a plain fallback, so the node classes import and run in plain Python:
model folders live under $COGVX_MODELS_DIR (default ./models), the device is CUDA when present, progress is a
no-op and nothing interrupts.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

try:  # inside ComfyUI
    import folder_paths  # type: ignore
    import comfy.model_management as mm  # type: ignore
    import comfy.utils  # type: ignore

    IN_COMFY = True
except ImportError:
    folder_paths = mm = None
    IN_COMFY = False

# folder key -> (default sub-folder of the models root, accepted file extensions; an empty set lists sub-folders)
MODEL_FOLDERS: dict[str, tuple[str, set[str]]] = {
    "cogvideox": ("cogvideox", set()),  # diffusers-format model folders
    "diffusion_models": ("diffusion_models", {".safetensors"}),
    "vae": ("vae", {".safetensors"}),
    "text_encoders": ("text_encoders", {".safetensors"}),
    "loras": ("loras", {".safetensors"}),
    "LLM": ("LLM", set()),
}


def models_root() -> Path:
    return Path(os.environ.get("COGVX_MODELS_DIR", "models")).resolve()


def register_folders() -> None:
    """Registers the pack's own model folders with ComfyUI (idempotent)."""
    if not IN_COMFY:
        return
    for key, (sub, exts) in MODEL_FOLDERS.items():
        if key not in folder_paths.folder_names_and_paths:
            folder_paths.folder_names_and_paths[key] = ([os.path.join(folder_paths.models_dir, sub)], exts or set())


def _roots(folder: str) -> list[Path]:
    if IN_COMFY:
        register_folders()
        return [Path(p) for p in folder_paths.get_folder_paths(folder)]
    return [models_root() / MODEL_FOLDERS.get(folder, (folder, set()))[0]]


def save_folder(folder: str) -> Path:
    """Where new files of a model kind are written (its first root, e.g. models/loras), created if needed."""
    root = _roots(folder)[0]
    root.mkdir(parents=True, exist_ok=True)
    return root


def send(event: str, data: dict) -> None:
    """A message to the browser for live displays (PromptServer.send_sync); a no-op outside ComfyUI."""
    if not IN_COMFY:
        return
    try:
        from server import PromptServer  # type: ignore

        PromptServer.instance.send_sync(event, data)
    except Exception:  # a display message must never fail a run
        pass


def list_models(folder: str) -> list[str]:
    """Files (or, for folder-type model kinds, sub-folders) a loader node may offer."""
    exts = MODEL_FOLDERS.get(folder, (folder, {".safetensors"}))[1]
    names: set[str] = set()
    for root in _roots(folder):
        if not root.is_dir():
            continue
        if exts:
            names.update(p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix.lower() in exts)
        else:
            names.update(p.name for p in root.iterdir() if p.is_dir())
    return sorted(names)


def model_path(folder: str, name: str) -> Path:
    """The full path of `name` inside one of `folder`'s roots; never a path outside them."""
    for root in _roots(folder):
        path = (root / name).resolve()
        if path.is_relative_to(root.resolve()) and path.exists():
            return path
    raise FileNotFoundError(f"{name!r} is not in the {folder} model folder ({', '.join(map(str, _roots(folder)))}).")


def torch_device() -> torch.device:
    if IN_COMFY:
        return mm.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def offload_device() -> torch.device:
    return mm.unet_offload_device() if IN_COMFY else torch.device("cpu")


def throw_if_interrupted() -> None:
    if IN_COMFY:
        mm.throw_exception_if_processing_interrupted()


class Progress:
    """A step counter that drives ComfyUI's progress bar (and its preview image) when inside the host."""

    def __init__(self, total: int):
        self.total = total
        self.bar = comfy.utils.ProgressBar(total) if IN_COMFY else None

    def update(self, step: int, preview=None) -> None:
        if self.bar is not None:
            self.bar.update_absolute(step, self.total, preview)
