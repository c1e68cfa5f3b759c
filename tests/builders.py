"""One builder of small random models in the official layouts, reused by every test."""

from __future__ import annotations

import types

import torch

from cogvx_core.variants import VARIANTS

# Small widths, real structure: 2 heads of 64 (the real head size, so the RoPE split is the real one), 2 layers.
SMALL_TRANSFORMER = dict(num_attention_heads=2, attention_head_dim=64, num_layers=2, text_embed_dim=32,
                         time_embed_dim=48, max_text_seq_length=12)
SMALL_SAMPLE = {"1.0": dict(sample_height=16, sample_width=24, sample_frames=9),   # latent 16x24, 3 latent frames
                "1.5": dict(sample_height=30, sample_width=30, sample_frames=17)}


def small_transformer_config(variant: str, **overrides) -> dict:
    v = VARIANTS[variant]
    cfg = v.transformer_config(**SMALL_TRANSFORMER, **SMALL_SAMPLE[v.generation])
    if cfg["ofs_embed_dim"]:
        cfg["ofs_embed_dim"] = 48
    cfg.update(overrides)
    return cfg


def randomize_(module: torch.nn.Module, seed: int = 0, qk_gain: float = 3.0) -> torch.nn.Module:
    """Every parameter and persistent buffer random (zero-initialised gates too). QK-norm gains are raised so that
    attention is sharp, as in a trained model: a wrong position scheme then shows clearly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            r = torch.randn(t.shape, generator=g, dtype=torch.float32)
            if name.endswith(("norm_q.weight", "norm_k.weight")):
                r = qk_gain + 0.3 * r
            elif name.endswith("norm.weight") or name.endswith("norm_final.weight"):
                r = 1 + 0.2 * r
            else:
                fan_in = t.shape[-1] if t.ndim >= 2 else 1
                r = r / max(fan_in, 1) ** 0.5
            t.copy_(r.to(t.dtype))
    return module


def reference_transformer(config: dict, state_dict: dict, dtype=torch.float32):
    from diffusers import CogVideoXTransformer3DModel

    ref = CogVideoXTransformer3DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    missing, unexpected = ref.load_state_dict(state_dict, strict=False)
    assert not unexpected, unexpected
    assert all("pos_embedding" in k for k in missing), missing  # the 2b sin-cos table is not stored
    return ref.to(dtype).eval()


def reference_forward(ref, x, timestep, context, ofs=None):
    """The reference transformer on our layout: x (B, C, T, H, W); RoPE tables made by the reference pipeline."""
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline

    b, c, t, h, w = x.shape
    rope = None
    if ref.config.use_rotary_positional_embeddings:
        fake_pipe = types.SimpleNamespace(transformer=ref, vae_scale_factor_spatial=8)
        # the pipeline is given pixel sizes and the latent frame count
        rope = CogVideoXPipeline._prepare_rotary_positional_embeddings(fake_pipe, h * 8, w * 8, t, x.device)
    out = ref(hidden_states=x.permute(0, 2, 1, 3, 4), encoder_hidden_states=context, timestep=timestep, ofs=ofs,
              image_rotary_emb=rope, return_dict=False)[0]
    return out.permute(0, 2, 1, 3, 4)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# -- other key layouts, made the reverse way from a diffusers-named state dict ------------------------------------
_TO_COMFY_BLOCK = {"attn1.to_q": "q", "attn1.to_k": "k", "attn1.to_v": "v", "attn1.norm_q": "norm_q",
                   "attn1.norm_k": "norm_k", "attn1.to_out.0": "attn_out", "ff.net.0.proj": "ff_proj",
                   "ff.net.2": "ff_out"}


def to_comfy_keys(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if k.startswith("transformer_blocks."):
            _, i, rest = k.split(".", 2)
            for old, new in _TO_COMFY_BLOCK.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            k = f"blocks.{i}.{rest}"
        else:
            for mod in ("time_embedding", "ofs_embedding"):
                if k.startswith(mod + ".linear_"):
                    k = k.replace(mod + ".", mod + "_", 1)
        out[k] = v
    return out


def to_sat_keys(sd: dict) -> dict:
    """The original SAT layout (model.diffusion_model. prefix, fused QKV, 12-chunk adaLN per block)."""
    out, P = {}, "model.diffusion_model."
    n = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    for i in range(n):
        b = f"transformer_blocks.{i}."
        L = f"{P}transformer.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"{L}attention.query_key_value.{kind}"] = torch.cat(
                [sd[f"{b}attn1.to_{x}.{kind}"] for x in "qkv"])
            out[f"{L}attention.dense.{kind}"] = sd[f"{b}attn1.to_out.0.{kind}"]
            out[f"{L}input_layernorm.{kind}"] = sd[f"{b}norm1.norm.{kind}"]
            out[f"{L}post_attention_layernorm.{kind}"] = sd[f"{b}norm2.norm.{kind}"]
            out[f"{L}mlp.dense_h_to_4h.{kind}"] = sd[f"{b}ff.net.0.proj.{kind}"]
            out[f"{L}mlp.dense_4h_to_h.{kind}"] = sd[f"{b}ff.net.2.{kind}"]
            c1, c2 = sd[f"{b}norm1.linear.{kind}"].chunk(6), sd[f"{b}norm2.linear.{kind}"].chunk(6)
            out[f"{P}mixins.adaln_layer.adaLN_modulations.{i}.1.{kind}"] = torch.cat(
                c1[0:3] + c2[0:3] + c1[3:6] + c2[3:6])
            out[f"{P}mixins.adaln_layer.query_layernorm_list.{i}.{kind}"] = sd[f"{b}attn1.norm_q.{kind}"]
            out[f"{P}mixins.adaln_layer.key_layernorm_list.{i}.{kind}"] = sd[f"{b}attn1.norm_k.{kind}"]
    top = {"norm_final": "transformer.final_layernorm", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "ofs_embedding.linear_1": "ofs_embed.0",
           "ofs_embedding.linear_2": "ofs_embed.2", "patch_embed.proj": "mixins.patch_embed.proj",
           "patch_embed.text_proj": "mixins.patch_embed.text_proj", "norm_out.norm": "mixins.final_layer.norm_final",
           "norm_out.linear": "mixins.final_layer.adaLN_modulation.1", "proj_out": "mixins.final_layer.linear"}
    for k, v in sd.items():
        if k.startswith("transformer_blocks."):
            continue
        if k == "patch_embed.pos_embedding":
            out[P + "mixins.pos_embed.pos_embedding"] = v
            continue
        mod, _, kind = k.rpartition(".")
        out[f"{P}{top[mod]}.{kind}"] = v
    out[P + "mixins.pos_embed.freqs_sin"] = torch.zeros(3)  # SAT RoPE caches, dropped on load
    return out


# -- a tiny T5 with a sentencepiece tokenizer trained here --------------------------------------------------------
_WORDS = {"size": ["small", "big", "tiny", "old", "young", "huge"],
          "colour": ["red", "blue", "gold", "grey", "pink", "dark"],
          "animal": ["cat", "dog", "fox", "owl", "bird", "horse"],
          "place": ["beach", "road", "grass", "hill", "river", "street"],
          "sky": ["stormy", "bright", "clear", "cloudy", "pale", "golden"]}


def caption_sentences() -> list[str]:
    out = []
    for i in range(36):  # every word of every list appears (the index steps are coprime to 6)
        w = {k: v[(i * step + i // 6) % 6] for step, (k, v) in zip((1, 5, 1, 5, 0), _WORDS.items())}
        out.append(f"a {w['size']} {w['colour']} {w['animal']} runs along the {w['place']} under a {w['sky']} sky, "
                   f"light and shadow, scene {i}")
    return out


def train_spiece(sentences=None, vocab_size: int = 64) -> bytes:
    """A tiny unigram sentencepiece model with T5's special ids: pad 0, eos 1, unk 2, no bos."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences or caption_sentences()), model_writer=buf, vocab_size=vocab_size,
        hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>",
        eos_piece="</s>", unk_piece="<unk>", minloglevel=2, num_threads=1)
    return buf.getvalue()


def write_tiny_t5(root, d_model: int = 32, seed: int = 0):
    """root/tokenizer/spiece.model and root/text_encoder/ (a random T5 v1.1 encoder) as diffusers folders hold them."""
    from pathlib import Path

    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    root = Path(root)
    (root / "tokenizer").mkdir(parents=True, exist_ok=True)
    (root / "tokenizer" / "spiece.model").write_bytes(train_spiece())
    tokenizer = T5Tokenizer.from_pretrained(str(root / "tokenizer"))
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer) + 6, d_model=d_model, d_ff=48, d_kv=8, num_heads=4, num_layers=2,
                      feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, dropout_rate=0.0)
    T5EncoderModel(config).eval().save_pretrained(str(root / "text_encoder"))
    return root


# -- whole diffusers-format model folders -----------------------------------------------------------------------
PIPELINE_VAE = dict(block_out_channels=[8, 16, 16, 32], latent_channels=16, layers_per_block=1, norm_num_groups=4,
                    sample_height=128, sample_width=192)


def write_pipeline_folder(root, variant: str, seed: int = 0):
    """A complete diffusers-format CogVideoX folder with small random components of `variant`'s architecture."""
    import json
    from pathlib import Path

    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler

    from cogvx_core.transformer import build_transformer

    root = Path(root)
    v = VARIANTS[variant]
    cfg = small_transformer_config(variant)
    model = randomize_(build_transformer(cfg, device="cpu"), seed=seed, qk_gain=1.0)
    reference_transformer(cfg, model.state_dict()).save_pretrained(root / "transformer")
    vae_cfg = dict(PIPELINE_VAE, scaling_factor=v.scaling_factor, invert_scale_latents=v.invert_scale_latents)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLCogVideoX(**vae_cfg)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("bias") or p.ndim == 1:
                p.copy_(0.05 * torch.randn_like(p) + (1.0 if name.endswith("weight") else 0.0))
    vae.save_pretrained(root / "vae")
    write_tiny_t5(root, d_model=cfg["text_embed_dim"], seed=seed + 2)
    CogVideoXDDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction", timestep_spacing="trailing",
                           rescale_betas_zero_snr=True, set_alpha_to_one=True, clip_sample=False,
                           snr_shift_scale=v.snr_shift_scale).save_pretrained(root / "scheduler")
    cls = "CogVideoXImageToVideoPipeline" if v.i2v else "CogVideoXPipeline"
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": cls, "_diffusers_version": "0.32.0", "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "CogVideoXTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLCogVideoX"]}))
    return root


def reference_pipeline(root, kind: str = "t2v", sampler: str = "ddim"):
    """diffusers' pipeline of `kind` ("t2v", "i2v", "v2v") loaded from a folder made by write_pipeline_folder."""
    import diffusers

    cls = {"t2v": diffusers.CogVideoXPipeline, "i2v": diffusers.CogVideoXImageToVideoPipeline,
           "v2v": diffusers.CogVideoXVideoToVideoPipeline}[kind]
    pipe = cls.from_pretrained(str(root))
    if sampler == "dpm":
        pipe.scheduler = diffusers.CogVideoXDPMScheduler.from_config(pipe.scheduler.config)
    return pipe


def psnr(a, b) -> float:
    """PSNR in dB of two uint8-range arrays or tensors."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
