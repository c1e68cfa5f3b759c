"""CogVX: a pure-PyTorch CogVideoX core (exact to diffusers 0.42.1) with ComfyUI nodes on top."""

from .checkpoints.vae import load_vae
from .vae import build_vae

__all__ = ["build_vae", "load_vae"]
