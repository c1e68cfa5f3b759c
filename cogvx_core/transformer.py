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
from .modules.ops import Conv2d, LayerNorm, Linear
from .variants import TRANSFORMER_DEFAULTS, Variant, detect_variant

log = logging.getLogger(__name__)


class PatchEmbed(nn.Module):
    """Text projection, video patchification and (2b, 5b-I2V) the additive position table."""

    def __init__(self, cfg: dict, dim: int, device=None, dtype=None):
        super().__init__()
        p, pt, c = cfg["patch_size"], cfg["patch_size_t"], cfg["in_channels"]
        if pt is None:
            self.proj = Conv2d(c, dim, kernel_size=p, stride=p, bias=cfg["patch_bias"], device=device, dtype=dtype)
        else:  # 1.5 always has the bias, whatever patch_bias says
            self.proj = Linear(c * p * p * pt, dim, device=device, dtype=dtype)
        self.text_proj = Linear(cfg["text_embed_dim"], dim, device=device, dtype=dtype)
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
        if isinstance(self.proj, Conv2d):
            y = self.proj(x.transpose(1, 2).reshape(b * t, c, h, w))  # (B*T, D, H/p, W/p)
            return y.flatten(2).transpose(1, 2).reshape(b, -1, y.shape[1])
        pt = self.proj.in_features // (c * 4)
        p = 2
        # features ordered (c, pt, ph, pw) as the reference's Linear expects
        x = x.reshape(b, c, t // pt, pt, h // p, p, w // p, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return self.proj(x.reshape(b, (t // pt) * (h // p) * (w // p), c * pt * p * p))


class CogVideoXTransformer(nn.Module):
    """x (B, C_in, T, H, W), timestep (B,), context (B, L, text_dim) [, ofs (B,) or (1,)] -> (B, C_out, T, H, W)."""

    def __init__(self, config: dict, device=None, dtype=None):
        super().__init__()
        unknown = set(config) - set(TRANSFORMER_DEFAULTS) - {"_class_name", "_diffusers_version", "_name_or_path"}
        if unknown:
            log.debug("ignoring transformer config fields %s", sorted(unknown))
        cfg = {**TRANSFORMER_DEFAULTS, **{k: v for k, v in config.items() if k in TRANSFORMER_DEFAULTS}}
        self._check_config(cfg)
        self.config = cfg
        self.variant: Variant = detect_variant(cfg)
        heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
        dim, time_dim = heads * head_dim, cfg["time_embed_dim"]
        self.inner_dim = dim
        self.patch_size, self.patch_size_t = cfg["patch_size"], cfg["patch_size_t"] or 1
        self.out_channels = cfg["out_channels"]

        self.patch_embed = PatchEmbed(cfg, dim, device=device, dtype=dtype)
        self.time_embedding = TimestepEmbedding(dim, time_dim, device=device, dtype=dtype)
        self.ofs_embedding = (TimestepEmbedding(cfg["ofs_embed_dim"], cfg["ofs_embed_dim"], device=device, dtype=dtype)
                              if cfg["ofs_embed_dim"] else None)
        self.transformer_blocks = nn.ModuleList([
            ExpertBlock(dim, heads, head_dim, time_dim, eps=cfg["norm_eps"], affine=cfg["norm_elementwise_affine"],
                        attention_bias=cfg["attention_bias"], device=device, dtype=dtype)
            for _ in range(cfg["num_layers"])])
        self.norm_final = LayerNorm(dim, eps=cfg["norm_eps"], elementwise_affine=cfg["norm_elementwise_affine"],
                                    device=device, dtype=dtype)
        self.norm_out = nn.Module()  # AdaLayerNorm: shift, scale from the time embedding (shift first)
        self.norm_out.silu = nn.SiLU()
        self.norm_out.linear = Linear(time_dim, 2 * dim, device=device, dtype=dtype)
        self.norm_out.norm = LayerNorm(dim, eps=cfg["norm_eps"], elementwise_affine=cfg["norm_elementwise_affine"],
                                       device=device, dtype=dtype)
        self.proj_out = Linear(dim, self.patch_size**2 * self.patch_size_t * self.out_channels, device=device,
                               dtype=dtype)
        self.gradient_checkpointing = False
        self.attention_backend = "sdpa"
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
        """Rough peak bytes of the activations of one forward pass on latents (B, C, T, h, w); classifier-free
        guidance doubles the batch. About 16 hidden-state-sized buffers alive at once (q, k, v, attention output,
        the feed-forward's 4x expansion, the residual stream)."""
        b, _, t, h, w = latent_shape
        batch = b * (2 if guidance else 1)
        return int(batch * self.sequence_length(t, h, w) * self.inner_dim * self.dtype.itemsize * 16)

    def set_attention_backend(self, name: str) -> None:
        fn = get_attention_backend(name)
        for block in self.transformer_blocks:
            block.attn1.attention_fn = fn
        self.attention_backend = name

    # -- positions ----------------------------------------------------------------------------------------------
    def _positions(self, t: int, h: int, w: int, device: torch.device):
        """(additive table or None, RoPE rotations or None) for a post-patch token grid (t, h, w)."""
        cfg = self.config
        table = rope = None
        if cfg["use_rotary_positional_embeddings"]:
            base = None
            if cfg["patch_size_t"] is None:  # 1.0: positions squeezed into the sample-size grid
                base = (cfg["sample_height"] // self.patch_size, cfg["sample_width"] // self.patch_size)
            rope = _rope_cache(cfg["attention_head_dim"], t, h, w, base, str(device))
        if cfg["use_learned_positional_embeddings"]:
            p = self.patch_size
            if (h * p, w * p) != (cfg["sample_height"], cfg["sample_width"]):
                raise CogVXError(
                    f"This model ({self.variant.title}) has learned positions for {cfg['sample_width'] * 8}x"
                    f"{cfg['sample_height'] * 8} only, got {w * p * 8}x{h * p * 8}. Generate at "
                    f"{cfg['sample_width'] * 8}x{cfg['sample_height'] * 8}.")
            if t == PatchEmbed.sample_latent_frames(cfg):
                table = self.patch_embed.pos_embedding[0]
            else:  # the reference silently falls back to the sin-cos table for other lengths
                log.warning("%s was trained at %d frames; other lengths use a sin-cos table instead of its learned "
                            "positions (as the reference does) and look worse.", self.variant.title, cfg["sample_frames"])
                table = self._sincos(t, h, w, device)
        elif not cfg["use_rotary_positional_embeddings"]:
            table = self._sincos(t, h, w, device)
        return table, rope

    def _sincos(self, t: int, h: int, w: int, device) -> torch.Tensor:
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
            raise CogVXError(f"{self.variant.title} takes {cfg['in_channels']} latent channels, got {c}.{hint}")
        if h % self.patch_size or w % self.patch_size:
            raise CogVXError(f"Latent height and width must be even (pixel sizes multiples of 16); got {h}x{w} "
                             f"latents ({w * 8}x{h * 8} pixels). Use the nearest multiple of 16.")
        if t % self.patch_size_t:
            raise CogVXError(f"{self.variant.title} patches {self.patch_size_t} latent frames together, so the latent "
                             f"frame count must be even; got {t}. Pad one latent frame at the front (the sampler "
                             "does this) and drop it after sampling.")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg["text_embed_dim"]:
            raise CogVXError(f"Text context must be (B={b}, L, {cfg['text_embed_dim']}); got {tuple(context.shape)}.")
        if cfg["use_learned_positional_embeddings"] and context.shape[1] != cfg["max_text_seq_length"]:
            raise CogVXError(f"{self.variant.title} needs exactly {cfg['max_text_seq_length']} text tokens (its learned "
                             f"positions cover them); got {context.shape[1]}.")

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
        table, rope = self._positions(*grid, x.device)
        if table is not None:
            tokens = tokens + table.to(dtype)[-tokens.shape[1]:]  # 2b/5b-I2V: (text +) video rows
        shard = self.sequence_parallel
        if shard is not None:  # this rank's video tokens (and RoPE rows) only
            tokens, rope = shard.shard(tokens, text_len, rope)

        for block in self.transformer_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = torch.utils.checkpoint.checkpoint(block, tokens, temb, text_len, rope, use_reentrant=False)
            else:
                tokens = block(tokens, temb, text_len, rope)

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


def build_transformer(config: dict, device="meta", dtype: torch.dtype | None = None) -> CogVideoXTransformer:
    """A transformer from a diffusers `transformer/config.json` dict, on `device` (meta: no memory until loaded)."""
    with torch.device(device):
        model = CogVideoXTransformer(config, dtype=dtype)
    return model
