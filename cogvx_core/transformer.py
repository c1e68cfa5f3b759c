"""The CogVideoX expert transformer: one implementation for every released variant, configured by its config dict.

Variant differences are configuration only:
  - patch embedding: per-frame Conv2d (1.0) or a Linear over (c, pt, ph, pw) patches (1.5, `patch_size_t`),
  - positions: fixed 3D sin-cos added to tokens (2b), 3D RoPE in attention (5b, 1.5; crop-region linspace grid
    for 1.0, integer grid for 1.5), a learned table added to all tokens (5b-I2V),
  - the ofs embedding added to the time embedding (1.5-I2V).
The model builds its own position tables from the latent size, so callers pass only latents, timesteps and text.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import torch
from torch import nn

from .errors import CogVXError
from .modules.attention import get_attention_backend
from .modules.embeddings import TimestepEmbedding, rope_3d_angles, rope_rotation, sincos_3d_table
from .modules.expert_block import ExpertBlock
from .modules import ops as core_ops
from .variants import TRANSFORMER_DEFAULTS, Variant, detect_variant

log = logging.getLogger(__name__)


class PatchEmbed(nn.Module):
    """Text projection, video patchification and (2b, 5b-I2V) the additive position table."""

    def __init__(self, cfg: dict, dim: int, device=None, dtype=None, operations=None):
        super().__init__()
        ops = core_ops.resolve(operations)
        p, pt, c = cfg["patch_size"], cfg["patch_size_t"], cfg["in_channels"]
        self.patch_size, self.patch_size_t = p, pt  # pt None: 1.0's per-frame Conv2d
        if pt is None:
            self.proj = ops.Conv2d(c, dim, kernel_size=p, stride=p, bias=cfg["patch_bias"], device=device, dtype=dtype)
        else:  # 1.5 always has the bias, whatever patch_bias says
            self.proj = ops.Linear(c * p * p * pt, dim, device=device, dtype=dtype)
        self.text_proj = ops.Linear(cfg["text_embed_dim"], dim, device=device, dtype=dtype)
        if cfg["use_learned_positional_embeddings"]:
            tokens = (cfg["sample_height"] // p) * (cfg["sample_width"] // p) * self.sample_latent_frames(cfg)
            self.register_buffer("pos_embedding", torch.zeros(1, cfg["max_text_seq_length"] + tokens, dim,
                                                              device=device, dtype=dtype))

    @staticmethod
    def sample_latent_frames(cfg: dict) -> int:
        return (cfg["sample_frames"] - 1) // cfg["temporal_compression_ratio"] + 1

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, T, H, W) -> tokens (B, N, D) in (t, h, w) order
        b, c, t, h, w = x.shape
        p, pt = self.patch_size, self.patch_size_t
        if pt is None:
            y = self.proj(x.transpose(1, 2).reshape(b * t, c, h, w))  # (B*T, D, H/p, W/p)
            return y.flatten(2).transpose(1, 2).reshape(b, -1, y.shape[1])
        # features ordered (c, pt, ph, pw) as the reference's Linear expects
        x = x.reshape(b, c, t // pt, pt, h // p, p, w // p, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return self.proj(x.reshape(b, (t // pt) * (h // p) * (w // p), c * pt * p * p))


class CogVideoXTransformer(nn.Module):
    """x (B, C_in, T, H, W), timestep (B,), context (B, L, text_dim) [, ofs (B,) or (1,)] -> (B, C_out, T, H, W)."""

    def __init__(self, config: dict, device=None, dtype=None, operations=None):
        super().__init__()
        ops = core_ops.resolve(operations)
        unknown = set(config) - set(TRANSFORMER_DEFAULTS) - {"_class_name", "_diffusers_version", "_name_or_path"}
        if unknown:
            log.debug("ignoring transformer config fields %s", sorted(unknown))
        cfg = {**TRANSFORMER_DEFAULTS, **{k: v for k, v in config.items() if k in TRANSFORMER_DEFAULTS}}
        self._check_config(cfg)
        self.config = cfg
        self.variant: Variant = detect_variant(cfg)
        self.name = self.variant.title  # for messages; the loader sets the model's own (its folder or file name)
        heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
        dim, time_dim = heads * head_dim, cfg["time_embed_dim"]
        self.inner_dim = dim
        self.patch_size, self.patch_size_t = cfg["patch_size"], cfg["patch_size_t"] or 1
        self.out_channels = cfg["out_channels"]

        kw = dict(device=device, dtype=dtype)
        self.patch_embed = PatchEmbed(cfg, dim, operations=ops, **kw)
        self.time_embedding = TimestepEmbedding(dim, time_dim, operations=ops, **kw)
        self.ofs_embedding = (TimestepEmbedding(cfg["ofs_embed_dim"], cfg["ofs_embed_dim"], operations=ops, **kw)
                              if cfg["ofs_embed_dim"] else None)
        self.transformer_blocks = nn.ModuleList([
            ExpertBlock(dim, heads, head_dim, time_dim, eps=cfg["norm_eps"], affine=cfg["norm_elementwise_affine"],
                        attention_bias=cfg["attention_bias"], operations=ops, **kw)
            for _ in range(cfg["num_layers"])])
        affine = cfg["norm_elementwise_affine"]
        self.norm_final = ops.LayerNorm(dim, eps=cfg["norm_eps"], elementwise_affine=affine, **kw)
        self.norm_out = nn.Module()  # AdaLayerNorm: shift, scale from the time embedding (shift first)
        self.norm_out.silu = nn.SiLU()
        self.norm_out.linear = ops.Linear(time_dim, 2 * dim, **kw)
        self.norm_out.norm = ops.LayerNorm(dim, eps=cfg["norm_eps"], elementwise_affine=affine, **kw)
        self.proj_out = ops.Linear(dim, self.patch_size**2 * self.patch_size_t * self.out_channels, **kw)
        self.gradient_checkpointing = False
        self.attention_backend = "sdpa"
        self.step_cache = None  # a cache.CacheRun while a cached sampling run is going on
        self.sequence_parallel = None  # parallel.sequence.SequenceShard while run sequence-parallel

    @staticmethod
    def _check_config(cfg: dict) -> None:
        if cfg["activation_fn"] != "gelu-approximate" or cfg["timestep_activation_fn"] != "silu":
            raise CogVXError("Only the released CogVideoX activations (gelu-approximate, silu) are supported; "
                             f"this config has {cfg['activation_fn']!r} / {cfg['timestep_activation_fn']!r}.")
        if not cfg["flip_sin_to_cos"] or cfg["freq_shift"] != 0:
            raise CogVXError("Only flip_sin_to_cos=True, freq_shift=0 time embeddings (every released model) are "
                             "supported.")
        if cfg["attention_head_dim"] % 8 or cfg["patch_size"] != 2:
            raise CogVXError("attention_head_dim must be a multiple of 8 and patch_size 2 (as every released model).")

    # -- configuration -------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.norm_final.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm_final.weight.device

    @property
    def text_length(self) -> int:
        return self.config["max_text_seq_length"]

    def sequence_length(self, frames: int, height: int, width: int) -> int:
        """Tokens of one sequence (text, then video) for latents of (frames, height, width) (padded frames included)."""
        p, pt = self.patch_size, self.patch_size_t
        return self.text_length + (frames // pt) * (height // p) * (width // p)

    def activation_bytes(self, latent_shape: tuple[int, ...], guidance: bool = True) -> int:
        """Peak activation bytes of one inference forward on latents (B, C, T, h, w) (forward_activation_bytes)."""
        return forward_activation_bytes(self.config, latent_shape, self.dtype, guidance)

    @property
    def released_size(self) -> bool:
        """Whether the model has its release's depth and width (so the release's sizes and limits apply)."""
        ref = self.variant.transformer_config()
        return all(self.config[k] == ref[k] for k in ("num_layers", "num_attention_heads", "attention_head_dim"))

    @property
    def learned_size(self) -> tuple[int, int] | None:
        """(height, width) in pixels that a learned position table fixes, or None when any size works."""
        cfg = self.config
        if not cfg["use_learned_positional_embeddings"]:
            return None
        return cfg["sample_height"] * 8, cfg["sample_width"] * 8

    def default_size(self) -> tuple[int, int, int]:
        """(frames, height, width) to generate and train at by default: the release's for a model of a released
        size, else the sample size in its config (what a small model, such as cogvx-tiny, was trained at)."""
        if self.released_size:
            return self.variant.frames, self.variant.height, self.variant.width
        cfg = self.config
        return cfg["sample_frames"], cfg["sample_height"] * 8, cfg["sample_width"] * 8

    def set_attention_backend(self, name: str) -> None:
        fn = get_attention_backend(name)
        for block in self.transformer_blocks:
            block.attn1.attention_fn = fn
        self.attention_backend = name

    # -- positions ----------------------------------------------------------------------------------------------
    def positions(self, t: int, h: int, w: int, device: torch.device):
        """(additive table or None, RoPE rotations or None) for a post-patch token grid (t, h, w)."""
        cfg = self.config
        table = None
        rope = self.rotary(t, h, w, device)
        if cfg["use_learned_positional_embeddings"]:
            p = self.patch_size
            if (h * p, w * p) != (cfg["sample_height"], cfg["sample_width"]):
                raise CogVXError(
                    f"This model ({self.name}) has learned positions for {cfg['sample_width'] * 8}x"
                    f"{cfg['sample_height'] * 8} only, got {w * p * 8}x{h * p * 8}. Generate at "
                    f"{cfg['sample_width'] * 8}x{cfg['sample_height'] * 8}.")
            if t == PatchEmbed.sample_latent_frames(cfg):
                table = self.patch_embed.pos_embedding[0]
            else:  # the reference silently falls back to the sin-cos table for other lengths
                log.warning("%s was trained at %d frames; other lengths use a sin-cos table instead of its learned "
                            "positions (as the reference does) and look worse.", self.name, cfg["sample_frames"])
                table = self.sincos_table(t, h, w, device)
        elif not cfg["use_rotary_positional_embeddings"]:
            table = self.sincos_table(t, h, w, device)
        return table, rope

    def rotary(self, t: int, h: int, w: int, device: torch.device) -> torch.Tensor | None:
        """The RoPE rotations for a post-patch token grid (t, h, w), or None for a model without RoPE."""
        cfg = self.config
        if not cfg["use_rotary_positional_embeddings"]:
            return None
        base = None
        if cfg["patch_size_t"] is None:  # 1.0: positions squeezed into the sample-size grid
            base = (cfg["sample_height"] // self.patch_size, cfg["sample_width"] // self.patch_size)
        return _rope_cache(cfg["attention_head_dim"], t, h, w, base, str(device))

    def sincos_table(self, t: int, h: int, w: int, device) -> torch.Tensor:
        """The additive sin-cos position table (text + t*h*w tokens, D) of a post-patch grid; text rows are 0."""
        cfg = self.config
        video = _sincos_cache(self.inner_dim, t, h, w, cfg["spatial_interpolation_scale"],
                              cfg["temporal_interpolation_scale"], str(device))
        return torch.cat([video.new_zeros(cfg["max_text_seq_length"], video.shape[1]), video])  # text rows are 0

    # -- forward ------------------------------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor, context: torch.Tensor) -> None:
        cfg = self.config
        if x.ndim != 5:
            raise CogVXError(f"Latents must be 5-D (B, C, T, H, W); got shape {tuple(x.shape)}.")
        b, c, t, h, w = x.shape
        if c != cfg["in_channels"]:
            hint = (" This is an image-to-video model: concatenate the image latents on channels."
                    if c * 2 == cfg["in_channels"] else "")
            raise CogVXError(f"{self.name} takes {cfg['in_channels']} latent channels, got {c}.{hint}")
        if h % self.patch_size or w % self.patch_size:
            raise CogVXError(f"Latent height and width must be even (pixel sizes multiples of 16); got {h}x{w} "
                             f"latents ({w * 8}x{h * 8} pixels). Use the nearest multiple of 16.")
        if t % self.patch_size_t:
            raise CogVXError(f"{self.name} patches {self.patch_size_t} latent frames together, so the latent "
                             f"frame count must be even; got {t}. Pad one latent frame at the front (the sampler "
                             "does this) and drop it after sampling.")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg["text_embed_dim"]:
            raise CogVXError(f"Text context must be (B={b}, L, {cfg['text_embed_dim']}); got {tuple(context.shape)}.")
        if cfg["use_learned_positional_embeddings"] and context.shape[1] != cfg["max_text_seq_length"]:
            raise CogVXError(f"{self.name} needs exactly {cfg['max_text_seq_length']} text tokens (its learned "
                             f"positions cover them); got {context.shape[1]}.")

    def run_blocks(self, tokens: torch.Tensor, temb: torch.Tensor, text_len: int, rope: torch.Tensor | None,
                   start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Blocks start..stop-1 on tokens (B, S, D); in place when no gradient is needed."""
        for block in self.transformer_blocks[start:stop]:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = torch.utils.checkpoint.checkpoint(block, tokens, temb, text_len, rope, use_reentrant=False)
            else:
                tokens = block(tokens, temb, text_len, rope)
        return tokens

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                ofs: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x, context)
        b, _, t, h, w = x.shape
        dtype = self.dtype if self.dtype in (torch.float32, torch.float16, torch.bfloat16) else x.dtype
        x, context = x.to(dtype), context.to(dtype)
        timestep = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(b)

        temb = self.time_embedding(timestep, dtype)  # (B, time_dim)
        if self.ofs_embedding is not None:
            ofs = torch.full((1,), 2.0, device=x.device) if ofs is None else torch.as_tensor(ofs, device=x.device)
            temb = temb + self.ofs_embedding(ofs.reshape(-1), dtype)

        text_len = context.shape[1]
        p, pt = self.patch_size, self.patch_size_t
        grid = (t // pt, h // p, w // p)
        tokens = torch.cat([self.patch_embed.text_proj(context), self.patch_embed.patchify(x)], dim=1)  # (B, S, D)
        table, rope = self.positions(*grid, x.device)
        if table is not None:
            tokens = tokens + table.to(dtype)[-tokens.shape[1]:]  # 2b/5b-I2V: (text +) video rows
        shard = self.sequence_parallel
        if shard is not None:  # this rank's video tokens (and RoPE rows) only
            tokens, rope = shard.shard(tokens, text_len, rope)

        if self.step_cache is not None:  # cache.CacheRun: may reuse the blocks' cached residual instead
            tokens = self.step_cache.blocks(self, tokens, temb, text_len, rope)
        else:
            tokens = self.run_blocks(tokens, temb, text_len, rope)

        video = self.norm_final(tokens[:, text_len:])  # (B, N, D)
        shift, scale = self.norm_out.linear(self.norm_out.silu(temb))[:, None].chunk(2, dim=-1)
        video = self.norm_out.norm(video) * (1 + scale) + shift
        out = self.proj_out(video)  # (B, N, C_out * pt * p * p), features (c, pt, ph, pw)
        if shard is not None:
            out = shard.gather(out)  # every rank's tokens
        gt, gh, gw = grid
        out = out.reshape(b, gt, gh, gw, self.out_channels, pt, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return out.reshape(b, self.out_channels, t, h, w)


# Position tables depend only on the grid: cached. Made outside inference mode (ComfyUI samples under it), so a
# cached table stays usable by a later training step's backward pass.
@lru_cache(maxsize=8)
def _rope_cache(head_dim: int, t: int, h: int, w: int, base, device: str) -> torch.Tensor:
    with torch.inference_mode(False), torch.no_grad():
        return rope_rotation(rope_3d_angles(head_dim, t, h, w, base_size=base, device=torch.device(device)))


@lru_cache(maxsize=8)
def _sincos_cache(dim: int, t: int, h: int, w: int, s_scale: float, t_scale: float, device: str) -> torch.Tensor:
    with torch.inference_mode(False), torch.no_grad():
        return sincos_3d_table(dim, t, h, w, s_scale, t_scale, device=torch.device(device))


FF_UNITS = 10  # (B, S, D) tensors alive inside a block's feed-forward: x, the modulated norm, 4 + 4 (proj, GELU)


def forward_activation_bytes(config: dict, latent_shape: tuple[int, ...], dtype: torch.dtype, guidance: bool = True,
                             text_length: int | None = None) -> int:
    """Peak activation bytes of one inference forward on latents (B, C, T, h, w); CFG doubles the batch.

    The peak is inside a block's feed-forward: the tokens x, the modulated norm, the 4x-wide projection and its GELU
    output, 10 (B, S, D) tensors (S = text + video tokens); plus the cached position tables (RoPE rotations, or 2b's
    fp64 sin-cos table and its text-padded copy). Attention is assumed to run a memory-efficient kernel (flash /
    efficient SDPA, no S x S matrix), as torch picks on CUDA. Matches measured CPU peaks within 2% (tests)."""
    cfg = {**TRANSFORMER_DEFAULTS, **config}
    b, _, t, h, w = latent_shape
    p, pt = cfg["patch_size"], cfg["patch_size_t"] or 1
    video = (t // pt) * (h // p) * (w // p)
    tokens = (cfg["max_text_seq_length"] if text_length is None else text_length) + video
    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    total = FF_UNITS * b * (2 if guidance else 1) * tokens * dim * dtype.itemsize
    if cfg["use_rotary_positional_embeddings"]:
        total += video * cfg["attention_head_dim"] // 2 * 8  # cached complex64 rotations
    elif not cfg["use_learned_positional_embeddings"]:
        total += (video + tokens) * dim * 8  # the 2b fp64 sin-cos table: cached, and its text-padded copy
    return total


def build_transformer(config: dict, device="meta", dtype: torch.dtype | None = None,
                      operations=None) -> CogVideoXTransformer:
    """A transformer from a diffusers `transformer/config.json` dict, on `device` (meta: no memory until loaded).
    `operations`: the layer classes (see modules/ops.py; default the core's own)."""
    with torch.device(device):
        model = CogVideoXTransformer(config, dtype=dtype, operations=operations)
    return model
