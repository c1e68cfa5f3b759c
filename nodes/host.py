"""The only module that touches ComfyUI's own APIs (folders, devices, memory, progress, previews, interrupt, messages).

Outside ComfyUI every function has a plain fallback, so the node classes import and run in plain Python:
model folders live under $COGVX_MODELS_DIR (default ./models), the device is CUDA when present, progress is a
no-op, nothing interrupts and messages go to the log.

Memory: each loaded model (transformer, VAE, T5) is built from ComfyUI's weight-casting layers (`operations()`:
comfy.ops.manual_cast) and is a `Managed` model: wrapped in ComfyUI's CoreModelPatcher (its dynamic-VRAM patcher
where the host runs one, else ModelPatcher) and loaded with
comfy.model_management.load_models_gpu, so ComfyUI moves it between the GPU and the CPU alongside every other model
(it frees what it needs, nothing more) and, when the model does not fit in what is free (an 8-16 GB card, --lowvram,
--novram, --reserve-vram), loads part of it and streams the rest layer by layer, exactly as its own models.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

try:  # inside ComfyUI
    import folder_paths  # type: ignore
    import comfy.model_management as mm  # type: ignore
    import comfy.model_patcher  # type: ignore
    import comfy.utils  # type: ignore

    IN_COMFY = True
except ImportError:
    folder_paths = mm = None
    IN_COMFY = False

log = logging.getLogger("cogvx")

# folder key -> (default sub-folder of the models root, accepted file extensions; an empty set lists sub-folders)
MODEL_FOLDERS: dict[str, tuple[str, set[str]]] = {
    "cogvideox": ("cogvideox", set()),  # diffusers-format model folders
    "diffusion_models": ("diffusion_models", {".safetensors"}),
    "vae": ("vae", {".safetensors"}),
    "text_encoders": ("text_encoders", {".safetensors"}),
    "loras": ("loras", {".safetensors"}),
    "LLM": ("LLM", set()),
    "training_data": ("training_data", set()),  # one sub-folder of clips + captions per dataset
    "training_checkpoints": ("training_checkpoints", set()),  # one sub-folder of resumable checkpoints per run
}


# ---------------------------------------------------------------------------------------------------------------
# Model folders
# ---------------------------------------------------------------------------------------------------------------
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


def writable_folder(folder: str, name: str) -> Path:
    """Sub-folder `name` of `folder`'s first root, created, for the pack to write into. A name that would leave the
    root (absolute, `..`) is refused: graphs never write to arbitrary paths."""
    root = save_folder(folder).resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or path == root:
        raise ValueError(f"{name!r} is not a sub-folder name of the {folder} folder ({root}); use a plain name "
                         "such as my_run.")
    path.mkdir(parents=True, exist_ok=True)
    return path


def send(event: str, data: dict) -> None:
    """A message to the browser for live displays (PromptServer.send_sync); a no-op outside ComfyUI."""
    if not IN_COMFY:
        return
    try:
        from server import PromptServer  # type: ignore

        PromptServer.instance.send_sync(event, data)
    except Exception:  # a display message must never fail a run
        pass


BUILTIN_SUFFIX = " (built in)"  # how the loaders name the models that ship in cogvx_core/models


def builtin_models(folder: str) -> dict[str, Path]:
    """The built-in model folders present (listed first for the "cogvideox" kind, so a fresh install runs the
    pack's workflows with no download), under the names the loaders show."""
    if folder != "cogvideox":
        return {}
    from .core import builtin_models as shipped

    return {name + BUILTIN_SUFFIX: path for name, path in shipped().items()}


def list_models(folder: str) -> list[str]:
    """Files (or, for folder-type model kinds, sub-folders) a loader node may offer; built-in models first."""
    exts = MODEL_FOLDERS.get(folder, (folder, {".safetensors"}))[1]
    names: set[str] = set()
    for root in _roots(folder):
        if not root.is_dir():
            continue
        if exts:
            names.update(p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix.lower() in exts)
        else:
            names.update(p.name for p in root.iterdir() if p.is_dir())
    return list(builtin_models(folder)) + sorted(names)


def model_path(folder: str, name: str) -> Path:
    """The full path of `name` inside one of `folder`'s roots (or a built-in model); never a path outside them."""
    for builtin, base in builtin_models(folder).items():
        if name == builtin or name.startswith(builtin + "/"):
            path = (base / name[len(builtin):].lstrip("/")).resolve()
            if path.is_relative_to(base) and path.exists():
                return path
    for root in _roots(folder):
        path = (root / name).resolve()
        if path.is_relative_to(root.resolve()) and path.exists():
            return path
    raise FileNotFoundError(f"{name!r} is not in the {folder} model folder ({', '.join(map(str, _roots(folder)))}).")


def t5_tokenizer_folder() -> Path | None:
    """ComfyUI's bundled T5-XXL tokenizer (for single-file T5 encoders); None outside ComfyUI."""
    if not IN_COMFY:
        return None
    folder = Path(comfy.utils.__file__).parent / "text_encoders" / "t5_tokenizer"
    return folder if folder.is_dir() else None


# ---------------------------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------------------------
def _plain_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def devices(kind: str) -> tuple[torch.device, torch.device]:
    """(compute device, offload device) for a model kind: "diffusion", "vae" or "text"."""
    if not IN_COMFY:
        return _plain_device(), torch.device("cpu")
    if kind == "vae":
        return mm.vae_device(), mm.vae_offload_device()
    if kind == "text":
        return mm.text_encoder_device(), mm.text_encoder_offload_device()
    return mm.get_torch_device(), mm.unet_offload_device()


def torch_device() -> torch.device:
    return devices("diffusion")[0]


def offload_device() -> torch.device:
    return devices("diffusion")[1]


def intermediate_device() -> torch.device:
    """Where node outputs (latents, images, conditioning) are kept between nodes: the CPU, as ComfyUI keeps them."""
    return mm.intermediate_device() if IN_COMFY else torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------
class CogVXManagedModel(torch.nn.Module):
    """What ModelPatcher manages: it sets `device` and bookkeeping attributes on the module it is given, which our
    models (whose `device` is a read-only property) must not receive, so they sit one level down."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        super().__init__()
        self.inner = module
        self.device = device

    def get_dtype(self) -> torch.dtype | None:
        return next((p.dtype for p in self.inner.parameters() if p.is_floating_point()), None)


def operations():
    """The layer classes the models are built from (cogvx_core's `operations=`): inside ComfyUI its weight-casting
    layers, whose forward casts and moves a weight the memory manager left off the device; outside it None (the
    core's own cast-on-the-fly layers)."""
    if not IN_COMFY:
        return None
    import comfy.ops  # type: ignore

    return comfy.ops.manual_cast


def streamed_layers(managed: "Managed") -> int:
    """How many layers ComfyUI's last (partial) load left off the device, streamed in each forward (0 outside it)."""
    if managed.patcher is None:
        return 0
    return sum(1 for m in managed.module.modules() if hasattr(m, "prev_comfy_cast_weights"))


class Managed:
    """A model the host moves between devices. `load()` puts it on its compute device (ComfyUI first frees memory
    from other models as it needs, and loads only part of the model when the rest does not fit: those weights are
    streamed by the casting layers); outside ComfyUI it is simply moved there."""

    def __init__(self, module: torch.nn.Module, kind: str):
        self.module = module
        self.kind = kind
        self.load_device, self.offload_device = devices(kind)
        self.patcher = None
        if IN_COMFY:
            holder = CogVXManagedModel(module, self.offload_device)
            # CoreModelPatcher is what ComfyUI's own models get: with dynamic VRAM on (0.33+, a GPU) the dynamic
            # patcher, elsewhere (older hosts, the CPU) the plain one.
            patcher_class = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
            self.patcher = patcher_class(holder, self.load_device, self.offload_device)

    def size(self) -> int:
        return sum(t.nbytes for t in self.module.state_dict().values())

    def load(self, memory_required: int = 0) -> torch.device:
        """Loads the model onto its compute device, keeping `memory_required` bytes free for the work (the core's
        activation estimate); inside ComfyUI, what does not fit beside that stays off the device and is streamed."""
        if self.patcher is not None:
            mm.load_models_gpu([self.patcher], memory_required=int(memory_required))
        else:
            self.module.to(self.load_device)
        return self.load_device


def free_memory(device: torch.device) -> int:
    """Bytes free for work on `device` (device memory for a GPU, available RAM for the CPU)."""
    if IN_COMFY:
        return int(mm.get_free_memory(device))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def make_room(memory_required: int, device: torch.device) -> None:
    """Asks the host to unload other models until `memory_required` bytes are free on `device` (best effort)."""
    if IN_COMFY and device.type != "cpu":
        mm.free_memory(int(memory_required), device)


def empty_cache() -> None:
    if IN_COMFY:
        mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(error: BaseException) -> bool:
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
                      if t is not None)
    return isinstance(error, oom_types) or (isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


# ---------------------------------------------------------------------------------------------------------------
# Progress, previews, interrupt, messages
# ---------------------------------------------------------------------------------------------------------------
def throw_if_interrupted() -> None:
    """Raises ComfyUI's interrupt exception when the user pressed Cancel (a no-op outside ComfyUI)."""
    if IN_COMFY:
        mm.throw_exception_if_processing_interrupted()


def previews_enabled() -> bool:
    """Whether the user asked for live latent previews (ComfyUI's --preview-method / preview setting)."""
    if not IN_COMFY:
        return False
    from comfy.cli_args import LatentPreviewMethod, args  # type: ignore

    return args.preview_method != LatentPreviewMethod.NoPreviews


class Progress:
    """A step counter that drives ComfyUI's progress bar and its preview image, and checks the interrupt button on
    every step (ComfyUI throttles progress messages, so the check cannot rely on the bar's hook)."""

    def __init__(self, total: int):
        self.total = max(int(total), 1)
        self.bar = comfy.utils.ProgressBar(self.total) if IN_COMFY else None

    def update(self, done: int, preview=None) -> None:
        """preview: a PIL image shown on the node, or None."""
        throw_if_interrupted()
        if self.bar is not None:
            shown = None
            if preview is not None:
                from comfy.cli_args import args  # type: ignore

                shown = ("JPEG", preview, args.preview_size)
            self.bar.update_absolute(min(done, self.total), self.total, shown)


def say(text: str, node_id: str | None = None) -> None:
    """A note for the user: logged, and shown on the node in ComfyUI's frontend."""
    log.warning(text)
    if not IN_COMFY or node_id is None:
        return
    try:
        from server import PromptServer  # type: ignore

        server = PromptServer.instance
        if hasattr(server, "send_progress_text"):
            server.send_progress_text(text, node_id, server.client_id)
    except Exception:  # a note must never fail a run
        log.debug("could not show the note on the node", exc_info=True)
