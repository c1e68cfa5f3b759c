"""The expert transformer against the reference (diffusers) on small random models of every released variant."""

import pytest
import torch

from builders import randomize_, reference_forward, reference_transformer, rel_l2, small_transformer_config
from cogvx_core import CogVXError, build_transformer
from cogvx_core.variants import VARIANTS

TOL = 1e-5  # a correct port lands near 2e-7; position bugs show near 1e-4 with sharpened attention

# (latent frames, latent height, latent width): the sample size first, then off-size grids (landscape, portrait)
SIZES = {
    "2b": [(3, 16, 24), (2, 12, 20), (5, 20, 14)],
    "5b": [(3, 16, 24), (2, 12, 20), (5, 20, 14)],
    "5b-i2v": [(3, 16, 24), (2, 16, 24)],  # learned positions: sample size only; other lengths use sin-cos
    "1.5-5b": [(4, 30, 30), (4, 12, 20), (2, 20, 14)],
    "1.5-5b-i2v": [(4, 30, 30), (4, 12, 20), (2, 20, 14)],
}


@pytest.fixture(scope="module")
def models():
    out = {}
    for name in VARIANTS:
        cfg = small_transformer_config(name)
        ours = randomize_(build_transformer(cfg, device="cpu"), seed=hash(name) % 1000)
        out[name] = (cfg, ours, reference_transformer(cfg, ours.state_dict()))
    return out


def _inputs(cfg, t, h, w, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg["in_channels"], t, h, w, generator=g)
    ctx = torch.randn(batch, cfg["max_text_seq_length"], cfg["text_embed_dim"], generator=g)
    ts = torch.tensor([999, 421][:batch])
    ofs = torch.tensor([2.0]) if cfg["ofs_embed_dim"] else None
    return x, ts, ctx, ofs


@pytest.mark.parametrize("name,size", [(n, s) for n, sizes in SIZES.items() for s in sizes])
def test_parity_fp32(models, name, size):
    cfg, ours, ref = models[name]
    x, ts, ctx, ofs = _inputs(cfg, *size)
    with torch.no_grad():
        got = ours(x, ts, ctx, ofs)
        want = reference_forward(ref, x, ts, ctx, ofs)
    assert got.shape == x[:, :cfg["out_channels"]].shape
    assert rel_l2(got, want) <= TOL


def test_parity_catches_a_position_bug(models, monkeypatch):
    """The bound is tight enough to see ComfyUI's 1.0 RoPE grid bug (positions scaled by 1.875, no crop region)."""
    import cogvx_core.modules.embeddings as emb
    import cogvx_core.transformer as tr

    cfg, ours, ref = models["5b"]
    x, ts, ctx, ofs = _inputs(cfg, 2, 12, 20)

    def scaled_grid(head_dim, t, h, w, base_size, device):
        angles = emb.rope_3d_angles(head_dim, t, h, w, base_size=None, device=torch.device(device))
        angles = angles.clone()  # h and w angle groups follow the 8 time angles: scale them by 1.875
        angles[:, head_dim // 8:] *= 1.875
        return emb.rope_rotation(angles)

    monkeypatch.setattr(tr, "_rope_cache", scaled_grid)
    with torch.no_grad():
        err = rel_l2(ours(x, ts, ctx, ofs), reference_forward(ref, x, ts, ctx, ofs))
    assert err > 10 * TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_reference(models, dtype):
    cfg, ours, ref = models["1.5-5b-i2v"]
    x, ts, ctx, ofs = _inputs(cfg, 2, 12, 20)
    ours16 = build_transformer(cfg, device="cpu", dtype=dtype)
    ours16.load_state_dict(ours.state_dict())
    ref16 = reference_transformer(cfg, ours.state_dict(), dtype=dtype)
    with torch.no_grad():
        got = ours16(x.to(dtype), ts, ctx.to(dtype), ofs)
        want = reference_forward(ref16, x.to(dtype), ts, ctx.to(dtype), ofs)
        exact = reference_forward(ref, x, ts, ctx, ofs)
    assert got.dtype == dtype
    # as close to the fp32 result as the reference's own half-precision run is, within rounding noise
    assert rel_l2(got, exact) <= 1.5 * rel_l2(want, exact) + 1e-3


def test_batch_items_are_independent(models):
    cfg, ours, _ = models["5b"]
    x, ts, ctx, _ = _inputs(cfg, 2, 12, 20)
    with torch.no_grad():
        both = ours(x, ts, ctx)
        first = ours(x[:1], ts[:1], ctx[:1])
    assert rel_l2(both[:1], first) < 1e-6


def test_gradient_checkpointing_same_gradients(models):
    cfg, ours, _ = models["1.5-5b"]
    x, ts, ctx, _ = _inputs(cfg, 2, 12, 20, batch=1)
    grads = []
    for ckpt in (False, True):
        ours.zero_grad()
        ours.gradient_checkpointing = ckpt
        ours.requires_grad_(True)
        ours(x, ts, ctx).square().mean().backward()
        grads.append(ours.transformer_blocks[0].attn1.to_q.weight.grad.clone())
    ours.gradient_checkpointing = False
    ours.requires_grad_(False)
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    assert grads[0].abs().sum() > 0


# -- released configs -------------------------------------------------------------------------------------------
# Stored element counts (parameters + persistent buffers) of the reference models (spec 1.1 and 2.6).
RELEASED_NUMEL = {"2b": 1_693_783_872, "5b": 5_570_283_072, "5b-i2v": 5_570_479_680 + 17776 * 3072,
                  "1.5-5b": 5_570_676_352, "1.5-5b-i2v": 5_571_594_880}
RELEASED_KEYS = {"2b": 736, "5b": 1024, "5b-i2v": 1025, "1.5-5b": 1024, "1.5-5b-i2v": 1028}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_released_meta_build_matches_reference(name):
    from diffusers import CogVideoXTransformer3DModel

    cfg = VARIANTS[name].transformer_config()
    ours = build_transformer(cfg, device="meta").state_dict()
    with torch.device("meta"):
        ref = CogVideoXTransformer3DModel(**cfg).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert sum(v.numel() for v in ours.values()) == RELEASED_NUMEL[name]
    assert len(ours) == RELEASED_KEYS[name]


# -- input errors -----------------------------------------------------------------------------------------------
def test_input_errors(models):
    cfg15, m15, _ = models["1.5-5b"]
    x, ts, ctx, _ = _inputs(cfg15, 3, 12, 20)
    with pytest.raises(CogVXError, match="must be even.*Pad one latent frame"):
        m15(x, ts, ctx)
    x, ts, ctx, _ = _inputs(cfg15, 2, 13, 20)
    with pytest.raises(CogVXError, match="multiples of 16"):
        m15(x, ts, ctx)
    cfgi, mi, _ = models["5b-i2v"]
    x, ts, ctx, _ = _inputs(cfgi, 3, 12, 20)
    with pytest.raises(CogVXError, match="learned positions"):
        mi(x, ts, ctx)
    with pytest.raises(CogVXError, match="concatenate the image latents"):
        mi(x[:, :16], ts, ctx)


def test_tables_cached_under_inference_mode_serve_training(models):
    """ComfyUI samples under inference_mode; a later training step on the same grid must still backpropagate."""
    cfg, ours, _ = models["5b"]
    x, ts, ctx, _ = _inputs(cfg, 2, 10, 18, batch=1)  # a grid no other test uses, so the cache is filled here
    with torch.inference_mode():
        ours(x, ts, ctx)
    x.requires_grad_(True)
    ours(x, ts, ctx).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
