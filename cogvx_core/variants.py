"""What distinguishes the released CogVideoX models: configs, defaults, frame and size rules, detection.

Everything version-specific lives here as data; the modules and models read it and never branch on a model name.
Numbers are from the released diffusers configs (see ../shared/reference/cogvideox-spec.md sections 1 and 4).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import CogVXError

# The diffusers `CogVideoXTransformer3DModel` defaults. A config.json only lists what it sets; the rest is this.
TRANSFORMER_DEFAULTS: dict = {
    "num_attention_heads": 30,
    "attention_head_dim": 64,
    "in_channels": 16,
    "out_channels": 16,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "time_embed_dim": 512,
    "ofs_embed_dim": None,
    "text_embed_dim": 4096,
    "num_layers": 30,
    "dropout": 0.0,
    "attention_bias": True,
    "sample_width": 90,
    "sample_height": 60,
    "sample_frames": 49,
    "patch_size": 2,
    "patch_size_t": None,
    "temporal_compression_ratio": 4,
    "max_text_seq_length": 226,
    "activation_fn": "gelu-approximate",
    "timestep_activation_fn": "silu",
    "norm_elementwise_affine": True,
    "norm_eps": 1e-5,
    "spatial_interpolation_scale": 1.875,
    "temporal_interpolation_scale": 1.0,
    "use_rotary_positional_embeddings": False,
    "use_learned_positional_embeddings": False,
    "patch_bias": True,
}

# The diffusers `AutoencoderKLCogVideoX` defaults (every release uses this architecture).
VAE_DEFAULTS: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["CogVideoXDownBlock3D"] * 4,
    "up_block_types": ["CogVideoXUpBlock3D"] * 4,
    "block_out_channels": [128, 256, 256, 512],
    "latent_channels": 16,
    "layers_per_block": 3,
    "act_fn": "silu",
    "norm_eps": 1e-6,
    "norm_num_groups": 32,
    "temporal_compression_ratio": 4,
    "sample_height": 480,
    "sample_width": 720,
    "scaling_factor": 1.15258426,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "invert_scale_latents": False,
}


@dataclass(frozen=True, kw_only=True)  # built with keywords: sixteen positional fields are easy to misplace
class Variant:
    """One released model family. Small models of the same architecture map to the same variant."""

    name: str  # stable id used in files, nodes and the CLI: "2b", "5b", "5b-i2v", "1.5-5b", "1.5-5b-i2v"
    title: str  # the Hub name, for messages
    generation: str  # "1.0" or "1.5"
    i2v: bool  # takes a start image (32 input channels)
    positions: str  # "sincos" | "rope" | "rope+learned"
    frames: int  # default pixel frames
    frame_step: int  # recommended frame counts are frame_step * N + 1
    max_frames: int
    fps: int
    width: int  # default pixel size
    height: int
    scaling_factor: float  # VAE latent scale
    invert_scale_latents: bool  # 1.5-I2V divides image latents by the scale instead of multiplying
    snr_shift_scale: float  # scheduler SNR shift (3.0 for 2b)
    dtype: str  # recommended compute dtype
    transformer: dict = field(default_factory=dict, repr=False)  # diffusers config fields that differ from defaults

    def transformer_config(self, **overrides) -> dict:
        return {**TRANSFORMER_DEFAULTS, **self.transformer, **overrides}

    @property
    def patch_size_t(self) -> int:
        return self.transformer.get("patch_size_t") or 1

    def latent_frames(self, frames: int) -> int:
        """Latent frames the VAE makes of `frames` pixel frames (4k+1 -> k+1)."""
        return latent_frames(frames)


_5B = {"num_attention_heads": 48, "num_layers": 42, "use_rotary_positional_embeddings": True}
_15 = {**_5B, "patch_size_t": 2, "patch_bias": False, "sample_height": 300, "sample_width": 300, "sample_frames": 81}

# What the models of one generation share: frame rules, default size and fps, latent scaling (1.5: all but I2V)
_GEN_10 = dict(generation="1.0", frames=49, frame_step=8, max_frames=49, fps=8, width=720, height=480,
               invert_scale_latents=False)
_GEN_15 = dict(generation="1.5", frames=81, frame_step=16, max_frames=161, fps=16, width=1360, height=768,
               invert_scale_latents=True, positions="rope", scaling_factor=0.7, snr_shift_scale=1.0, dtype="bfloat16")

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant(name="2b", title="CogVideoX-2b", i2v=False, positions="sincos", scaling_factor=1.15258426,
                snr_shift_scale=3.0, dtype="float16", transformer={}, **_GEN_10),
        Variant(name="5b", title="CogVideoX-5b", i2v=False, positions="rope", scaling_factor=0.7,
                snr_shift_scale=1.0, dtype="bfloat16", transformer=dict(_5B), **_GEN_10),
        Variant(name="5b-i2v", title="CogVideoX-5b-I2V", i2v=True, positions="rope+learned", scaling_factor=0.7,
                snr_shift_scale=1.0, dtype="bfloat16",
                transformer={**_5B, "in_channels": 32, "use_learned_positional_embeddings": True}, **_GEN_10),
        Variant(name="1.5-5b", title="CogVideoX1.5-5B", i2v=False, transformer=dict(_15), **_GEN_15),
        Variant(name="1.5-5b-i2v", title="CogVideoX1.5-5B-I2V", i2v=True,
                transformer={**_15, "in_channels": 32, "ofs_embed_dim": 512}, **_GEN_15),
    ]
}


def get_variant(name: str) -> Variant:
    key = name.strip().lower().replace("cogvideox", "").replace("_", "-").lstrip("-")
    key = {"1.5": "1.5-5b", "1.5-i2v": "1.5-5b-i2v", "i2v": "5b-i2v"}.get(key, key)
    if key not in VARIANTS:
        raise CogVXError(f"Unknown CogVideoX variant {name!r}. Known variants: {', '.join(VARIANTS)}.")
    return VARIANTS[key]


def detect_variant(transformer_config: dict) -> Variant:
    """The released variant whose architecture features a transformer config has (any width or depth)."""
    cfg = {**TRANSFORMER_DEFAULTS, **transformer_config}
    i2v = cfg["in_channels"] == 2 * cfg["out_channels"]
    if cfg["patch_size_t"]:
        return VARIANTS["1.5-5b-i2v" if i2v else "1.5-5b"]
    if not cfg["use_rotary_positional_embeddings"]:
        if i2v:
            raise CogVXError("A CogVideoX 1.0 image-to-video transformer without rotary embeddings is not a released "
                             "architecture; check the checkpoint's transformer config.")
        return VARIANTS["2b"]
    if i2v:  # a text-to-video transformer may also carry the learned table (cogvx-tiny does)
        return VARIANTS["5b-i2v"]
    return VARIANTS["5b"]


# ---------------------------------------------------------------------------------------------------------------
# Frame and size rules, applied before any work
# ---------------------------------------------------------------------------------------------------------------
TEMPORAL_COMPRESSION = 4  # every released VAE: 4k+1 pixel frames <-> k+1 latent frames
SPATIAL_COMPRESSION = 8  # pixels per latent cell
SIZE_STEP = 16  # pixel sizes are multiples of 16 (8x VAE, then 2x2 patches)


def latent_frames(frames: int) -> int:
    """Latent frames the VAE makes of `frames` pixel frames (4k+1 -> k+1)."""
    return (frames - 1) // TEMPORAL_COMPRESSION + 1


def pixel_frames(latent_frames: int) -> int:
    """Pixel frames the VAE decodes `latent_frames` latent frames to (k+1 -> 4k+1)."""
    return (latent_frames - 1) * TEMPORAL_COMPRESSION + 1


def _nearest_multiple(value: int, step: int, lowest: int) -> int:
    return max(lowest, int(round(value / step)) * step)


def snap_frames(frames: int) -> int:
    """The nearest valid pixel frame count 4k+1 (ties go up)."""
    return max(1, 4 * int((max(frames, 1) - 1) / 4 + 0.5) + 1)


def snap_request(variant: Variant, frames: int, height: int, width: int, *, has_image: bool,
                 released: bool = True, name: str | None = None, learned_size: tuple[int, int] | None = None
                 ) -> tuple[int, int, int, list[str]]:
    """Valid (frames, height, width) for `variant`, with one note per change or hint.

    Structural rules hold for every model: 4k+1 frames, sizes that are multiples of 16, an image for image-to-video
    models and none for text-to-video ones. `released` adds the release's own limits: 720x480 for 5b-I2V (its learned
    position table), and for 1.5-I2V a shorter side of 768 and a longer side of at most 1360. `name`: the model's own
    name, for messages (default: the variant's title). `learned_size`: (height, width) a model's learned position
    table fixes (transformer.learned_size: cogvx-tiny, small 5b-I2V-like models); the size snaps to it.
    """
    name = name or variant.title
    if variant.i2v and not has_image:
        raise CogVXError(f"{name} is an image-to-video model: give it a start image, or load a "
                         "text-to-video model.")
    if not variant.i2v and has_image:
        raise CogVXError(f"{name} is a text-to-video model and cannot take a start image: load an "
                         "image-to-video model (5b-I2V or 1.5-5B-I2V), or remove the image.")
    notes: list[str] = []
    if frames < 1:
        raise CogVXError(f"Frame count must be at least 1, got {frames}.")
    new = snap_frames(frames)
    if new != frames:
        notes.append(f"frames {frames} -> {new}: the VAE needs 4k+1 frames")
        frames = new
    if released and (frames - 1) % variant.frame_step:
        notes.append(f"hint: {variant.title} was trained on {variant.frame_step}N+1 frames (e.g. {variant.frames})")
    if released and frames > variant.max_frames:
        notes.append(f"hint: {variant.title} was trained on at most {variant.max_frames} frames; longer videos degrade")

    fixed = learned_size or ((variant.height, variant.width) if released and variant.positions == "rope+learned"
                             else None)
    if fixed is not None and (height, width) != tuple(fixed):
        notes.append(f"size {width}x{height} -> {fixed[1]}x{fixed[0]}: {name}'s learned positions exist for that "
                     "size only")
        return frames, fixed[0], fixed[1], notes
    if released and variant.i2v and variant.generation == "1.5":
        short, long_ = (height, width) if height <= width else (width, height)
        new_long = min(1360, max(768, _nearest_multiple(long_ * 768 / max(short, 1), 16, 16)))
        new_h, new_w = (768, new_long) if height <= width else (new_long, 768)
        if (new_h, new_w) != (height, width):
            notes.append(f"size {width}x{height} -> {new_w}x{new_h}: {variant.title} needs a shorter side of 768 "
                         "and a longer side of at most 1360")
        return frames, new_h, new_w, notes
    new_h, new_w = _nearest_multiple(height, 16, 16), _nearest_multiple(width, 16, 16)
    if (new_h, new_w) != (height, width):
        notes.append(f"size {width}x{height} -> {new_w}x{new_h}: sizes must be multiples of 16")
    return frames, new_h, new_w, notes


def snap_video(frames: int, height: int, width: int) -> tuple[int, int, int, list[str]]:
    """(frames to keep, height, width) for an input video of `frames` frames (video-to-video), with a note per
    change: the first 4k+1 frames (a video cannot gain frames) and sizes rounded to multiples of 16."""
    if frames < 1:
        raise CogVXError("The input video has no frames.")
    notes = []
    keep = (frames - 1) // TEMPORAL_COMPRESSION * TEMPORAL_COMPRESSION + 1
    if keep != frames:
        notes.append(f"frames {frames} -> {keep}: the VAE needs 4k+1 frames (kept the first {keep})")
    new_h, new_w = _nearest_multiple(height, SIZE_STEP, SIZE_STEP), _nearest_multiple(width, SIZE_STEP, SIZE_STEP)
    if (new_h, new_w) != (height, width):
        notes.append(f"size {width}x{height} -> {new_w}x{new_h}: sizes must be multiples of 16")
    return keep, new_h, new_w, notes
