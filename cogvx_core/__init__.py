"""CogVX core: CogVideoX in pure PyTorch (no ComfyUI, no diffusers).

Public entry points:
    build_transformer(config, device="meta")      load_transformer(path, dtype=None, device=None)
    build_vae(config, device="meta")              load_vae(path, dtype=None, device=None)
"""

from .errors import CancelledError, CheckpointError, CogVXError
from .transformer import CogVideoXTransformer, build_transformer
from .variants import VARIANTS, Variant, detect_variant, get_variant
from .checkpoints.transformer import load_transformer

__all__ = ["CogVXError", "CheckpointError", "CancelledError", "CogVideoXTransformer", "build_transformer",
           "load_transformer", "VARIANTS", "Variant", "detect_variant", "get_variant"]
