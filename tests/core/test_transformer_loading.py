"""Transformer checkpoints: diffusers folders (single and sharded), single files in every layout, fp8, errors."""

import json

import pytest
import torch
from safetensors.torch import save_file

from builders import (randomize_, reference_transformer, rel_l2, small_transformer_config, to_comfy_keys,
                      to_sat_keys)
from cogvx_core import CheckpointError, build_transformer, load_transformer
from cogvx_core.checkpoints.transformer import converted, detect_layout, infer_config
from cogvx_core.variants import VARIANTS


def _model(name, seed=3):
    cfg = small_transformer_config(name)
    return cfg, randomize_(build_transformer(cfg, device="cpu"), seed=seed)


def _run(model, cfg, t=2):
    g = torch.Generator().manual_seed(1)
    h, w = (cfg["sample_height"], cfg["sample_width"]) if cfg["use_learned_positional_embeddings"] else (12, 20)
    t = 3 if cfg["use_learned_positional_embeddings"] else t
    x = torch.randn(1, cfg["in_channels"], t, h, w, generator=g)
    ctx = torch.randn(1, cfg["max_text_seq_length"], cfg["text_embed_dim"], generator=g)
    with torch.no_grad():
        return model(x.to(model.dtype), torch.tensor([500]), ctx.to(model.dtype)).float()


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("sharded", [False, True])
def test_diffusers_folder(tmp_path, name, sharded):
    cfg, ours = _model(name)
    ref = reference_transformer(cfg, ours.state_dict())
    ref.save_pretrained(tmp_path / "transformer", safe_serialization=True,
                        max_shard_size="300KB" if sharded else "10GB")
    if sharded:
        assert list((tmp_path / "transformer").glob("*.index.json"))
    (tmp_path / "model_index.json").write_text("{}")
    loaded = load_transformer(tmp_path)  # a model root with transformer/
    assert loaded.variant is VARIANTS[name]
    assert rel_l2(_run(loaded, cfg), _run(ours, cfg)) < 1e-6  # same weights; kernels may differ by alignment


LAYOUTS = {
    "diffusers": lambda sd: sd,
    "diffusers-prefixed": lambda sd: {"model.diffusion_model." + k: v for k, v in sd.items()},
    "comfy": to_comfy_keys,
    "comfy-prefixed": lambda sd: {"model.diffusion_model." + k: v for k, v in to_comfy_keys(sd).items()},
    "sat": to_sat_keys,
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", ["2b", "5b", "5b-i2v", "1.5-5b", "1.5-5b-i2v"])
def test_single_file_layouts(tmp_path, layout, name):
    cfg, ours = _model(name)
    sd = {k: v.contiguous() for k, v in LAYOUTS[layout](ours.state_dict()).items()}
    path = tmp_path / "model.safetensors"
    # the sample size (which sets 1.0 RoPE and learned positions) of a non-released model is not in its shapes:
    # such files carry their config (the released sizes are recognised, see the next test)
    meta = {"config": json.dumps(cfg)} if name in ("5b", "5b-i2v") else None
    save_file(sd, str(path), metadata=meta)
    loaded = load_transformer(path, variant=name)  # the hint separates small 2b-style (sin-cos) from 5b-style
    assert loaded.variant is VARIANTS[name]
    assert rel_l2(_run(loaded, cfg), _run(ours, cfg)) < 1e-6  # same weights; kernels may differ by alignment


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("layout", ["diffusers", "comfy", "sat"])
def test_released_single_file_detection(name, layout):
    """The exact released config is recovered from the released tensor shapes, in every key layout."""
    released = VARIANTS[name].transformer_config()
    meta_sd = build_transformer(released, device="meta").state_dict()
    keys_shapes = LAYOUTS[layout](meta_sd)
    found_layout, prefix = detect_layout(list(keys_shapes), "test")
    assert found_layout == layout
    shapes = {k: tuple(v.shape) for k, v in converted(found_layout, prefix, iter(keys_shapes.items()))}
    model = build_transformer(infer_config(shapes, "test"), device="meta")
    assert model.variant is VARIANTS[name]
    assert model.config == build_transformer(released, device="meta").config


def test_bf16_file_loads_lean_and_fp8_storage(tmp_path):
    cfg, ours = _model("1.5-5b")
    path = tmp_path / "m.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in ours.state_dict().items()}, str(path))
    bf = load_transformer(path, variant="1.5-5b")
    assert {p.dtype for p in bf.state_dict().values()} == {torch.bfloat16}  # kept in the file's dtype
    f8 = load_transformer(path, variant="1.5-5b", weight_dtype="fp8_e4m3fn")
    dtypes = {k: v.dtype for k, v in f8.state_dict().items()}
    assert dtypes["transformer_blocks.0.attn1.to_q.weight"] == torch.float8_e4m3fn
    assert dtypes["transformer_blocks.0.ff.net.2.weight"] == torch.float8_e4m3fn
    assert dtypes["transformer_blocks.0.attn1.norm_q.weight"] == torch.bfloat16
    assert dtypes["proj_out.weight"] == torch.bfloat16
    exact = _run(ours, cfg)
    assert rel_l2(_run(bf, cfg), exact) < 2e-2
    assert rel_l2(_run(f8, cfg), exact) < 1.5e-1  # e4m3 has a 3-bit mantissa
    # an fp8 file stays fp8, computing in bf16
    path8 = tmp_path / "m8.safetensors"
    save_file({k: (v.to(torch.float8_e4m3fn) if "transformer_blocks" in k and "linear" not in k and "norm" not in k
                   and k.endswith("weight") else v.to(torch.bfloat16)).contiguous()
               for k, v in ours.state_dict().items()}, str(path8))
    m8 = load_transformer(path8, variant="1.5-5b")
    assert m8.dtype == torch.bfloat16
    assert m8.transformer_blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn


# -- errors a user can act on -------------------------------------------------------------------------------------
def test_errors(tmp_path):
    cfg, ours = _model("5b")
    good = tmp_path / "good.safetensors"
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, str(good))

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated.*download it again"):
        load_transformer(truncated)

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_transformer(corrupt)

    folder = tmp_path / "noconfig"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(good.read_bytes())
    with pytest.raises(CheckpointError, match="no config.json"):
        load_transformer(folder)

    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="never loaded.*safetensors"):
        load_transformer(pickled)

    with pytest.raises(CheckpointError, match="is a CogVideoX-5b transformer.*CogVideoX1.5-5B"):
        load_transformer(good, variant="1.5-5b")

    vae_like = tmp_path / "vae.safetensors"
    save_file({"decoder.conv_in.conv.weight": torch.zeros(4, 4, 3, 3, 3),
               "encoder.down_blocks.0.resnets.0.conv1.conv.weight": torch.zeros(4, 4, 3, 3, 3)}, str(vae_like))
    with pytest.raises(CheckpointError, match="is a VAE"):
        load_transformer(vae_like)

    wrong = tmp_path / "wrongshape"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 3}))
    (wrong / "diffusion_pytorch_model.safetensors").write_bytes(good.read_bytes())
    with pytest.raises(CheckpointError, match="has shape .* another model or variant"):
        load_transformer(wrong)
