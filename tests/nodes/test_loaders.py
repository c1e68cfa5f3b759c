"""The node contract ComfyUI reads (V1), the loaders' choices, single files against folders, and loader errors."""

from __future__ import annotations

import pytest
import torch

import nodes
from cogvx_core.errors import CogVXError
from nodes import NODE_CLASS_MAPPINGS as N

NODE_IDS = ["CogVXModelLoader", "CogVXVAELoader", "CogVXT5Loader", "CogVXTextEncode", "CogVXEmptyLatent",
            "CogVXImageToVideo", "CogVXVideoEncode", "CogVXSampler", "CogVXDecode"]
CORE_TYPES = {"MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE", "MASK", "VIDEO", "AUDIO", "STRING", "INT",
              "FLOAT", "BOOLEAN", "SAMPLER", "SIGMAS", "NOISE", "GUIDER"}


def test_every_node_has_the_v1_contract(models):
    assert set(NODE_IDS) <= set(N) and set(N) == set(nodes.NODE_DISPLAY_NAME_MAPPINGS)
    loose = {k: c.CATEGORY for k, c in N.items() if not (c.CATEGORY.startswith("CogVX/") and c.CATEGORY.count("/") == 1)}
    assert not loose, loose  # every node sits in a folder of the CogVX menu (loaders, sampling, ...)
    for node_id in NODE_IDS:
        cls = N[node_id]
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"} and spec["required"]
        assert callable(getattr(cls(), cls.FUNCTION))
        assert isinstance(cls.RETURN_TYPES, tuple) and cls.CATEGORY.startswith("CogVX/") and cls.DESCRIPTION
        for section in ("required", "optional"):
            for name, value in spec.get(section, {}).items():
                kind = value[0]
                assert isinstance(kind, list) or kind in CORE_TYPES or kind.startswith("COGVX_"), (node_id, name)


def test_own_types_only_for_the_model_objects():
    assert N["CogVXModelLoader"].RETURN_TYPES == ("COGVX_MODEL",)
    assert N["CogVXVAELoader"].RETURN_TYPES == ("COGVX_VAE",)
    assert N["CogVXT5Loader"].RETURN_TYPES == ("COGVX_T5",)
    assert N["CogVXTextEncode"].RETURN_TYPES == ("CONDITIONING",)
    assert N["CogVXEmptyLatent"].RETURN_TYPES == ("LATENT",)
    assert N["CogVXImageToVideo"].RETURN_TYPES == ("LATENT", "LATENT")
    assert N["CogVXVideoEncode"].RETURN_TYPES == ("LATENT",)
    assert N["CogVXSampler"].RETURN_TYPES == ("LATENT",)
    assert N["CogVXDecode"].RETURN_TYPES == ("IMAGE",)
    sampler = N["CogVXSampler"].INPUT_TYPES()["required"]
    assert [sampler[k][0] for k in ("positive", "negative", "latent")] == ["CONDITIONING", "CONDITIONING", "LATENT"]


def test_choices_list_model_folders_and_single_files(models):
    from cogvx_core.models import builtin_models

    tiny = "cogvx-tiny (built in)"
    first = [tiny] if builtin_models() else []  # the shipped model leads each list
    assert N["CogVXModelLoader"].INPUT_TYPES()["required"]["model"][0] == first + ["tiny-1.5-i2v", "tiny-5b",
                                                                                   "tiny_5b.safetensors"]
    assert N["CogVXVAELoader"].INPUT_TYPES()["required"]["vae"][0] == [f"{t}/vae" for t in first] + [
        "tiny-1.5-i2v/vae", "tiny-5b/vae", "tiny_vae.safetensors"]
    assert N["CogVXT5Loader"].INPUT_TYPES()["required"]["t5"][0] == [f"{t}/text_encoder" for t in first] + [
        "tiny-1.5-i2v/text_encoder", "tiny-5b/text_encoder", "tiny_t5.safetensors"]


def test_single_files_load_the_same_models_as_the_folder(models):
    (folder_model,) = N["CogVXModelLoader"]().load("tiny-5b", "fp32")
    (file_model,) = N["CogVXModelLoader"]().load("tiny_5b.safetensors", "fp32")
    assert folder_model.variant is file_model.variant and folder_model.variant.name == "5b"
    a, b = folder_model.transformer.state_dict(), file_model.transformer.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert folder_model.scaling_factor == file_model.scaling_factor == 0.7

    (folder_vae,) = N["CogVXVAELoader"]().load("tiny-5b/vae", "fp32")
    (file_vae,) = N["CogVXVAELoader"]().load("tiny_vae.safetensors", "fp32")
    z = torch.randn(1, 16, 1, 4, 4)
    torch.testing.assert_close(folder_vae.vae.decode(z), file_vae.vae.decode(z), rtol=0, atol=0)

    (folder_t5,) = N["CogVXT5Loader"]().load("tiny-5b/text_encoder")
    (file_t5,) = N["CogVXT5Loader"]().load("tiny_t5.safetensors")
    assert folder_t5.encoder.max_length == 12  # the folder's transformer text length
    assert file_t5.encoder.max_length == 226  # a single file: the released models' length
    short = N["CogVXTextEncode"]().encode(folder_t5, "a red fox")["result"][0][0][0]
    long = N["CogVXTextEncode"]().encode(file_t5, "a red fox")["result"][0][0][0]
    assert short.shape == (1, 12, 32) and long.shape == (1, 226, 32)


def test_dtype_and_fp8_storage(models):
    (model,) = N["CogVXModelLoader"]().load("tiny-5b", "bf16", "fp8_e4m3fn")
    assert model.transformer.dtype == torch.bfloat16
    weights = dict(model.transformer.named_parameters())
    assert weights["transformer_blocks.0.attn1.to_q.weight"].dtype == torch.float8_e4m3fn
    assert weights["patch_embed.proj.weight"].dtype == torch.bfloat16
    (auto,) = N["CogVXModelLoader"]().load("tiny-5b")  # auto on the CPU: fp32
    assert auto.transformer.dtype == torch.float32


def test_missing_and_wrong_models_are_refused_with_the_fix(models):
    with pytest.raises(CogVXError, match="'gone' is not in the cogvideox model folder.*models/cogvideox.*README"):
        N["CogVXModelLoader"]().load("gone")
    with pytest.raises(CogVXError, match="models/vae"):
        N["CogVXVAELoader"]().load("gone.safetensors")
    with pytest.raises(CogVXError, match="escape.*not in the cogvideox model folder"):
        N["CogVXModelLoader"]().load("../escape")
    misplaced = models / "diffusion_models" / "misplaced_vae.safetensors"
    misplaced.write_bytes((models / "vae" / "tiny_vae.safetensors").read_bytes())
    try:
        with pytest.raises(CogVXError, match="this file is a VAE; load it with the VAE loader"):
            N["CogVXModelLoader"]().load("misplaced_vae.safetensors")
    finally:
        misplaced.unlink()


def test_fingerprints_follow_the_files(models):
    before = N["CogVXVAELoader"].IS_CHANGED("tiny_vae.safetensors")
    assert N["CogVXVAELoader"].IS_CHANGED("tiny_vae.safetensors") == before
    path = models / "vae" / "tiny_vae.safetensors"
    data = path.read_bytes()
    path.write_bytes(data + b" ")  # a replaced file (size and time change)
    try:
        assert N["CogVXVAELoader"].IS_CHANGED("tiny_vae.safetensors") != before
    finally:
        path.write_bytes(data)
    assert N["CogVXModelLoader"].IS_CHANGED("gone") == "gone"  # a missing model is left to validation


def test_requirements_txt_follows_pyproject():
    """ComfyUI-Manager installs requirements.txt: the same runtime dependencies as pyproject.toml, minus torch
    (ComfyUI brings its own build)."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    declared = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    listed = [line.strip() for line in (root / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert listed == [d for d in declared if not d.startswith("torch")]
