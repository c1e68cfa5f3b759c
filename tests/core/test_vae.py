"""The CogVideoX VAE against diffusers 0.42.1's AutoencoderKLCogVideoX (the oracle), and its checkpoint loading.

Parity bar: fp32 relative L2 error <= 1e-5 (in practice the outputs are bit-identical).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from cogvx_core import build_vae, load_vae
from cogvx_core.errors import CheckpointError, CogVXError
from cogvx_core.modules import causal_conv
from cogvx_core.vae import CausalVAE, Tiling, frame_chunks
from tests.core.vae_fixtures import (
    TINY_VAE_CONFIG, WEIGHTS_ONLY_VAE_CONFIG, random_state_dict, reference_vae, rel_l2, sat_key, vae_pair)

pytest.importorskip("diffusers", reason="diffusers is the test oracle for VAE parity")

TOL = 1e-5
# Tiles of 32x32 pixels (4x4 latents) with 1/4 overlap: several overlapping tiles in both directions, with strides
# (3 latents = 24 pixels) equal to the crop sizes, so the tiled output has the untiled size.
SMALL_TILES = dict(tile_sample_min_height=32, tile_sample_min_width=32,
                   tile_overlap_factor_height=0.25, tile_overlap_factor_width=0.25)
# Settings whose stride and crop disagree: diffusers then returns a wider image, which must be reproduced as well.
ODD_TILES = dict(SMALL_TILES, tile_overlap_factor_width=0.3)


def tiling(reference_kwargs: dict) -> Tiling:
    """Our Tiling for the reference's enable_tiling keywords."""
    return Tiling(tile_height=reference_kwargs["tile_sample_min_height"],
                  tile_width=reference_kwargs["tile_sample_min_width"],
                  overlap_height=reference_kwargs["tile_overlap_factor_height"],
                  overlap_width=reference_kwargs["tile_overlap_factor_width"])


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    return vae_pair(TINY_VAE_CONFIG, seed=1)


def _pixels(*shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _latents(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------- structure

def test_state_dict_keys_and_shapes_equal_diffusers_for_the_released_config():
    from diffusers import AutoencoderKLCogVideoX

    with torch.device("meta"):
        reference = AutoencoderKLCogVideoX()
    ours = build_vae({})
    ref_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == ref_shapes
    assert len(ref_shapes) == 436
    assert ours.device.type == "meta"
    assert ours.scaling_factor == 1.15258426 and ours.invert_scale_latents is False


def test_frame_chunks_put_the_remainder_in_the_first_chunk():
    assert frame_chunks(49, 8) == [(0, 9)] + [(i, i + 8) for i in range(9, 49, 8)]
    assert frame_chunks(13, 2) == [(0, 3)] + [(i, i + 2) for i in range(3, 13, 2)]
    assert frame_chunks(1, 2) == [(0, 1)]
    assert frame_chunks(5, 8) == [(0, 5)]


# ---------------------------------------------------------------------------------------------------- encode

@pytest.mark.parametrize("frames,batch", [(1, 1), (9, 1), (17, 2)])
def test_encode_matches_diffusers(pair, frames, batch):
    ours, reference, _ = pair
    x = _pixels(batch, 3, frames, 16, 24, seed=frames)
    with torch.no_grad():
        expected = reference.encode(x).latent_dist
        posterior = ours.encode_posterior(x)
        mean = ours.encode(x)
    assert mean.shape == (batch, 4, (frames - 1) // 4 + 1, 2, 3)
    assert rel_l2(mean, expected.mean) <= TOL
    assert rel_l2(posterior.mean, expected.mean) <= TOL
    assert rel_l2(posterior.logvar, expected.logvar) <= TOL
    assert rel_l2(posterior.std, expected.std) <= TOL
    assert torch.equal(posterior.mode(), posterior.mean)


def test_posterior_sample_draws_like_diffusers(pair):
    ours, reference, _ = pair
    x = _pixels(2, 3, 5, 16, 24, seed=3)
    with torch.no_grad():
        expected = reference.encode(x).latent_dist.sample(torch.Generator().manual_seed(42))
        got = ours.encode_posterior(x).sample(torch.Generator().manual_seed(42))
        other_seed = ours.encode_posterior(x).sample(torch.Generator().manual_seed(43))
    assert rel_l2(got, expected) <= TOL
    assert rel_l2(other_seed, expected) > 1e-3  # the noise really comes from the generator


def test_encode_with_autograd_on_matches_too(pair):
    """The out-of-place path (no in-place updates while a graph is recorded) gives the same numbers."""
    ours, reference, _ = pair
    x = _pixels(1, 3, 9, 16, 24, seed=5)
    with torch.no_grad():
        expected = reference.encode(x).latent_dist.mean
    got = ours.encode(x)
    assert got.requires_grad
    assert rel_l2(got.detach(), expected) <= TOL


# ---------------------------------------------------------------------------------------------------- decode

@pytest.mark.parametrize("frames", [1, 2, 3, 5, 7])
def test_decode_matches_diffusers(pair, frames):
    ours, reference, _ = pair
    z = _latents(1, 4, frames, 3, 5, seed=frames)
    with torch.no_grad():
        expected = reference.decode(z).sample
        got = ours.decode(z)
    assert got.shape == expected.shape == (1, 3, ours.pixel_frames(frames), 24, 40)
    assert rel_l2(got, expected) <= TOL


def test_decode_with_autograd_on_and_batch_of_two_matches(pair):
    ours, reference, _ = pair
    z = _latents(2, 4, 3, 2, 3, seed=11)
    with torch.no_grad():
        expected = reference.decode(z).sample
    got = ours.decode(z)
    assert rel_l2(got.detach(), expected) <= TOL


def test_half_precision_matches_diffusers(pair):
    """bf16 (the 5b/1.5 pipelines' dtype): same ops in the same order, so the same rounding."""
    import copy

    ours, reference = (copy.deepcopy(m).to(torch.bfloat16) for m in pair[:2])
    x = _pixels(1, 3, 9, 16, 24, seed=12).to(torch.bfloat16)
    z = _latents(1, 4, 3, 3, 5, seed=13).to(torch.bfloat16)
    with torch.no_grad():
        assert rel_l2(ours.encode(x), reference.encode(x).latent_dist.mean) <= TOL
        assert rel_l2(ours.decode(z), reference.decode(z).sample) <= TOL


# ---------------------------------------------------------------------------------------------------- tiling

_TILE_ATTRS = ("tile_sample_min_height", "tile_sample_min_width", "tile_latent_min_height", "tile_latent_min_width",
               "tile_overlap_factor_height", "tile_overlap_factor_width")


def _reference_tiled(reference, fn, x, **tiles):
    """fn(x) with diffusers' tiling enabled with `tiles`; its settings are restored afterwards, because
    enable_tiling keeps earlier settings for unset arguments."""
    saved = {a: getattr(reference, a) for a in _TILE_ATTRS}
    reference.enable_tiling(**tiles)
    try:
        with torch.no_grad():
            return fn(x)
    finally:
        reference.disable_tiling()
        for a, v in saved.items():
            setattr(reference, a, v)


@pytest.mark.slow
def test_tiled_decode_matches_diffusers(pair):
    ours, reference, _ = pair
    z = _latents(1, 4, 3, 7, 7, seed=7)  # 4x4-latent tiles with stride 3: 3 x 3 tiles, blended both ways
    expected = _reference_tiled(reference, lambda v: reference.decode(v).sample, z, **SMALL_TILES)
    with torch.no_grad():
        plain = ours.decode(z)
        got = ours.decode(z, tiling=tiling(SMALL_TILES))
    assert got.shape == expected.shape == plain.shape
    assert rel_l2(got, expected) <= TOL
    assert rel_l2(got, plain) > 1e-4  # tiling really happened

    expected = _reference_tiled(reference, lambda v: reference.decode(v).sample, z, **ODD_TILES)
    with torch.no_grad():
        got = ours.decode(z, tiling=tiling(ODD_TILES))
    assert got.shape == expected.shape != plain.shape  # the reference's wider result is reproduced too
    assert rel_l2(got, expected) <= TOL


@pytest.mark.slow
def test_tiled_encode_matches_diffusers(pair):
    ours, reference, _ = pair
    x = _pixels(1, 3, 9, 72, 88, seed=8)  # 32x32-pixel tiles with stride 24: 3 x 4 tiles
    expected = _reference_tiled(reference, lambda v: reference.encode(v).latent_dist.mean, x, **SMALL_TILES)
    with torch.no_grad():
        got = ours.encode(x, tiling=tiling(SMALL_TILES))
        plain = ours.encode(x)
    assert got.shape == expected.shape == plain.shape
    assert rel_l2(got, expected) <= TOL
    assert rel_l2(got, plain) > 1e-4
    expected = _reference_tiled(reference, lambda v: reference.encode(v).latent_dist.mean, x, **ODD_TILES)
    with torch.no_grad():
        assert rel_l2(ours.encode(x, tiling=tiling(ODD_TILES)), expected) <= TOL


@pytest.mark.slow
def test_tiled_true_uses_the_reference_defaults_from_the_config(pair):
    ours, reference, _ = pair
    z = _latents(1, 4, 2, 9, 16, seed=9)  # default tiles: 6x10 latents, overlap 1/6 and 1/5: 2 x 2 tiles
    expected = _reference_tiled(reference, lambda v: reference.decode(v).sample, z)
    with torch.no_grad():
        got = ours.decode(z, tiling=Tiling())
        plain = ours.decode(z)
    assert got.shape == expected.shape == plain.shape
    assert rel_l2(got, expected) <= TOL
    assert rel_l2(got, plain) > 1e-4


def test_progress_is_reported_per_chunk_and_can_cancel(pair):
    ours, _, _ = pair
    calls = []
    with torch.no_grad():
        ours.decode(_latents(1, 4, 5, 2, 2), progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 2), (2, 2)]  # 5 latent frames = chunks of 3 + 2

    calls.clear()
    with torch.no_grad():
        ours.decode(_latents(1, 4, 2, 6, 4), progress=lambda d, t: calls.append((d, t)), tiling=tiling(SMALL_TILES))
    assert calls == [(i, 4) for i in (1, 2, 3, 4)]  # 2 x 2 tiles of one chunk each

    class Stop(Exception):
        pass

    def cancel(done, total):
        raise Stop

    with pytest.raises(Stop), torch.no_grad():
        ours.encode(_pixels(1, 3, 17, 8, 8), progress=cancel)


# ---------------------------------------------------------------------------------------------------- safe conv

def test_safe_conv_time_chunks_give_the_unchunked_result(monkeypatch):
    conv = causal_conv.SafeConv3d(4, 5, kernel_size=3, padding=(0, 1, 1))
    x = torch.randn(1, 4, 11, 6, 7)
    with torch.no_grad():
        whole = conv(x)
        monkeypatch.setattr(causal_conv, "SAFE_CONV_GIB", x.numel() * 2 / 1024**3 / 3.5)  # -> 4 chunks
        assert len(conv._time_slices(x)) == 4
        chunked = conv(x)
    assert chunked.shape == whole.shape
    assert rel_l2(chunked, whole) <= 1e-6


# ---------------------------------------------------------------------------------------------------- input checks

@pytest.mark.parametrize("shape,message", [
    ((1, 3, 10, 16, 16), "got 10 frames; use 9 or 13"),
    ((1, 3, 9, 20, 16), "divisible by 8"),
    ((1, 4, 9, 16, 16), "expects 3 channels"),
    ((1, 3, 16, 16), "(B, C, T, H, W)"),
])
def test_encode_rejects_bad_input(pair, shape, message):
    ours, _, _ = pair
    with pytest.raises(CogVXError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ours.encode(torch.zeros(shape))


@pytest.mark.parametrize("shape,message", [((1, 5, 2, 4, 4), "4 latent channels"), ((1, 4, 4, 4), "latents")])
def test_decode_rejects_bad_input(pair, shape, message):
    ours, _, _ = pair
    with pytest.raises(CogVXError, match=message):
        ours.decode(torch.zeros(shape))


# ---------------------------------------------------------------------------------------------------- loading

def _decode_parity(vae: CausalVAE, reference, z):
    with torch.no_grad():
        return rel_l2(vae.decode(z), reference.decode(z).sample)


def test_load_diffusers_folder_model_root_and_shards(pair, tmp_path):
    _, reference, _ = pair
    reference.save_pretrained(tmp_path / "model" / "vae")
    (tmp_path / "model" / "model_index.json").write_text("{}")
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="30KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    z = _latents(1, 4, 3, 2, 3)
    for path in (tmp_path / "model" / "vae", tmp_path / "model", tmp_path / "sharded"):
        vae = load_vae(path)
        assert vae.scaling_factor == 0.7 and vae.config["norm_num_groups"] == 4
        assert all(p.device.type == "cpu" for p in vae.parameters())
        assert _decode_parity(vae, reference, z) <= TOL
    assert not vae.decode(z).requires_grad  # frozen weights: no graph even with autograd on


def test_load_in_another_dtype_converts_every_tensor(pair, tmp_path):
    _, reference, _ = pair
    reference.save_pretrained(tmp_path / "vae")
    vae = load_vae(tmp_path / "vae", dtype=torch.bfloat16)
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}
    assert vae.dtype == torch.bfloat16


@pytest.mark.parametrize("prefix", ["", "vae.", "first_stage_model."])
def test_load_single_file_with_config_metadata(pair, tmp_path, prefix):
    _, reference, state = pair
    path = tmp_path / "cogvideox_vae.safetensors"
    save_file({prefix + k: v.to(torch.bfloat16) for k, v in state.items()}, str(path),
              metadata={"config": json.dumps(TINY_VAE_CONFIG)})
    vae = load_vae(path, dtype=torch.float32)
    assert vae.scaling_factor == 0.7
    # bf16-rounded weights against the reference with the same rounded weights
    rounded = reference_vae(TINY_VAE_CONFIG, {k: v.to(torch.bfloat16).float() for k, v in state.items()})
    assert _decode_parity(vae, rounded, _latents(1, 4, 2, 2, 3)) <= TOL
    assert load_vae(path).dtype == torch.bfloat16  # dtype None keeps the stored dtype


def test_load_sat_layout_file_infers_the_architecture(tmp_path):
    shapes = {k: tuple(v.shape) for k, v in build_vae(WEIGHTS_ONLY_VAE_CONFIG).state_dict().items()}
    state = random_state_dict(shapes, seed=3)
    reference = reference_vae(WEIGHTS_ONLY_VAE_CONFIG, state)
    sat = {sat_key(k, 4): v for k, v in state.items()}
    assert "decoder.up.3.block.0.norm1.conv_y.conv.weight" in sat and "encoder.mid.block_1.conv1.conv.bias" in sat
    sat["loss.discriminator.main.0.weight"] = torch.zeros(2, 2)  # SAT training leftovers are dropped
    path = tmp_path / "3d-vae.safetensors"
    save_file(sat, str(path))
    vae = load_vae(path)
    assert vae.scaling_factor is None  # not in the file: the pipeline takes it from the variant
    for key in ("block_out_channels", "latent_channels", "layers_per_block"):
        assert vae.config[key] == WEIGHTS_ONLY_VAE_CONFIG[key]
    assert _decode_parity(vae, reference, _latents(1, 8, 2, 2, 2)) <= TOL
    # the same weights in diffusers layout, no metadata, behind a prefix
    save_file({"first_stage_model." + k: v for k, v in state.items()}, str(tmp_path / "plain.safetensors"))
    assert load_vae(tmp_path / "plain.safetensors").config["block_out_channels"] == [32, 32, 32, 64]


def test_weights_only_file_with_unreadable_group_count_is_refused(pair, tmp_path):
    _, _, state = pair
    save_file(state, str(tmp_path / "tiny.safetensors"))
    with pytest.raises(CheckpointError, match="group count"):
        load_vae(tmp_path / "tiny.safetensors")


def test_load_errors_name_the_problem_and_the_fix(pair, tmp_path):
    _, reference, state = pair
    # truncated file
    path = tmp_path / "vae.safetensors"
    save_file(state, str(path), metadata={"config": json.dumps(TINY_VAE_CONFIG)})
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_vae(tmp_path / "cut.safetensors")
    # a diffusers folder without config.json
    reference.save_pretrained(tmp_path / "noconfig")
    (tmp_path / "noconfig" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="noconfig.*config.json"):
        load_vae(tmp_path / "noconfig")
    # pickles are never opened
    (tmp_path / "vae.pt").write_bytes(b"not even read")
    with pytest.raises(CheckpointError, match="pickled"):
        load_vae(tmp_path / "vae.pt")
    # a transformer given to the VAE loader
    save_file({"transformer_blocks.0.attn1.to_q.weight": torch.zeros(4, 4), "patch_embed.proj.weight": torch.zeros(4)},
              str(tmp_path / "transformer.safetensors"))
    with pytest.raises(CheckpointError, match="transformer"):
        load_vae(tmp_path / "transformer.safetensors")
    (tmp_path / "tfolder").mkdir()
    (tmp_path / "tfolder" / "config.json").write_text(json.dumps({"_class_name": "CogVideoXTransformer3DModel"}))
    with pytest.raises(CheckpointError, match="transformer"):
        load_vae(tmp_path / "tfolder")
    # a VAE file of another architecture
    wrong = dict(state)
    wrong.pop("decoder.conv_out.conv.bias")
    save_file(wrong, str(tmp_path / "partial.safetensors"), metadata={"config": json.dumps(TINY_VAE_CONFIG)})
    with pytest.raises(CheckpointError, match="missing"):
        load_vae(tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        load_vae(tmp_path / "nothing.safetensors")


def test_tiling_settings_without_a_stride_are_refused(pair):
    ours, _, _ = pair
    with pytest.raises(CogVXError, match="stride"):
        ours.decode(_latents(1, 4, 1, 8, 8), tiling=Tiling(tile_height=8, tile_width=32))
    with pytest.raises(CogVXError, match="overlap"):
        ours.decode(_latents(1, 4, 1, 8, 8), tiling=Tiling(overlap_width=1.5))
