"""The CogVideoX samplers: DDIM and SDE DPM-Solver++(2M), with classifier-free guidance and dynamic CFG.

Step for step the same numbers as diffusers' CogVideoXDDIMScheduler.step, CogVideoXDPMScheduler.step and the denoising
loop of the CogVideoX pipelines (spec 4.3-4.5, 2.7), including the random draws of the DPM sampler, so a seed gives the
reference's video. For that the arithmetic below keeps the reference's operation order and operand types: coefficients
are 0-d float64 tensors, predictions are float32, and the latents keep the model dtype (bf16 latents times a
coefficient round to bf16 before they meet the float32 terms, exactly as in the reference).

Layout: our latents are (B, C, T, H, W); the reference holds (B, T, C, H, W). Everything here is elementwise, so the
layout only matters for random draws, which are made in the reference layout (randn_like_reference).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .checks import require_finite
from .errors import CogVXError
from .noise import randn_like_reference
from .schedule import NoiseSchedule

SAMPLERS = ("ddim", "dpm")

# predict(latents (B, C, T, H, W), t, do_cfg) -> (v_cond, v_uncond or None)
Predict = Callable[[torch.Tensor, int, bool], "tuple[torch.Tensor, torch.Tensor | None]"]
# callback(step_index, num_steps, latents (B, C, T, H, W), x0 (B, C, T, H, W)); may raise to cancel
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def dynamic_guidance_scale(guidance: float, t: int, num_steps: int) -> float:
    """The reference's "dynamic CFG" scale for the step at training timestep t (spec 4.5).

    w_t = 1 + w * (1 - cos(pi * ((N - t) / N) ** 5)) / 2 with t the raw timestep (999, 979, ...) rather than a
    step index, exactly as diffusers and the original SAT code compute it; w_t therefore jumps around inside
    [1, 1 + w] from step to step instead of rising smoothly. Kept as is: it is what the models were tuned with.
    """
    return 1 + guidance * ((1 - math.cos(math.pi * ((num_steps - int(t)) / num_steps) ** 5.0)) / 2)


def predict_x0(schedule: NoiseSchedule, model_output: torch.Tensor, sample: torch.Tensor,
               alpha_t: torch.Tensor) -> torch.Tensor:
    """The clean-latent estimate from the model output at a step with alphas_cumprod alpha_t (0-d float64)."""
    beta_t = 1 - alpha_t
    if schedule.prediction_type == "v_prediction":
        return (alpha_t**0.5) * sample - (beta_t**0.5) * model_output
    # epsilon
    return (sample - beta_t**0.5 * model_output) / alpha_t**0.5


def ddim_step(schedule: NoiseSchedule, model_output: torch.Tensor, t: int, sample: torch.Tensor,
              num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One deterministic DDIM step (eta = 0) from t to t - n_train // num_steps. Returns (x_prev, x0)."""
    alpha_t = schedule.alpha_cumprod(t)
    alpha_prev = schedule.alpha_cumprod(schedule.prev_timestep(t, num_steps))
    x0 = predict_x0(schedule, model_output, sample, alpha_t)
    # x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps, with eps re-expressed through x and x0.
    a = ((1 - alpha_prev) / (1 - alpha_t)) ** 0.5
    b = alpha_prev**0.5 - alpha_t**0.5 * a
    return a * sample + b * x0, x0


def _half_log_snr(alpha: torch.Tensor) -> torch.Tensor:
    """lambda = log(sqrt(a / (1 - a))); -inf at zero terminal SNR, +inf at a = 1 (the IEEE infinities are intended)."""
    return ((alpha / (1 - alpha)) ** 0.5).log()


def dpm_step(schedule: NoiseSchedule, model_output: torch.Tensor, t: int, sample: torch.Tensor, num_steps: int,
             old_x0: torch.Tensor | None, t_back: int | None,
             generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One SDE DPM-Solver++(2M) step from t (spec 4.4). Returns (x_prev, x0).

    `old_x0` / `t_back` are the previous step's x0 and timestep (None on the first step). The first-order update and
    its noise are always computed (one draw); on a middle step the second-order update replaces it with a second
    draw, so the generator advances 1, 2, ..., 2, 1 times over a run, like the reference.
    """
    t_prev = schedule.prev_timestep(t, num_steps)
    alpha_t = schedule.alpha_cumprod(t)
    alpha_prev = schedule.alpha_cumprod(t_prev)
    x0 = predict_x0(schedule, model_output, sample, alpha_t)

    lam = _half_log_snr(alpha_t)
    h = _half_log_snr(alpha_prev) - lam
    m1 = ((1 - alpha_prev) / (1 - alpha_t)) ** 0.5 * (-h).exp()
    m2 = (-2 * h).expm1() * alpha_prev**0.5  # <= 0
    noise_scale = (1 - alpha_prev) ** 0.5 * (1 - (-2 * h).exp()) ** 0.5

    noise = randn_like_reference(sample.shape, generator, sample.dtype, sample.device)
    x_prev = m1 * sample - m2 * x0 + noise_scale * noise
    if old_x0 is None or t_prev < 0:
        return x_prev, x0

    # Second order: extrapolate x0 with the previous one; r is the ratio of the last two log-SNR steps.
    r = (lam - _half_log_snr(schedule.alpha_cumprod(t_back))) / h
    m3 = 1 + 1 / (2 * r)
    m4 = 1 / (2 * r)
    x0_2m = m3 * x0 - m4 * old_x0
    noise = randn_like_reference(sample.shape, generator, sample.dtype, sample.device)
    return m1 * sample - m2 * x0_2m + noise_scale * noise, x0


def sample(predict: Predict, latents: torch.Tensor, *, schedule: NoiseSchedule, timesteps, sampler: str = "ddim",
           guidance: float = 6.0, dynamic_cfg: bool = False, generator: torch.Generator | None = None,
           callback: StepCallback | None = None, num_steps: int | None = None) -> torch.Tensor:
    """Run the denoising loop over `timesteps` and return the final latents (B, C, T, H, W) in the input dtype.

    predict(latents, t, do_cfg) -> (v_cond, v_uncond or None): the model call, supplied by the pipeline. CFG runs only
    when guidance > 1 (do_cfg is False otherwise and the uncond prediction is not asked for).
    num_steps: the step count `timesteps` was made for (sets each step's size); defaults to len(timesteps). Pass the
    full count when `timesteps` is a video-to-video tail from NoiseSchedule.strength_timesteps.
    callback(step_index, len(timesteps), latents, x0) runs after every step; raising from it stops sampling.
    """
    if sampler not in SAMPLERS:
        raise CogVXError(f"Unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}.")
    if latents.ndim != 5:
        raise CogVXError(f"Latents must be 5-d (B, C, T, H, W), got shape {tuple(latents.shape)}.")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise CogVXError(f"Guidance scale must be a finite number, got {guidance!r}.")
    timesteps = [int(t) for t in timesteps]
    if not timesteps:
        raise CogVXError("No timesteps to sample; ask for at least one step.")
    n_run = len(timesteps)
    num_steps = n_run if num_steps is None else int(num_steps)
    if num_steps < n_run or num_steps > schedule.num_train_timesteps:
        raise CogVXError(f"num_steps={num_steps} must lie between the {n_run} timesteps given and "
                         f"{schedule.num_train_timesteps}; pass the step count the timesteps were made for.")
    bad = [t for t in timesteps if not 0 <= t < schedule.num_train_timesteps]
    if bad:
        raise CogVXError(f"Timesteps {bad[:3]} lie outside 0..{schedule.num_train_timesteps - 1}; make them with "
                         f"NoiseSchedule.timesteps().")

    dtype = latents.dtype
    do_cfg = guidance > 1.0
    old_x0 = None  # DPM's previous x0
    for i, t in enumerate(timesteps):
        v_cond, v_uncond = predict(latents, t, do_cfg)
        v = v_cond.float()
        if do_cfg:
            if v_uncond is None:
                raise CogVXError("The model call returned no unconditional prediction although guidance > 1.")
            # The reference's dynamic CFG uses the count of steps it runs (len(timesteps), also for video-to-video).
            w = dynamic_guidance_scale(guidance, t, n_run) if dynamic_cfg else guidance
            v_uncond = v_uncond.float()
            v = v_uncond + w * (v - v_uncond)

        if sampler == "ddim":
            latents, x0 = ddim_step(schedule, v, t, latents, num_steps)
        else:
            t_back = timesteps[i - 1] if i > 0 else None
            latents, x0 = dpm_step(schedule, v, t, latents, num_steps, old_x0, t_back, generator)
            old_x0 = x0
        latents = latents.to(dtype)
        require_finite(latents, f"sampling step {i + 1} of {n_run} (timestep {t})")  # one reduction on the latents

        if callback is not None:
            callback(i, n_run, latents, x0)
    return latents
