"""CogVX core: CogVideoX in pure PyTorch (no ComfyUI, no diffusers).

Public entry points:
    build_transformer(config, device="meta")      load_transformer(path, dtype=None, device=None)
    build_vae(config, device="meta")              load_vae(path, dtype=None, device=None)
    load_pipeline(path, dtype=None, device=None)
"""

from .errors import CancelledError, CheckpointError, CogVXError
from .variants import VARIANTS, Variant, detect_variant, get_variant
from .transformer import CogVideoXTransformer, build_transformer
from .vae import build_vae
from .checkpoints.transformer import load_transformer
from .checkpoints.vae import load_vae
from .pipeline import CogVideoXPipeline, load_pipeline

__all__ = ["CogVXError", "CheckpointError", "CancelledError", "VARIANTS", "Variant", "detect_variant", "get_variant",
           "CogVideoXTransformer", "build_transformer", "load_transformer", "build_vae", "load_vae",
           "CogVideoXPipeline", "load_pipeline"]
