"""The CogVideoX noise schedule: alphas_cumprod, inference timesteps, forward noising, img2img strength.

Matches diffusers' CogVideoXDDIMScheduler / CogVideoXDPMScheduler `__init__` and `set_timesteps` and the
video-to-video pipeline's `get_timesteps` (spec sections 1.3, 4.1, 4.2, 4.5). Both schedulers share this schedule;
which one is used is a sampler choice (cogvx_core/samplers.py).

Bit-exactness matters here: alphas_cumprod is built in float64 with the same operation order as the reference, and
the per-step coefficients are 0-d float64 tensors (not Python floats) so the samplers promote and round exactly as the
reference does.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .checks import config_types
from .errors import CogVXError
from .variants import Variant, get_variant

SPACINGS = ("trailing", "leading", "linspace")
PREDICTION_TYPES = ("v_prediction", "epsilon")
SCHEDULER_CLASSES = ("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler")

# What diffusers' CogVideoX schedulers assume for a key a scheduler_config.json leaves out (their __init__ defaults).
# These differ from the released CogVideoX settings, so from_config() must fill gaps with these, not with ours.
DIFFUSERS_DEFAULTS: dict = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.0120,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
    "snr_shift_scale": 3.0,
}


def _zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Shift and stretch sqrt(alphas_cumprod) so the last step has SNR 0 and the first keeps its value.

    Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"), Algorithm 1, applied to
    alphas_cumprod directly. Same operation order as the reference, for bit-equal float64 results.
    """
    sqrt_ac = alphas_cumprod.sqrt()
    first = sqrt_ac[0].clone()
    last = sqrt_ac[-1].clone()
    sqrt_ac = sqrt_ac - last
    sqrt_ac = sqrt_ac * (first / (first - last))
    return sqrt_ac**2


class NoiseSchedule:
    """The discrete VP schedule of CogVideoX (1000 training steps, v-prediction, zero terminal SNR).

    `NoiseSchedule(snr_shift_scale=3.0)` is the released 2b schedule, `NoiseSchedule()` (shift 1.0) the 5b / 1.5 one;
    `NoiseSchedule.for_variant(v)` picks the shift from cogvx_core/variants.py, `NoiseSchedule.from_config(d)` reads a
    diffusers scheduler_config.json dict.
    """

    def __init__(
        self,
        *,
        snr_shift_scale: float = 1.0,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.0120,
        prediction_type: str = "v_prediction",
        timestep_spacing: str = "trailing",
        rescale_betas_zero_snr: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise CogVXError(f"Unsupported prediction_type {prediction_type!r}: CogVX samples models that predict "
                             f"{' or '.join(PREDICTION_TYPES)} (every CogVideoX release uses v_prediction). Fix the "
                             f"scheduler config's prediction_type.")
        if timestep_spacing not in SPACINGS:
            raise CogVXError(f"Unsupported timestep_spacing {timestep_spacing!r}; use one of {', '.join(SPACINGS)} "
                             f"(CogVideoX uses 'trailing').")
        if not (isinstance(num_train_timesteps, int) and num_train_timesteps >= 2):
            raise CogVXError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}; CogVideoX "
                             f"uses 1000.")
        if not (0 < beta_start <= beta_end < 1):
            raise CogVXError(f"beta_start={beta_start!r} / beta_end={beta_end!r} must satisfy 0 < start <= end < 1; "
                             f"CogVideoX uses 0.00085 / 0.012.")
        if not snr_shift_scale > 0:
            raise CogVXError(f"snr_shift_scale must be > 0, got {snr_shift_scale!r} (3.0 for CogVideoX-2b, 1.0 for "
                             f"the 5b and 1.5 models).")
        if not isinstance(steps_offset, int):
            raise CogVXError(f"steps_offset must be an integer, got {steps_offset!r}; CogVideoX uses 0.")

        self.num_train_timesteps = num_train_timesteps
        self.prediction_type = prediction_type
        self.timestep_spacing = timestep_spacing
        self.steps_offset = steps_offset
        self.snr_shift_scale = float(snr_shift_scale)

        # "scaled_linear" betas: linear in sqrt(beta), in float64.
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        # SNR shift: SNR' = SNR / s, written on alphas_cumprod.
        s = snr_shift_scale
        alphas_cumprod = alphas_cumprod / (s + (1 - s) * alphas_cumprod)
        if rescale_betas_zero_snr:
            alphas_cumprod = _zero_terminal_snr(alphas_cumprod)
        self.alphas_cumprod = alphas_cumprod  # (num_train_timesteps,) float64, index = training timestep
        # alphas_cumprod "before" step 0, used when a step jumps past t = 0.
        self.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if set_alpha_to_one else alphas_cumprod[0]

    # ---- construction -------------------------------------------------------------------------------------------

    @classmethod
    def for_variant(cls, variant: Variant | str) -> "NoiseSchedule":
        """The released schedule of a CogVideoX variant (all settings of spec 1.3)."""
        if isinstance(variant, str):
            variant = get_variant(variant)
        return cls(snr_shift_scale=variant.snr_shift_scale)

    @classmethod
    def from_config(cls, cfg: dict) -> "NoiseSchedule":
        """Read a diffusers `scheduler/scheduler_config.json` dict; keys it leaves out take diffusers' defaults."""
        if not isinstance(cfg, dict):
            raise CogVXError(f"A scheduler config must be a JSON object (dict), got {type(cfg).__name__}; pass the "
                             f"parsed scheduler/scheduler_config.json.")
        name = cfg.get("_class_name")
        if name is not None and name not in SCHEDULER_CLASSES:
            raise CogVXError(f"Scheduler config class {name!r} is not a CogVideoX scheduler; CogVX reads "
                             f"{' or '.join(SCHEDULER_CLASSES)} configs. Use the scheduler/scheduler_config.json of a "
                             f"CogVideoX model folder, or leave the config out to use the variant's released schedule.")
        config_types(cfg, DIFFUSERS_DEFAULTS, "scheduler/scheduler_config.json")
        c = {**DIFFUSERS_DEFAULTS, **cfg}
        if c["trained_betas"] is not None:
            raise CogVXError("Scheduler configs with explicit trained_betas are not supported: CogVideoX uses the "
                             "'scaled_linear' betas. Remove trained_betas from the scheduler config.")
        if c["beta_schedule"] != "scaled_linear":
            raise CogVXError(f"Unsupported beta_schedule {c['beta_schedule']!r}: CogVideoX models are trained with "
                             f"'scaled_linear'. Fix the scheduler config's beta_schedule.")
        for key in ("set_alpha_to_one", "rescale_betas_zero_snr"):
            if not isinstance(c[key], bool):
                raise CogVXError(f"Scheduler config field {key} must be true or false, got {c[key]!r}.")
        for key in ("beta_start", "beta_end", "snr_shift_scale"):
            if isinstance(c[key], bool) or not isinstance(c[key], (int, float)) or not math.isfinite(c[key]):
                raise CogVXError(f"Scheduler config field {key} must be a number, got {c[key]!r}.")
        return cls(
            snr_shift_scale=c["snr_shift_scale"],
            num_train_timesteps=c["num_train_timesteps"],
            beta_start=c["beta_start"],
            beta_end=c["beta_end"],
            prediction_type=c["prediction_type"],
            timestep_spacing=c["timestep_spacing"],
            rescale_betas_zero_snr=c["rescale_betas_zero_snr"],
            set_alpha_to_one=c["set_alpha_to_one"],
            steps_offset=c["steps_offset"],
        )

    # ---- timesteps ----------------------------------------------------------------------------------------------

    def timesteps(self, num_steps: int, spacing: str | None = None) -> torch.Tensor:
        """The `num_steps` training timesteps to sample at, high to low, as a (num_steps,) int64 CPU tensor.

        `spacing` defaults to the config's (CogVideoX: "trailing", e.g. 50 -> [999, 979, ..., 19]).
        One deliberate deviation: for a few step counts (61, 103, 121, ...) the reference's float `arange` makes one
        extra "trailing" timestep equal to -1 (which it then reads as alphas_cumprod[-1] = the noisiest step); it is
        dropped here, so exactly `num_steps` steps run.
        """
        spacing = spacing or self.timestep_spacing
        n_train = self.num_train_timesteps
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= n_train:
            raise CogVXError(f"The number of sampling steps must be an integer from 1 to {n_train}, got {num_steps!r}.")
        # numpy on purpose: the reference uses numpy's arange / linspace / round, and float arange values depend on
        # how they are accumulated.
        if spacing == "trailing":
            ts = np.round(np.arange(n_train, 0, -n_train / num_steps)).astype(np.int64) - 1
            ts = ts[ts >= 0]
        elif spacing == "leading":
            ratio = n_train // num_steps
            ts = (np.arange(0, num_steps) * ratio).round()[::-1].copy().astype(np.int64) + self.steps_offset
        elif spacing == "linspace":
            ts = np.linspace(0, n_train - 1, num_steps).round()[::-1].copy().astype(np.int64)
        else:
            raise CogVXError(f"Unknown timestep spacing {spacing!r}; use one of {', '.join(SPACINGS)}.")
        return torch.from_numpy(ts)

    def step_ratio(self, num_steps: int) -> int:
        """How far one step jumps in training timesteps: n_train // num_steps, whatever the spacing."""
        return self.num_train_timesteps // num_steps

    def prev_timestep(self, t: int, num_steps: int) -> int:
        """The timestep a step from `t` lands on; negative past the end (then alphas_cumprod is final_alpha_cumprod)."""
        return int(t) - self.step_ratio(num_steps)

    def alpha_cumprod(self, t: int) -> torch.Tensor:
        """alphas_cumprod at training timestep t as a 0-d float64 tensor; t < 0 means "fully denoised"."""
        t = int(t)
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def strength_timesteps(self, timesteps: torch.Tensor, strength: float) -> torch.Tensor:
        """The tail of `timesteps` that video-to-video runs for a denoising `strength` in [0, 1].

        As the reference: keep the last int(N * strength) steps, N = len(timesteps). Sample with
        `num_steps=len(timesteps)` (the full count) so each step's size stays that of the full schedule.
        """
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
            raise CogVXError(f"Denoising strength must be a number in [0, 1], got {strength!r}.")
        n = len(timesteps)
        keep = min(int(n * strength), n)
        start = max(n - keep, 0)
        tail = timesteps[start:]
        if len(tail) == 0:
            raise CogVXError(f"Strength {strength} with {n} steps leaves no step to run (int({n} * {strength}) = 0). "
                             f"Raise the strength to at least {1 / n:.3g} or use more steps.")
        return tail

    # ---- forward process ----------------------------------------------------------------------------------------

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """Noise clean latents to timestep t: sqrt(a_t) * x0 + sqrt(1 - a_t) * noise.

        `t` is an int or a (B,) tensor of per-sample timesteps (batch is dim 0 in any layout). As the reference, the
        schedule is cast to x0's dtype before the square roots (so bf16 latents get bf16 coefficients).
        """
        ac = self.alphas_cumprod.to(device=x0.device).to(dtype=x0.dtype)
        t = torch.as_tensor(t, dtype=torch.long).to(x0.device).flatten()
        sqrt_a = (ac[t] ** 0.5).flatten()
        sqrt_1ma = ((1 - ac[t]) ** 0.5).flatten()
        shape = (-1,) + (1,) * (x0.ndim - 1)  # broadcast over everything but the batch
        return sqrt_a.reshape(shape) * x0 + sqrt_1ma.reshape(shape) * noise
