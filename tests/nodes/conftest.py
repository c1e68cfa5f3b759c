"""Shared fixtures of the node tests: a models folder with small random CogVideoX models, in ComfyUI's layout."""

from __future__ import annotations

import shutil

import pytest

from builders import write_pipeline_folder
from tests.nodes.model_files import write_single_file_vae


@pytest.fixture(scope="session")
def models_root(tmp_path_factory):
    """models/cogvideox/<folders> plus single files made from the 5b folder's parts:
    diffusion_models/tiny_5b.safetensors, vae/tiny_vae.safetensors, text_encoders/tiny_t5.safetensors (with the
    tokenizer beside it, where a plain-Python run looks for it)."""
    root = tmp_path_factory.mktemp("models")
    five = write_pipeline_folder(root / "cogvideox" / "tiny-5b", "5b")
    write_pipeline_folder(root / "cogvideox" / "tiny-1.5-i2v", "1.5-5b-i2v", seed=3)
    (root / "cogvideox" / "not-a-model.txt").write_text("stray file")
    for folder, src, name in [("diffusion_models", "transformer/diffusion_pytorch_model.safetensors", "tiny_5b"),
                              ("text_encoders", "text_encoder/model.safetensors", "tiny_t5")]:
        (root / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(five / src, root / folder / f"{name}.safetensors")
    write_single_file_vae(five / "vae", root / "vae" / "tiny_vae.safetensors")
    shutil.copytree(five / "tokenizer", root / "text_encoders" / "tokenizer")
    return root



@pytest.fixture
def models(models_root, monkeypatch):
    monkeypatch.setenv("COGVX_MODELS_DIR", str(models_root))
    return models_root
