"""Loader nodes: the transformer, the VAE and the T5 text encoder, from diffusers-format folders or single files.

    models/cogvideox/<folder>/           a whole diffusers-format model (transformer/, vae/, text_encoder/, ...)
    models/diffusion_models/<file>       a single-file transformer (diffusers, ComfyUI or SAT keys; fp8 too)
    models/vae/<file>                    a single-file VAE, e.g. cogvideox_vae.safetensors
    models/text_encoders/<file>          a single-file T5-XXL, e.g. t5xxl_fp16.safetensors

Each combo lists the single files of its own folder and, for every model folder, that folder's own part:
"<folder>" (transformer), "<folder>/vae", "<folder>/text_encoder".

The loaded objects travel as the pack's own types COGVX_MODEL, COGVX_VAE and COGVX_T5 (frozen handles below).
A later node that changes a model (a LoRA) makes a new handle with dataclasses.replace and never edits this one:
ComfyUI shares cached outputs between runs and nodes.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import torch

from .core import (
    available_attention_backends,
    CogVideoXTransformer,
    CogVXError,
    DEFAULT_MAX_LENGTH,
    load_text_encoder,
    load_transformer,
    load_vae,
    NoiseSchedule,
    read_model_folder,
    TextEncoder,
    Variant,
)

from . import host, preview

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_CHOICES = ["auto", *DTYPES]
WEIGHT_STORAGE = ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast"]
SUFFIX = ".safetensors"


# ---------------------------------------------------------------------------------------------------------------
# What the loaders hand on
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class CogVXModel:
    """COGVX_MODEL: the transformer, its noise schedule and the latent scale it was trained with."""

    transformer: CogVideoXTransformer
    managed: host.Managed
    schedule: NoiseSchedule
    scaling_factor: float
    invert_scale_latents: bool  # 1.5-I2V: image latents are divided by the scale
    source: str
    # [(cogvx_core.lora.Lora, strength), ...]: set by a LoRA node on its own copy of the handle; the sampler makes
    # exactly these the transformer's LoRAs before each run (the transformer object is shared by every handle).
    loras: tuple = ()
    cache: object = None  # a cache.StepCache set by CogVXCache on its own copy of the handle

    @property
    def variant(self) -> Variant:
        return self.transformer.variant


@dataclasses.dataclass(frozen=True, eq=False)
class CogVXVAE:
    """COGVX_VAE: the 3D causal VAE (raw, unscaled latents in and out)."""

    vae: torch.nn.Module
    managed: host.Managed
    source: str

    @functools.cached_property
    def preview_colours(self) -> preview.Projection:
        """This VAE's latent -> RGB projection for live previews, fitted once (see nodes/preview.py)."""
        self.managed.load()
        return preview.fit_projection(self.vae)


@dataclasses.dataclass(frozen=True, eq=False)
class CogVXT5:
    """COGVX_T5: the T5-XXL encoder with its tokenizer and text length."""

    encoder: TextEncoder
    managed: host.Managed
    source: str


# ---------------------------------------------------------------------------------------------------------------
# Choices and paths
# ---------------------------------------------------------------------------------------------------------------
def _folders_with(part: str | None) -> list[str]:
    """Model folders (models/cogvideox/*) that have `part` (a sub-folder), or all of them."""
    names = []
    for name in host.list_models("cogvideox"):
        try:
            folder = host.model_path("cogvideox", name)
        except FileNotFoundError:
            continue
        if part is None or (folder / part).is_dir():
            names.append(name if part is None else f"{name}/{part}")
    return names


def model_choices() -> list[str]:
    return _folders_with(None) + host.list_models("diffusion_models")


def vae_choices() -> list[str]:
    return _folders_with("vae") + host.list_models("vae")


def t5_choices() -> list[str]:
    return _folders_with("text_encoder") + host.list_models("text_encoders")


def resolve(choice: str, file_folder: str) -> Path:
    """The path of a combo value: a single file of `file_folder`, else a part of a model folder."""
    folder = file_folder if choice.lower().endswith(SUFFIX) else "cogvideox"
    try:
        return host.model_path(folder, choice)
    except FileNotFoundError as e:
        where = f"models/{file_folder}" if folder == file_folder else "models/cogvideox"
        raise CogVXError(f"{e} Put the model under {where} (see the README's table of model files), press R in "
                         "ComfyUI to refresh the lists, and pick it again.") from None


def fingerprint(path: Path) -> str:
    """Changes when a file (or any file in a folder) is replaced on disk, so ComfyUI loads it again."""
    try:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        return str([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files])
    except OSError:
        return str(path)


def _choice_fingerprint(choice: str, file_folder: str) -> str:
    try:
        return fingerprint(resolve(choice, file_folder))
    except CogVXError:
        return choice


def _compute_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """None keeps the checkpoint's own dtype (the released recommendation) on a GPU; the CPU computes in fp32."""
    if choice != "auto":
        return DTYPES[choice]
    return None if device.type != "cpu" else torch.float32


# ---------------------------------------------------------------------------------------------------------------
# Nodes
# ---------------------------------------------------------------------------------------------------------------
class CogVXModelLoader:
    """A CogVideoX transformer: a model folder from models/cogvideox or a single file from models/diffusion_models."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (model_choices(), {"tooltip": "A diffusers-format folder under models/cogvideox (its "
                                            "transformer), or a single .safetensors transformer under "
                                            "models/diffusion_models (diffusers, ComfyUI or SAT keys)."}),
                "dtype": (DTYPE_CHOICES, {"default": "auto", "tooltip": "Compute dtype. auto: the checkpoint's own "
                                          "(bf16 for 5B and 1.5, fp16 for 2B; bf16 for fp8 files) on a GPU, fp32 on "
                                          "the CPU."}),
                "weight_storage": (WEIGHT_STORAGE, {"default": "default", "tooltip": "fp8_e4m3fn stores the big "
                                                    "matmul weights in fp8 (half the memory of bf16; slightly lower "
                                                    "quality). default keeps the file's storage (fp8 files stay "
                                                    "fp8). fp8_e4m3fn_fast also multiplies in fp8 "
                                                    "(per-tensor scales) on GPUs that can (compute capability 8.9+: "
                                                    "RTX 40xx, H100); elsewhere it acts as fp8_e4m3fn."}),
                "attention": (available_attention_backends(), {"default": "sdpa", "tooltip": "Attention kernel. "
                                                               "sdpa (PyTorch) always works; others appear when "
                                                               "installed."}),
            },
        }

    RETURN_TYPES = ("COGVX_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    CATEGORY = "CogVX/loaders"
    DESCRIPTION = ("Loads a CogVideoX transformer (2B, 5B, 5B-I2V, 1.5-5B, 1.5-5B-I2V; the variant is read from the "
                   "checkpoint). ComfyUI moves it between GPU and CPU with its other models.")

    @classmethod
    def IS_CHANGED(cls, model, **_):
        return _choice_fingerprint(model, "diffusion_models")

    def load(self, model, dtype="auto", weight_storage="default", attention="sdpa"):
        path = resolve(model, "diffusion_models")
        device, offload = host.devices("diffusion")
        weight_dtype = None if weight_storage == "default" else weight_storage
        transformer = load_transformer(path, dtype=_compute_dtype(dtype, device), device=offload,
                                       operations=host.operations(),
                                       weight_dtype=weight_dtype, attention=attention)
        variant = transformer.variant
        if transformer.dtype == torch.float16 and variant.generation == "1.5":
            host.say(f"{variant.title} in fp16 can give black or noisy frames; bf16 is the tested dtype.")

        schedule, sf, invert = NoiseSchedule.for_variant(variant), variant.scaling_factor, variant.invert_scale_latents
        if path.is_dir():  # a model folder also says how it was sampled and scaled
            folder = read_model_folder(path)
            if folder.schedule_config:
                schedule = NoiseSchedule.from_config(folder.schedule_config)
            sf = sf if folder.scaling_factor is None else folder.scaling_factor
            invert = invert if folder.invert_scale_latents is None else folder.invert_scale_latents
        handle = CogVXModel(transformer=transformer, managed=host.Managed(transformer, "diffusion"),
                            schedule=schedule, scaling_factor=sf, invert_scale_latents=invert, source=str(path))
        return (handle,)


class CogVXVAELoader:
    """The CogVideoX 3D causal VAE: a model folder's own, or a single file from models/vae."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": (vae_choices(), {"tooltip": "'<folder>/vae' is a model folder's own VAE; a .safetensors file "
                                        "comes from models/vae (e.g. cogvideox_vae.safetensors)."}),
                "dtype": (DTYPE_CHOICES, {"default": "auto", "tooltip": "auto: bf16 on a GPU that has it, else "
                                          "fp32."}),
            },
        }

    RETURN_TYPES = ("COGVX_VAE",)
    RETURN_NAMES = ("vae",)
    FUNCTION = "load"
    CATEGORY = "CogVX/loaders"
    DESCRIPTION = "Loads the CogVideoX VAE (one VAE serves every CogVideoX model; the latent scale comes from the model)."

    @classmethod
    def IS_CHANGED(cls, vae, **_):
        return _choice_fingerprint(vae, "vae")

    def load(self, vae, dtype="auto"):
        path = resolve(vae, "vae")
        device, offload = host.devices("vae")
        if dtype == "auto":
            bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
            torch_dtype = torch.bfloat16 if bf16 else torch.float32
        else:
            torch_dtype = DTYPES[dtype]
        model = load_vae(path, dtype=torch_dtype, device=offload, operations=host.operations())
        model = model.eval().requires_grad_(False)
        return (CogVXVAE(vae=model, managed=host.Managed(model, "vae"), source=str(path)),)


class CogVXT5Loader:
    """The T5-XXL text encoder: a single file from models/text_encoders, or a model folder's own."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "t5": (t5_choices(), {"tooltip": "A single T5-XXL file from models/text_encoders (e.g. "
                                      "t5xxl_fp16.safetensors, the one Flux and SD3 use; fp8 too), or "
                                      "'<folder>/text_encoder', a model folder's own."}),
                "dtype": (DTYPE_CHOICES, {"default": "auto", "tooltip": "auto: the file's own dtype (bf16 for fp8 "
                                          "files)."}),
            },
        }

    RETURN_TYPES = ("COGVX_T5",)
    RETURN_NAMES = ("t5",)
    FUNCTION = "load"
    CATEGORY = "CogVX/loaders"
    DESCRIPTION = ("Loads the T5-XXL encoder with its tokenizer. Prompts are padded or cut to the model's text length "
                   "(226 tokens) exactly as the reference pipeline does.")

    @classmethod
    def IS_CHANGED(cls, t5, **_):
        return _choice_fingerprint(t5, "text_encoders")

    def load(self, t5, dtype="auto"):
        path = resolve(t5, "text_encoders")
        _, offload = host.devices("text")
        torch_dtype = None if dtype == "auto" else DTYPES[dtype]
        tokenizer, max_length = None, DEFAULT_MAX_LENGTH
        if path.is_dir():  # a model folder's own encoder: its tokenizer and text length are beside it
            folder = read_model_folder(path)
            tokenizer, max_length = folder.tokenizer, folder.text_length or max_length
        else:
            tokenizer = host.t5_tokenizer_folder()  # ComfyUI's bundled one; outside ComfyUI one beside the file
        encoder = load_text_encoder(path, tokenizer=tokenizer, dtype=torch_dtype, device=offload,
                                    operations=host.operations(),
                                    max_length=max_length)
        encoder.model.eval().requires_grad_(False)
        return (CogVXT5(encoder=encoder, managed=host.Managed(encoder.model, "text"), source=str(path)),)
