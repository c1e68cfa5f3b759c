"""The CogVideoX training objective: v-prediction on the zero-terminal-SNR schedule, scored as an x0 error.

As the reference trainers compute it (diffusers' examples/cogvideo/train_cogvideox_lora.py and THUDM's finetune):

    x_t      = sqrt(a_t) * x0 + sqrt(1 - a_t) * noise          (schedule.add_noise)
    v        = transformer(x_t, t, text)
    x0_pred  = sqrt(a_t) * x_t - sqrt(1 - a_t) * v             (the scheduler's get_velocity(v, x_t, t))
    loss_i   = mean over sample i of  (x0_pred - x0)^2 / (1 - a_t)
    loss     = mean over the batch

The 1 / (1 - a_t) weight makes this the plain v-MSE. Dtypes follow the reference: the square roots in the model
output's dtype, the weight from the float64 schedule (so the weighted error is float64).

`frame_mask` (B, T) marks the real latent frames of Frame Pack batches (padded frames count for nothing; each
sample is averaged over its own frames only).
"""

from __future__ import annotations

import torch


def predicted_x0(model_output: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor,
                 alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x0 from a v-prediction: sqrt(a_t) * x_t - sqrt(1 - a_t) * v, coefficients in the model output's dtype."""
    b = model_output.shape[0]
    a = alphas_cumprod.to(model_output.device).to(model_output.dtype)[timesteps.to(model_output.device)]
    sqrt_a = (a**0.5).flatten()
    sqrt_1ma = ((1 - a) ** 0.5).flatten()
    shape = (b,) + (1,) * (model_output.ndim - 1)
    return sqrt_a.reshape(shape) * noisy - sqrt_1ma.reshape(shape) * model_output


def loss_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """1 / (1 - a_t) per sample, float64 as the reference's schedule."""
    a = alphas_cumprod[timesteps.to(alphas_cumprod.device)]
    return 1 / (1 - a)


def v_prediction_loss(model_output: torch.Tensor, noisy: torch.Tensor, latents: torch.Tensor,
                      timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                      frame_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample losses (B,) of v-predictions (B, C, T, H, W) against the clean latents (B, C, T, H, W)."""
    b = model_output.shape[0]
    x0 = predicted_x0(model_output, noisy, timesteps, alphas_cumprod)
    w = loss_weights(timesteps, alphas_cumprod).to(model_output.device)
    w = w.reshape((b,) + (1,) * (model_output.ndim - 1))
    err = w * (x0 - latents) ** 2  # (B, C, T, H, W), float64
    if frame_mask is None:
        return err.reshape(b, -1).mean(dim=1)
    mask = frame_mask.to(device=err.device, dtype=err.dtype)[:, None, :, None, None]  # (B, 1, T, 1, 1)
    count = mask.sum(dim=(1, 2, 3, 4)) * err.shape[1] * err.shape[3] * err.shape[4]
    return (err * mask).reshape(b, -1).sum(dim=1) / count
