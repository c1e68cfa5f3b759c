"""Single model files made from a small diffusers folder, for the node and host tests."""

from __future__ import annotations

from pathlib import Path


def write_single_file_vae(vae_folder: Path, out: Path) -> Path:
    """A single-file VAE; small models keep their config in the file's metadata (their group count cannot be read
    from the weights, unlike the released VAE's)."""
    from safetensors.torch import load_file, save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    config = (vae_folder / "config.json").read_text()
    save_file(load_file(vae_folder / "diffusion_pytorch_model.safetensors"), out, metadata={"config": config})
    return out
