"""Tiny CogVideoX VAEs with the real structure and every tensor randomised, for parity tests against diffusers.

The structure is the released one (4 blocks, time compression in the first two, 3 resnets per down block and 4 per
up block, spatial norms in the decoder, conv_shortcut where channels change); only widths and group counts shrink.
"""

from __future__ import annotations

import math

import torch

# The real structure, narrow: 4 blocks with channel changes at blocks 1 and 3 (so conv_shortcut exists where the
# released VAE has it), 4 GroupNorm groups, a non-default resnet eps, and small sample sizes so default tiles are small.
TINY_VAE_CONFIG = {
    "block_out_channels": [8, 16, 16, 32],
    "latent_channels": 4,
    "layers_per_block": 3,
    "norm_num_groups": 4,
    "norm_eps": 1e-5,
    "sample_height": 96,  # default tiles 48x80 pixels (6x10 latents), strides equal to the crops as at 480x720
    "sample_width": 160,
    "scaling_factor": 0.7,
}

# A VAE whose GroupNorm group count is the released 32, so its architecture can be read from weights alone.
WEIGHTS_ONLY_VAE_CONFIG = {
    "block_out_channels": [32, 32, 32, 64],
    "latent_channels": 8,
    "layers_per_block": 2,
}


def random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor random: conv weights ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.2^2), biases ~ N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in sorted(shapes.items()):
        noise = torch.randn(shape, generator=g)
        if len(shape) > 1:
            state[name] = noise / math.sqrt(math.prod(shape[1:]))
        elif name.endswith(".weight"):  # GroupNorm scale
            state[name] = 1.0 + 0.2 * noise
        else:
            state[name] = 0.1 * noise
    return state


def reference_vae(config: dict, state: dict[str, torch.Tensor]):
    """diffusers' AutoencoderKLCogVideoX (the oracle) with these weights."""
    from diffusers import AutoencoderKLCogVideoX

    model = AutoencoderKLCogVideoX(**config).eval()
    model.load_state_dict(state)
    return model


def vae_pair(config: dict, seed: int = 0):
    """(ours, reference, state dict): our CausalVAE and diffusers' with the same random weights."""
    from cogvx_core import build_vae

    ours = build_vae(config, device="cpu")
    state = random_state_dict({k: tuple(v.shape) for k, v in ours.state_dict().items()}, seed)
    ours.load_state_dict(state)
    return ours.eval(), reference_vae(config, state), state


def sat_key(key: str, up_levels: int) -> str:
    """A diffusers VAE key in the original SAT layout (the converter's renames run backwards)."""
    parts = key.split(".")
    if parts[0] == "decoder" and parts[1] == "up_blocks":
        parts[1], parts[2] = "up", str(up_levels - 1 - int(parts[2]))
    key = ".".join(parts)
    for new, old in (("mid_block.resnets.0", "mid.block_1"), ("mid_block.resnets.1", "mid.block_2"),
                     ("down_blocks.", "down."), ("resnets.", "block."), ("downsamplers.0", "downsample"),
                     ("upsamplers.0", "upsample"), ("conv_shortcut", "nin_shortcut")):
        key = key.replace(new, old)
    return key


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
