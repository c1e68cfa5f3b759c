"""LoRAs: every file layout against the reference (diffusers + peft), strengths, stacking, re-weighting without a
reload, errors, fp8 bases, and the saved format loaded back by the reference's `load_lora_weights`."""

import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from builders import (randomize_, reference_forward, reference_transformer, rel_l2, small_transformer_config,
                      to_comfy_keys)
from cogvx_core import CheckpointError, CogVXError, build_transformer, load_transformer
from cogvx_core.checkpoints.lora import BLOCK_LAYERS, TOP_LAYERS, layer_name, lora_from_state_dict
from cogvx_core.lora import (add_trainable_lora, applied_loras, apply_loras, load_lora, lora_layers, lora_state_dict,
                             remove_loras, save_lora)
from cogvx_core.variants import VARIANTS

TOL = 1e-5  # fp32; a correct implementation lands near 1e-7
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # peft, on a second adapter

ATTN = ["transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_k", "transformer_blocks.0.attn1.to_v",
        "transformer_blocks.0.attn1.to_out.0", "transformer_blocks.1.attn1.to_q", "transformer_blocks.1.attn1.to_v",
        "transformer_blocks.1.attn1.to_out.0"]
WIDE = ATTN + ["transformer_blocks.0.ff.net.0.proj", "transformer_blocks.1.ff.net.2",
               "transformer_blocks.0.norm1.linear", "transformer_blocks.1.norm2.linear", "proj_out", "time_embedding.linear_1", "patch_embed.text_proj",
               "norm_out.linear"]


# -- models and inputs ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base():
    cfg = small_transformer_config("5b")
    model = randomize_(build_transformer(cfg, device="cpu"), seed=11)
    return cfg, model


def _inputs(cfg, t=2, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg["in_channels"], t, h, w, generator=g)
    ctx = torch.randn(1, cfg["max_text_seq_length"], cfg["text_embed_dim"], generator=g)
    return x, torch.tensor([700]), ctx


def _ours(model, cfg):
    with torch.no_grad():
        return model(*_inputs(cfg)).float()


def _reference(cfg, state_dict, loras=()):
    """The reference with LoRAs [(layers {name: (A, B)}, alpha, strength)] injected by peft, run on our inputs."""
    ref = reference_transformer(cfg, state_dict)
    names, weights = [], []
    for i, (layers, alpha, strength) in enumerate(loras):
        sd = {f"transformer.{n}.{k}.weight": t for n, (a, b) in layers.items() for k, t in (("lora_A", a),
                                                                                            ("lora_B", b))}
        rank = next(iter(layers.values()))[0].shape[0]
        meta = {"transformer.r": rank, "transformer.lora_alpha": alpha, "transformer.target_modules": list(layers)}
        ref.load_lora_adapter(sd, prefix="transformer", adapter_name=f"l{i}", metadata=meta)
        names.append(f"l{i}")
        weights.append(strength)
    if names:
        ref.set_adapters(names, weights)
    x, ts, ctx = _inputs(cfg)
    with torch.no_grad():
        return reference_forward(ref, x, ts, ctx).float()


def _random_lora(model, names, rank, seed, gain=0.4):
    """{name: (down (r, in[, k, k]), up (out, r[, 1, 1]))}, big enough to move the output clearly."""
    g = torch.Generator().manual_seed(seed)
    layers = lora_layers(model)
    out = {}
    for n in names:
        w = layers[n].weight
        a = torch.randn(rank, *w.shape[1:], generator=g) / w[0].numel() ** 0.5
        b = torch.randn(w.shape[0], rank, *[1] * (w.ndim - 2), generator=g) * gain / rank ** 0.5
        out[n] = (a, b)
    return out


# -- writers for each layout (the reverse of what the reader does) --------------------------------------------------
def _peft(layers, prefix="transformer."):
    return {f"{prefix}{n}.{k}.weight": t for n, (a, b) in layers.items() for k, t in (("lora_A", a), ("lora_B", b))}


def _alphas(layers, alpha, spelled):
    return {f"{spelled(n)}.alpha": torch.tensor(float(alpha)) for n in layers}


def _kohya(layers, alpha):
    sd = {}
    for n, (a, b) in layers.items():
        k = "lora_unet_" + n.replace(".", "_")
        sd.update({f"{k}.lora_down.weight": a, f"{k}.lora_up.weight": b, f"{k}.alpha": torch.tensor(float(alpha))})
    return sd


def _comfy(layers, alpha, down="lora_A.weight", up="lora_B.weight"):
    sd = {}
    for n, (a, b) in layers.items():
        (k, _), = to_comfy_keys({f"{n}.weight": None}).items()
        k = "diffusion_model." + k[: -len(".weight")]
        sd.update({f"{k}.{down}": a, f"{k}.{up}": b, f"{k}.alpha": torch.tensor(float(alpha))})
    return sd


def _sat(layers):
    sd, P = {}, "model.diffusion_model.transformer.layers."
    for n, (a, b) in layers.items():
        _, i, rest = n.split(".", 2)
        if rest == "attn1.to_out.0":
            key, j = f"{P}{i}.attention.dense", 0
        else:
            key, j = f"{P}{i}.attention.query_key_value", "qkv".index(rest[-1])
        sd.update({f"{key}.matrix_A.{j}": a, f"{key}.matrix_B.{j}": b})
    return sd


def _diffusers_meta(rank, alpha, names):
    return {"lora_adapter_metadata": json.dumps({"transformer.r": rank, "transformer.lora_alpha": alpha,
                                                 "transformer.target_modules": names})}


# layout id -> (layer names, rank, alpha the reference must use, (layers) -> (state dict, metadata))
LAYOUTS = {
    "peft-diffusers-metadata": (ATTN, 4, 6.0, lambda L: (_peft(L), _diffusers_meta(4, 6.0, list(L)))),
    "peft-unprefixed-alpha-tensors": (ATTN, 4, 2.0, lambda L: ({**_peft(L, ""), **_alphas(L, 2.0, str)}, None)),
    "peft-finetrainers-config": (ATTN, 8, 4.0, lambda L: (_peft(L), {"lora_config": json.dumps(
        {"r": 8, "lora_alpha": 4.0, "init_lora_weights": True, "target_modules": ["to_q", "to_k", "to_v"]})})),
    "peft-no-alpha": (ATTN, 4, 4.0, lambda L: (_peft(L), None)),  # no alpha anywhere: scale 1
    "diffusers-old-lora-down-up": (ATTN, 4, 3.0, lambda L: (
        {f"transformer.{n}.lora.{k}.weight": t for n, (a, b) in L.items() for k, t in (("down", a), ("up", b))},
        {"lora_alpha": "3.0"})),
    "kohya": (WIDE, 4, 1.0, lambda L: (_kohya(L, 1.0), None)),
    "comfy-lora-A-B": (WIDE, 4, 8.0, lambda L: (_comfy(L, 8.0), None)),
    "comfy-lora-down-up": (WIDE, 2, 1.0, lambda L: (_comfy(L, 1.0, "lora_down.weight", "lora_up.weight"), None)),
    "sat": (ATTN, 4, 1.0, lambda L: (_sat(L), None)),  # SAT trains at lora_alpha = 1
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_parity_with_reference(tmp_path, base, layout):
    cfg, model = base
    names, rank, alpha, write = LAYOUTS[layout]
    layers = _random_lora(model, names, rank, seed=len(layout))
    sd, meta = write(layers)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "l.safetensors", metadata=meta)

    lora = load_lora(tmp_path / "l.safetensors")
    assert sorted(lora.layers) == sorted(names) and not lora.unmatched
    report = apply_loras(model, [(lora, 0.8)])
    try:
        got = _ours(model, cfg)
    finally:
        remove_loras(model)
    assert report.entries[0].layers == len(names)
    want = _reference(cfg, model.state_dict(), [(layers, alpha, 0.8)])
    assert rel_l2(got, want) <= TOL
    assert rel_l2(want, _ours(model, cfg)) > 1e-2  # the LoRA does change the output: the check above can fail


def test_conv_patch_embedding_lora(tmp_path):
    """A 1.0 model's patch embedding is a Conv2d: ComfyUI's trainer puts a LoRA on it too."""
    cfg = small_transformer_config("2b")
    model = randomize_(build_transformer(cfg, device="cpu"), seed=5)
    names = ["patch_embed.proj", "transformer_blocks.0.attn1.to_q"]
    layers = _random_lora(model, names, 3, seed=2)
    assert layers["patch_embed.proj"][0].shape == (3, cfg["in_channels"], 2, 2)
    save_file(_kohya(layers, 2.0), tmp_path / "conv.safetensors")
    apply_loras(model, [(tmp_path / "conv.safetensors", 1.1)])
    got = _ours(model, cfg)
    remove_loras(model)
    assert rel_l2(got, _reference(cfg, model.state_dict(), [(layers, 2.0, 1.1)])) <= TOL


def _files(tmp_path, model, seeds=(1, 2)):
    """Two LoRA files (peft with alpha metadata, kohya with alpha tensors) and their ground truth."""
    a = _random_lora(model, ATTN, 4, seed=seeds[0])
    b = _random_lora(model, WIDE, 2, seed=seeds[1])
    save_file(_peft(a), tmp_path / "a.safetensors", metadata=_diffusers_meta(4, 8, ATTN))
    save_file(_kohya(b, 1.0), tmp_path / "b.safetensors")
    return (tmp_path / "a.safetensors", a, 8.0), (tmp_path / "b.safetensors", b, 1.0)


def test_strength_zero_is_the_base_model(tmp_path, base):
    cfg, model = base
    (pa, _, _), _ = _files(tmp_path, model)
    plain = _ours(model, cfg)
    apply_loras(model, [(pa, 0.0)])
    assert torch.equal(_ours(model, cfg), plain)
    remove_loras(model)


def test_stacked_and_negative_strengths(tmp_path, base):
    cfg, model = base
    (pa, a, alpha_a), (pb, b, alpha_b) = _files(tmp_path, model)
    report = apply_loras(model, [(pa, 1.3), (pb, -0.7)])
    got = _ours(model, cfg)
    remove_loras(model)
    assert [e.strength for e in report.entries] == [1.3, -0.7]
    want = _reference(cfg, model.state_dict(), [(a, alpha_a, 1.3), (b, alpha_b, -0.7)])
    assert rel_l2(got, want) <= TOL


def test_changing_strength_reuses_everything(tmp_path, base):
    cfg, model = base
    (pa, a, alpha_a), (pb, b, alpha_b) = _files(tmp_path, model)
    plain = _ours(model, cfg)
    apply_loras(model, [(pa, 1.0), (pb, 0.5)])
    modules = [id(m) for m in model.modules()]
    storage = sorted(t.data_ptr() for t in model.buffers())
    weights = [p.data_ptr() for p in model.parameters()]

    # a fresh load of the same unchanged files, other strengths: nothing reloaded or copied, nothing doubled
    report = apply_loras(model, [(load_lora(pa), -0.4), (pb, 1.5)])
    again = apply_loras(model, [(pa, -0.4), (pb, 1.5)])
    assert [id(m) for m in model.modules()] == modules
    assert sorted(t.data_ptr() for t in model.buffers()) == storage
    assert [p.data_ptr() for p in model.parameters()] == weights
    assert [e.strength for e in report.entries] == [e.strength for e in again.entries] == [-0.4, 1.5]
    assert applied_loras(model) == [("a", -0.4), ("b", 1.5)]
    got = _ours(model, cfg)
    want = _reference(cfg, model.state_dict(), [(a, alpha_a, -0.4), (b, alpha_b, 1.5)])
    assert rel_l2(got, want) <= TOL

    apply_loras(model, [(pb, 1.5)])  # dropping one LoRA keeps the other
    assert rel_l2(_ours(model, cfg), _reference(cfg, model.state_dict(), [(b, alpha_b, 1.5)])) <= TOL
    remove_loras(model)
    assert torch.equal(_ours(model, cfg), plain)
    assert not any("lora" in n for n, _ in model.named_modules())
    assert not any(m._forward_hooks for m in model.modules())


def test_fused_matches_unfused_and_unfuses(tmp_path, base):
    cfg, model = base
    (pa, _, _), (pb, _, _) = _files(tmp_path, model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_loras(model, [(pa, 0.9), (pb, -0.6)])
    unfused = _ours(model, cfg)
    report = apply_loras(model, [(pa, 0.9), (pb, -0.6)], fuse=True)
    assert report.fused
    assert rel_l2(_ours(model, cfg), unfused) <= TOL
    assert not torch.equal(model.state_dict()["proj_out.weight"], before["proj_out.weight"])
    apply_loras(model, [(pa, 0.9), (pb, -0.6)])  # back to unfused: weights restored (up to fp32 rounding)
    assert rel_l2(_ours(model, cfg), unfused) <= TOL
    remove_loras(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6)


def test_unmatched_keys_are_one_warning(tmp_path, base, caplog):
    cfg, model = base
    layers = _random_lora(model, ATTN[:2], 4, seed=3)
    extra = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 8),
             "transformer.transformer_blocks.0.norm1.norm.diff_b": torch.zeros(128)}
    far = {f"transformer.transformer_blocks.7.attn1.to_q.{k}.weight": t for k, t in
           (("lora_A", layers[ATTN[0]][0].clone()), ("lora_B", layers[ATTN[0]][1].clone()))}  # a deeper model's block
    save_file({**_peft(layers), **extra, **far}, tmp_path / "x.safetensors")
    with caplog.at_level(logging.WARNING):
        report = apply_loras(model, [(tmp_path / "x.safetensors", 1.0)])
        apply_loras(model, [(tmp_path / "x.safetensors", 0.5)])  # a new strength does not warn again
    remove_loras(model)
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "alpha" not in r.getMessage()]  # the file has no alpha: a note
    assert len(warnings) == 1
    for key in [*extra, "transformer_blocks.7.attn1.to_q"]:
        assert key in warnings[0]
    assert report.entries[0].layers == 2 and len(report.entries[0].unmatched) == 3


def test_lora_of_another_base_model_is_an_error(tmp_path, base):
    cfg, model = base
    flux = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 16),
            "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(16, 4)}
    save_file(flux, tmp_path / "flux.safetensors")
    with pytest.raises(CogVXError, match="another base model.*single_transformer_blocks"):
        load_lora(tmp_path / "flux.safetensors")
    deep = _random_lora(model, ATTN[:1], 4, seed=1)
    save_file(_peft({"transformer_blocks.9.attn1.to_q": deep[ATTN[0]]}), tmp_path / "deep.safetensors")
    with pytest.raises(CogVXError, match="matches no layer of this model.*another base model"):
        apply_loras(model, [(tmp_path / "deep.safetensors", 1.0)])
    assert applied_loras(model) == []


def test_lora_of_another_variant_width_is_a_shape_error(tmp_path, base):
    cfg, model = base
    wide = build_transformer(small_transformer_config("5b", num_attention_heads=3), device="cpu")
    save_file(_peft(_random_lora(wide, ATTN, 4, seed=1)), tmp_path / "wide.safetensors")
    (pa, _, _), _ = _files(tmp_path, model)
    apply_loras(model, [(pa, 1.0)])
    with pytest.raises(CogVXError, match=r"layer transformer_blocks\.0\.attn1\.to_[qkv].*\(192, 192\).*\(128, 128\)"):
        apply_loras(model, [(pa, 0.5), (tmp_path / "wide.safetensors", 1.0)])
    assert applied_loras(model) == [("a", 1.0)]  # a failed apply leaves the model as it was
    remove_loras(model)


def test_files_that_are_not_loras(tmp_path, base):
    cfg, model = base
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="transformer checkpoint, not a LoRA"):
        load_lora(tmp_path / "model.safetensors")
    save_file({"encoder.down.0.conv.weight": torch.zeros(2)}, tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match="VAE"):
        load_lora(tmp_path / "vae.safetensors")
    (tmp_path / "old.pt").write_bytes(b"\x80\x02")
    with pytest.raises(CheckpointError, match="never loaded"):
        load_lora(tmp_path / "old.pt")


def test_fp8_base_weights_with_a_lora(tmp_path, base):
    cfg, model = base
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors",
              metadata={"config": json.dumps(cfg)})  # a small model's sample size is not in its shapes
    fp8 = load_transformer(tmp_path / "model.safetensors", dtype=torch.float32, weight_dtype="fp8_e4m3fn")
    assert fp8.transformer_blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    (pa, a, alpha_a), (pb, b, alpha_b) = _files(tmp_path, model)
    apply_loras(fp8, [(pa, 1.0), (pb, 0.5)])
    got = _ours(fp8, cfg)
    dequantised = {k: v.float() for k, v in fp8.state_dict().items()}
    assert rel_l2(got, _reference(cfg, dequantised, [(a, alpha_a, 1.0), (b, alpha_b, 0.5)])) <= TOL
    with pytest.raises(CogVXError, match="fp8"):
        apply_loras(fp8, [(pa, 1.0)], fuse=True)


def test_trainable_lora_starts_at_the_base_and_trains_only_itself(base):
    cfg, model = base
    plain = _ours(model, cfg)
    params = add_trainable_lora(model, rank=4, alpha=8, generator=torch.Generator().manual_seed(0))
    try:
        assert len(params) == 2 * 4 * cfg["num_layers"]  # down and up on q, k, v, out of each block
        assert torch.equal(_ours(model, cfg), plain)  # B starts at zero
        model.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        model(*_inputs(cfg)).square().mean().backward()
        assert all(p.grad is not None for p in params)
        assert any(p.grad.abs().sum() > 0 for p in params[1::2])  # the ups get gradients first
        assert all(p.grad is None for n, p in model.named_parameters() if "lora" not in n)
        with pytest.raises(CogVXError, match="already has a trainable LoRA"):
            add_trainable_lora(model, rank=2)
        grads = [p.grad.clone() for p in params]  # gradient checkpointing runs the hooks again: same gradients
        model.zero_grad()
        model.gradient_checkpointing = True
        model(*_inputs(cfg)).square().mean().backward()
        for p, want in zip(params, grads):
            torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-7)
    finally:
        model.gradient_checkpointing = False
        remove_loras(model)


def test_loras_applied_in_inference_mode_work_under_autograd(tmp_path, base):
    """ComfyUI runs nodes under torch.inference_mode; a trainer may later backpropagate through those LoRAs."""
    cfg, model = base
    (pa, _, _), _ = _files(tmp_path, model)
    with torch.inference_mode():
        apply_loras(model, [(pa, 1.0)])
    x, ts, ctx = _inputs(cfg)
    x.requires_grad_(True)
    try:
        model(x, ts, ctx).square().mean().backward()
    finally:
        remove_loras(model)
    assert x.grad.abs().sum() > 0


def test_saved_lora_loads_in_the_reference_with_the_same_output(tmp_path, base):
    """save_lora -> diffusers' CogVideoXPipeline.load_lora_weights gives our frames, for alpha != rank."""
    from diffusers import CogVideoXPipeline

    cfg, model = base
    params = add_trainable_lora(model, rank=4, alpha=2.0, targets=("to_q", "to_k", "to_v", "to_out.0", "ff.net.2"),
                                generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # as if trained
        for p in params[1::2]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    try:
        trained = _ours(model, cfg)
        path = save_lora(tmp_path / "out" / "my_lora.safetensors", model, extra_metadata={"steps": 10})
        state = lora_state_dict(model)
    finally:
        remove_loras(model)
    assert len(state) == len(params)

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert sorted(f.keys()) == sorted(state)
    assert (meta["cogvx.rank"], meta["cogvx.alpha"], meta["cogvx.base_variant"]) == ("4", "2", "5b")
    assert meta["cogvx.targets"] == "ff.net.2,to_k,to_out.0,to_q,to_v" and meta["steps"] == "10"

    ref = reference_transformer(cfg, model.state_dict())
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=ref, scheduler=None)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    x, ts, ctx = _inputs(cfg)
    with torch.no_grad():
        theirs = reference_forward(ref, x, ts, ctx).float()
    assert rel_l2(theirs, trained) <= TOL

    # and back here through the reader
    apply_loras(model, [(path, 1.0)])
    assert rel_l2(_ours(model, cfg), trained) <= TOL
    remove_loras(model)

    # negative control: without the metadata diffusers assumes alpha = rank (twice as strong here)
    bare = reference_transformer(cfg, model.state_dict())
    bare.load_lora_adapter(dict(state), prefix="transformer")
    with torch.no_grad():
        assert rel_l2(reference_forward(bare, x, ts, ctx).float(), trained) > 100 * TOL


def test_save_converts_any_layout(tmp_path, base):
    """A kohya file saved again comes out in the diffusers layout with the same effect (per-layer alpha kept)."""
    cfg, model = base
    layers = _random_lora(model, WIDE, 4, seed=9)
    sd = _kohya(layers, 2.0)
    sd["lora_unet_proj_out.alpha"] = torch.tensor(1.0)  # one layer with another alpha: an alpha_pattern entry
    save_file(sd, tmp_path / "k.safetensors")
    path = save_lora(tmp_path / "d.safetensors", load_lora(tmp_path / "k.safetensors"))
    apply_loras(model, [(tmp_path / "k.safetensors", 1.0)])
    want = _ours(model, cfg)
    apply_loras(model, [(path, 1.0)])
    assert rel_l2(_ours(model, cfg), want) <= TOL
    remove_loras(model)
    ref = reference_transformer(cfg, model.state_dict())
    ref.load_lora_adapter(str(path.parent), weight_name=path.name, prefix="transformer")
    x, ts, ctx = _inputs(cfg)
    with torch.no_grad():
        assert rel_l2(reference_forward(ref, x, ts, ctx).float(), want) <= TOL


def test_base_variant_in_the_metadata_is_checked(tmp_path, base, caplog):
    cfg, model = base
    layers = _random_lora(model, ATTN, 4, seed=9)
    path = save_lora(tmp_path / "l.safetensors", _peft(layers), alpha=2, variant="2b")
    with caplog.at_level(logging.WARNING):
        apply_loras(model, [(path, 1.0)])
    remove_loras(model)
    assert "made for CogVideoX 2b" in caplog.text
    with pytest.raises(CogVXError, match="alpha=3 was given but the LoRA was made with alpha"):
        save_lora(tmp_path / "m.safetensors", load_lora(path), alpha=3)


def test_fused_qkv_lora_is_split_per_projection():
    """SAT's query_key_value is one layer: a LoRA on it (one down, one up for q, k and v) becomes three."""
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 128, generator=g), torch.randn(3 * 128, 4, generator=g)
    P = "model.diffusion_model.transformer.layers.1.attention."
    lora = lora_from_state_dict({P + "query_key_value.lora_down.weight": down,
                                 P + "query_key_value.lora_up.weight": up, P + "query_key_value.alpha":
                                 torch.tensor(2.0)})
    assert sorted(lora.layers) == [f"transformer_blocks.1.attn1.to_{x}" for x in "kqv"]
    for i, x in enumerate("qkv"):
        spec = lora.layers[f"transformer_blocks.1.attn1.to_{x}"]
        assert spec.scale == 0.5
        torch.testing.assert_close(spec.up @ spec.down, up[i * 128:(i + 1) * 128] @ down)


def test_adapters_of_other_kinds_are_refused(tmp_path):
    loha = {"transformer.transformer_blocks.0.attn1.to_q.hada_w1_a": torch.zeros(4, 2)}
    save_file(loha, tmp_path / "loha.safetensors")
    with pytest.raises(CogVXError, match="only LoRA down/up pairs"):
        load_lora(tmp_path / "loha.safetensors")


def test_layer_names_cover_every_variant():
    """The reader's table of layer names is exactly the set of Linear/Conv2d layers of every variant."""
    known = set(TOP_LAYERS)
    for name in VARIANTS:
        model = build_transformer(small_transformer_config(name), device="meta")
        for n in lora_layers(model):
            generic = n if not n.startswith("transformer_blocks.") else n.split(".", 2)[2]
            assert generic in BLOCK_LAYERS or generic in known, n
            assert layer_name(n) == n
            assert layer_name("lora_unet_" + n.replace(".", "_")) == n  # kohya spelling, unambiguous
            assert layer_name("transformer." + n) == n
