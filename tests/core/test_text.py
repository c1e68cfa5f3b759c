"""T5 text encoding against diffusers' CogVideoXPipeline, on a tiny random T5 v1.1 and a tokenizer trained here.

The reference is `CogVideoXPipeline._get_t5_prompt_embeds` / `encode_prompt` driven with transformers'
`T5EncoderModel.from_pretrained` and `T5Tokenizer.from_pretrained` on the same folder, run under no_grad as the
pipeline's __call__ runs it (with grad, CPU SDPA takes another kernel and differs in the last bit).
"""

import importlib.util
import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import save_file

from builders import train_spiece
from cogvx_core.checkpoints.t5 import find_t5_layout, load_t5_encoder, load_t5_tokenizer, t5_config_from_shapes
from cogvx_core.errors import CheckpointError, CogVXError
from cogvx_core.text import TextEncoder, fit_context, load_text_encoder

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers", reason="diffusers is the test oracle (pip install -e .[test])")
spm = pytest.importorskip("sentencepiece")
from transformers import T5Config, T5EncoderModel, T5Tokenizer  # noqa: E402

if int(transformers.__version__.split(".")[0]) >= 5 and importlib.util.find_spec("google.protobuf") is None:
    pytest.skip("transformers>=5 reads a spiece.model-only tokenizer only with protobuf installed "
                "(pip install protobuf); every test here starts from one", allow_module_level=True)

MAX_LEN = 48  # short text length keeps the tests fast; the behaviour does not depend on 226
PROMPTS = ["a small red fox runs along the river under a stormy sky",
           "",
           "an old owl sits on the hill, bright gold light"]
LONG_PROMPT = " ".join(["a tiny blue bird flies over the grass"] * 8)

def _train_spiece() -> bytes:
    return train_spiece()


def _no_embed_alias(sd: dict) -> dict:
    """The state dict as files store it: the tied stack embedding only once, as shared.weight."""
    return {k: v.detach().clone().contiguous() for k, v in sd.items() if k != "encoder.embed_tokens.weight"}


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    """A diffusers-style folder: text_encoder/ (config.json + model.safetensors) and tokenizer/ (spiece.model only)."""
    root = tmp_path_factory.mktemp("cogvx_t5")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "spiece.model").write_bytes(_train_spiece())
    tokenizer = T5Tokenizer.from_pretrained(str(root / "tokenizer"))
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer) + 6, d_model=64, d_ff=96, d_kv=16, num_heads=4, num_layers=2,
                      feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, dropout_rate=0.0)
    model = T5EncoderModel(config).eval()
    model.save_pretrained(str(root / "text_encoder"))
    sd = _no_embed_alias(model.state_dict())
    return {"root": root, "tok_dir": root / "tokenizer", "te_dir": root / "text_encoder", "config": config,
            "state_dict": sd}


def _reference(t5, dtype=None):
    enc = T5EncoderModel.from_pretrained(str(t5["te_dir"]), **({"torch_dtype": dtype} if dtype else {}))
    tok = T5Tokenizer.from_pretrained(str(t5["tok_dir"]))
    return diffusers.CogVideoXPipeline(tokenizer=tok, text_encoder=enc, vae=None, transformer=None, scheduler=None)


def _ref_embeds(pipe, prompts, max_len=MAX_LEN, dtype=None):
    with torch.no_grad():
        return pipe._get_t5_prompt_embeds(prompts, max_sequence_length=max_len, device=torch.device("cpu"),
                                          dtype=dtype)


@pytest.fixture(scope="module")
def ref32(t5):
    return _reference(t5)


def _ref_from_state_dict(t5, sd):
    """The reference pipeline on a transformers model loaded from `sd` (float32), e.g. dequantised fp8 weights."""
    model = T5EncoderModel(t5["config"]).eval()
    model.load_state_dict(sd, strict=False)
    model.tie_weights()
    tok = T5Tokenizer.from_pretrained(str(t5["tok_dir"]))
    return diffusers.CogVideoXPipeline(tokenizer=tok, text_encoder=model, vae=None, transformer=None, scheduler=None)


# --- tokenizer ------------------------------------------------------------------------------------------------------


def test_spiece_only_folder_is_a_t5_tokenizer(t5):
    assert sorted(p.name for p in t5["tok_dir"].iterdir()) == ["spiece.model"]
    tok = load_t5_tokenizer(t5["tok_dir"])
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok("").input_ids == [1]
    ids = tok(PROMPTS[0]).input_ids
    assert ids[-1] == 1 and 2 not in ids and len(ids) > 5


def test_tokenizer_json_folder_like_comfyui(t5, ref32, tmp_path):
    """ComfyUI passes its bundled t5_tokenizer: a T5TokenizerFast folder with tokenizer.json and no spiece.model."""
    folder = tmp_path / "t5_tokenizer"
    load_t5_tokenizer(t5["tok_dir"]).save_pretrained(str(folder))
    (folder / "spiece.model").unlink(missing_ok=True)
    assert (folder / "tokenizer.json").is_file()
    enc = load_text_encoder(t5["te_dir"], tokenizer=folder, max_length=MAX_LEN)
    assert torch.equal(enc.tokenize(PROMPTS)[0], ref32.tokenizer(PROMPTS, padding="max_length", max_length=MAX_LEN,
                                                                 truncation=True, return_tensors="pt").input_ids)
    assert torch.equal(enc.encode(PROMPTS), _ref_embeds(ref32, PROMPTS))


def test_missing_tokenizer_names_where_it_looked(t5, tmp_path):
    f = tmp_path / "t5xxl_fp16.safetensors"
    save_file(t5["state_dict"], str(f))
    with pytest.raises(CogVXError, match="No T5 tokenizer") as e:
        load_text_encoder(f)
    assert str(tmp_path) in str(e.value) and "tokenizer.json or spiece.model" in str(e.value)
    with pytest.raises(CogVXError, match="not a T5 tokenizer folder"):
        load_t5_tokenizer(tmp_path)


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5,
                    reason="transformers 4 reads spiece.model with sentencepiece alone")
def test_spiece_without_protobuf_names_the_fix(t5, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "google.protobuf" else real(name, *a))
    with pytest.raises(CogVXError, match=r"pip install protobuf"):
        load_t5_tokenizer(t5["tok_dir"])


def test_tokenizer_larger_than_the_vocab_is_refused(t5):
    small = T5EncoderModel(T5Config(vocab_size=32, d_model=8, d_ff=8, d_kv=4, num_heads=2, num_layers=1))
    with pytest.raises(CogVXError, match="do not belong together"):
        TextEncoder(small, load_t5_tokenizer(t5["tok_dir"]))


# --- parity with diffusers ------------------------------------------------------------------------------------------


def test_folder_matches_diffusers_exactly_fp32(t5, ref32):
    enc = load_text_encoder(t5["root"], max_length=MAX_LEN)
    out = enc.encode(PROMPTS)
    ref = _ref_embeds(ref32, PROMPTS)
    assert out.shape == (3, MAX_LEN, 64) and out.dtype == torch.float32
    assert torch.equal(out, ref)
    assert enc.last_truncation == []


def test_subfolders_given_directly_and_sharded(t5, ref32, tmp_path):
    enc = load_text_encoder(t5["te_dir"], tokenizer=t5["tok_dir"], max_length=MAX_LEN)
    assert torch.equal(enc.encode(PROMPTS), _ref_embeds(ref32, PROMPTS))
    sharded = tmp_path / "text_encoder"
    T5EncoderModel.from_pretrained(str(t5["te_dir"])).save_pretrained(str(sharded), max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    enc = load_text_encoder(sharded, tokenizer=t5["tok_dir"], max_length=MAX_LEN)
    assert torch.equal(enc.encode(PROMPTS), _ref_embeds(ref32, PROMPTS))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_matches_diffusers(t5, dtype):
    """transformers keeps T5's `wo` in float32 when loading float16 (not bfloat16); so must we, for the same numbers."""
    ref = _reference(t5, dtype)
    enc = load_text_encoder(t5["root"], dtype=dtype, max_length=MAX_LEN)
    ours = {n: p.dtype for n, p in enc.model.named_parameters()}
    assert ours == {n: p.dtype for n, p in ref.text_encoder.named_parameters()}
    wo = torch.float32 if dtype == torch.float16 else dtype
    assert ours["encoder.block.1.layer.1.DenseReluDense.wo.weight"] == wo
    assert ours["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"] == dtype
    out = enc.encode(PROMPTS)
    assert out.dtype == dtype
    assert torch.equal(out, _ref_embeds(ref, PROMPTS))
    # A requested output dtype: T5 runs in its own dtype, then the result is cast (the reference's `.to(dtype)`).
    assert torch.equal(enc.encode(PROMPTS, dtype=torch.float32), _ref_embeds(ref, PROMPTS, dtype=torch.float32))


def test_empty_negative_prompt_is_encoded_not_zero(t5, ref32):
    enc = load_text_encoder(t5["root"], max_length=MAX_LEN)
    ids, _ = enc.tokenize("")
    assert ids.tolist() == [[1] + [0] * (MAX_LEN - 1)]  # EOS, then pads
    with torch.no_grad():
        pos, neg = ref32.encode_prompt(PROMPTS[0], negative_prompt=None, do_classifier_free_guidance=True,
                                       max_sequence_length=MAX_LEN, device=torch.device("cpu"))
    assert torch.equal(enc.encode(""), neg)
    assert torch.equal(enc.encode(PROMPTS[0]), pos)
    assert neg.abs().sum() > 0


def test_batch_rows_equal_single_prompts(t5):
    """No attention mask and fixed-length padding: a prompt encodes the same alone or in any batch."""
    enc = load_text_encoder(t5["root"], max_length=MAX_LEN)
    batch = enc.encode(PROMPTS)
    for i, p in enumerate(PROMPTS):
        assert torch.equal(batch[i: i + 1], enc.encode([p]))


def test_long_prompt_is_truncated_with_a_warning(t5, ref32, caplog):
    enc = load_text_encoder(t5["root"], max_length=MAX_LEN)
    full = len(enc.tokenizer(LONG_PROMPT).input_ids)
    assert full > MAX_LEN + 5
    with caplog.at_level(logging.WARNING, logger="cogvx_core.text"):
        out, info = enc.encode_with_info([PROMPTS[0], LONG_PROMPT])
    assert [i.dropped for i in info] == [0, full - MAX_LEN]
    assert info[1].tokens == full and info[1].dropped_text
    assert enc.last_truncation == [info[1]]
    assert [r for r in caplog.records if r.name == "cogvx_core.text"] == []  # the caller shows info's notes
    assert info[0].notes == () and len(info[1].notes) == 1
    assert f"the last {full - MAX_LEN} were dropped" in info[1].notes[0]
    with caplog.at_level(logging.WARNING, logger="cogvx_core.text"):
        enc.encode([LONG_PROMPT])  # no caller to show them: logged, once
    warned = [r.getMessage() for r in caplog.records if r.name == "cogvx_core.text"]
    assert warned == [f"Prompt note: {info[1].notes[0]}."]
    assert torch.equal(out, _ref_embeds(ref32, [PROMPTS[0], LONG_PROMPT]))
    ids, _ = enc.tokenize(LONG_PROMPT)
    assert ids.shape == (1, MAX_LEN) and ids[0, -1].item() == 1  # cut, then EOS


# --- single files ---------------------------------------------------------------------------------------------------


def _stack_only(sd):
    """Keys without the `encoder.` level: block.N..., final_layer_norm.weight, embed_tokens.weight."""
    out = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    out["embed_tokens.weight"] = sd["shared.weight"]
    return out


def _embed_tokens_only(sd):
    out = {k: v for k, v in sd.items() if k != "shared.weight"}
    out["encoder.embed_tokens.weight"] = sd["shared.weight"]
    return out


def _prefixed(prefix, extra=True):
    def layout(sd):
        out = {prefix + k: v for k, v in sd.items()}
        if extra:  # other things sharing the file: a CLIP, a diffusion model
            out["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.ones(8)
            out["model.diffusion_model.patch_embed.proj.weight"] = torch.ones(4, 4)
        return out
    return layout


LAYOUTS = {
    "plain": lambda sd: dict(sd),
    "text_encoders.t5xxl.transformer.": _prefixed("text_encoders.t5xxl.transformer."),
    "t5xxl.transformer.": _prefixed("t5xxl.transformer."),
    "text_encoder.": _prefixed("text_encoder.", extra=False),
    "stack_only": _stack_only,
    "embed_tokens_only": _embed_tokens_only,
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_single_file_layouts_match_the_folder(t5, ref32, tmp_path, layout):
    f = tmp_path / "t5xxl.safetensors"
    save_file(LAYOUTS[layout](t5["state_dict"]), str(f))
    enc = load_text_encoder(f, tokenizer=t5["tok_dir"], max_length=MAX_LEN)
    assert enc.dtype == torch.float32
    assert enc.model.encoder.embed_tokens.weight is enc.model.shared.weight
    assert torch.equal(enc.encode(PROMPTS), _ref_embeds(ref32, PROMPTS))


def test_fp16_file(t5, tmp_path):
    """t5xxl_fp16.safetensors: against transformers loading the same fp16 weights in float16 (`wo` upcast)."""
    half = {k: v.half() for k, v in t5["state_dict"].items()}
    ref_dir = tmp_path / "text_encoder"
    ref_dir.mkdir()
    shutil.copy(t5["te_dir"] / "config.json", ref_dir / "config.json")
    save_file(half, str(ref_dir / "model.safetensors"))
    ref16 = _reference({"te_dir": ref_dir, "tok_dir": t5["tok_dir"]}, torch.float16)
    f = tmp_path / "t5xxl_fp16.safetensors"
    save_file(half, str(f))
    enc = load_text_encoder(f, tokenizer=t5["tok_dir"], max_length=MAX_LEN)  # dtype from the file
    assert enc.dtype == torch.float16
    assert enc.model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert torch.equal(enc.encode(PROMPTS), _ref_embeds(ref16, PROMPTS))


def _is_linear(name):
    return name.endswith(".weight") and any(p in name for p in ("SelfAttention.", "DenseReluDense.")) \
        and "relative_attention_bias" not in name


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_fp8_e4m3fn_file(t5, ref32, tmp_path):
    """Plain fp8 storage: linear weights in float8_e4m3fn, the rest in fp16, as t5xxl_fp8_e4m3fn.safetensors."""
    sd = t5["state_dict"]
    stored = {k: (v.to(torch.float8_e4m3fn) if _is_linear(k) else v.half()) for k, v in sd.items()}
    f = tmp_path / "t5xxl_fp8_e4m3fn.safetensors"
    save_file(stored, str(f))
    enc = load_text_encoder(f, tokenizer=t5["tok_dir"], dtype=torch.float32, max_length=MAX_LEN)
    out = enc.encode(PROMPTS)
    # Exact against the reference on the same (rounded) weights; close to the full-precision model.
    assert torch.equal(out, _ref_embeds(_ref_from_state_dict(t5, {k: v.float() for k, v in stored.items()}), PROMPTS))
    assert _rel(out, _ref_embeds(ref32, PROMPTS)) < 0.1
    assert load_t5_encoder(f).shared.weight.dtype == torch.bfloat16  # fp8 storage computes in bf16 by default


def _scaled_fp8(sd, new_format=False, fmt="float8_e4m3fn"):
    """ComfyUI's scaled fp8: weight / scale stored in fp8, with the per-tensor scale beside it."""
    out = {}
    for k, v in sd.items():
        if not _is_linear(k):
            out[k] = v.half()
            continue
        scale = v.abs().max().float() / 448.0
        out[k] = (v / scale).to(torch.float8_e4m3fn)
        layer = k[: -len(".weight")]
        if new_format:
            out[layer + ".weight_scale"] = scale
            out[layer + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)
        else:
            out[layer + ".scale_weight"] = scale
            out[layer + ".scale_input"] = torch.tensor(1.0)
    if not new_format:
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)  # the marker key
    return out


def _dequantised(stored):
    sd = {}
    for k, v in stored.items():
        if k == "scaled_fp8" or k.endswith((".scale_weight", ".weight_scale", ".scale_input", ".comfy_quant")):
            continue
        layer = k[: -len(".weight")]
        scale = stored.get(layer + ".scale_weight", stored.get(layer + ".weight_scale"))
        sd[k] = v.float() * scale if scale is not None else v.float()
    return sd


@pytest.mark.parametrize("new_format", [False, True], ids=["scale_weight", "comfy_quant"])
def test_scaled_fp8_file_is_dequantised(t5, ref32, tmp_path, new_format):
    stored = _scaled_fp8(t5["state_dict"], new_format=new_format)
    f = tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"
    save_file({"text_encoders.t5xxl.transformer." + k: v for k, v in stored.items()}, str(f))
    enc = load_text_encoder(f, tokenizer=t5["tok_dir"], dtype=torch.float32, max_length=MAX_LEN)
    out = enc.encode(PROMPTS)
    assert torch.equal(out, _ref_embeds(_ref_from_state_dict(t5, _dequantised(stored)), PROMPTS))
    assert _rel(out, _ref_embeds(ref32, PROMPTS)) < 0.1
    # Without the scales the weights would be off by 448 / amax: the scales were applied.
    unscaled = {k: v.float() for k, v in stored.items() if k in t5["state_dict"]}
    assert _rel(out, _ref_embeds(_ref_from_state_dict(t5, unscaled), PROMPTS)) > 0.1


def test_unsupported_quantisation_is_refused(t5, tmp_path):
    f = tmp_path / "t5xxl_nvfp4.safetensors"
    save_file(_scaled_fp8(t5["state_dict"], new_format=True, fmt="nvfp4"), str(f))
    with pytest.raises(CheckpointError, match="'nvfp4', which CogVX cannot dequantise"):
        load_t5_encoder(f)


# --- bad files ------------------------------------------------------------------------------------------------------


def test_truncated_file_is_refused(t5, tmp_path):
    f = tmp_path / "t5xxl_fp16.safetensors"
    save_file(t5["state_dict"], str(f))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_text_encoder(f, tokenizer=t5["tok_dir"])


def test_missing_tensor_is_refused(t5, tmp_path):
    sd = dict(t5["state_dict"])
    del sd["encoder.block.1.layer.0.SelfAttention.k.weight"]
    f = tmp_path / "t5.safetensors"
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match="missing.*block.1.layer.0.SelfAttention.k.weight"):
        load_t5_encoder(f)


def test_a_file_without_t5_is_refused(tmp_path):
    f = tmp_path / "clip_l.safetensors"
    save_file({"text_model.final_layer_norm.weight": torch.ones(8)}, str(f))
    with pytest.raises(CheckpointError, match="no T5 encoder in this file"):
        load_t5_encoder(f)


def test_pickle_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="never loaded"):
        load_t5_encoder(tmp_path / "t5xxl.bin")


# --- config from shapes ---------------------------------------------------------------------------------------------


def test_config_from_shapes_small(t5):
    shapes = {k: tuple(v.shape) for k, v in _stack_only(t5["state_dict"]).items()}
    cfg = t5_config_from_shapes(shapes, find_t5_layout(shapes, "test"), "test")
    ref = t5["config"]
    for attr in ("vocab_size", "d_model", "d_ff", "d_kv", "num_heads", "num_layers",
                 "relative_attention_num_buckets", "feed_forward_proj", "dense_act_fn", "is_gated_act"):
        assert getattr(cfg, attr) == getattr(ref, attr), attr


def test_config_from_shapes_t5_xxl():
    """The shapes of google/t5-v1_1-xxl's encoder (as t5xxl_fp16.safetensors has them) give its config."""
    shapes = {"shared.weight": (32128, 4096), "encoder.final_layer_norm.weight": (4096,)}
    for i in range(24):
        p = f"encoder.block.{i}.layer."
        for n in "qkvo":
            shapes[f"{p}0.SelfAttention.{n}.weight"] = (4096, 4096)
        shapes[f"{p}0.layer_norm.weight"] = (4096,)
        shapes[f"{p}1.DenseReluDense.wi_0.weight"] = (10240, 4096)
        shapes[f"{p}1.DenseReluDense.wi_1.weight"] = (10240, 4096)
        shapes[f"{p}1.DenseReluDense.wo.weight"] = (4096, 10240)
        shapes[f"{p}1.layer_norm.weight"] = (4096,)
    shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (32, 64)
    cfg = t5_config_from_shapes(shapes, find_t5_layout(shapes, "xxl"), "xxl")
    assert (cfg.vocab_size, cfg.d_model, cfg.d_ff, cfg.d_kv, cfg.num_heads, cfg.num_layers) == \
        (32128, 4096, 10240, 64, 64, 24)
    assert cfg.feed_forward_proj == "gated-gelu" and cfg.dense_act_fn == "gelu_new"


# --- fit_context ----------------------------------------------------------------------------------------------------


def test_fit_context_pads_with_zeros_and_cuts_with_a_warning(caplog):
    ctx = torch.randn(2, 77, 16)
    padded = fit_context(ctx, 226)
    assert padded.shape == (2, 226, 16) and torch.equal(padded[:, :77], ctx)
    assert not padded[:, 77:].any()
    assert fit_context(ctx, 77) is ctx
    with caplog.at_level(logging.WARNING, logger="cogvx_core.text"):
        cut = fit_context(torch.randn(1, 300, 16), 226)
    assert cut.shape == (1, 226, 16)
    assert any("the last 74 were dropped" in r.getMessage() for r in caplog.records)
    with pytest.raises(CogVXError, match="batch, tokens, channels"):
        fit_context(torch.randn(77, 16), 226)
