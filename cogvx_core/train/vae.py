"""Training the CogVideoX 3D causal VAE (from scratch or on from a checkpoint) with the paper's losses that work
offline: L1 reconstruction (plus an MSE term, which is what PSNR measures), a small KL to the unit Gaussian, and an
optional adversarial loss from a small 3D patch discriminator (off by default). The paper's LPIPS term needs a
pretrained network that cannot be downloaded here, so it is left out.

    trainer = VAETrainer(vae, clips, VAETrainSettings(steps=3000), checkpoint_dir="ckpt")
    trainer.resume()
    trainer.run(on_step=print)
    psnr = reconstruction_psnr(vae, heldout)

`clips` is a uint8 tensor (N, T, H, W, 3) of 4k+1-frame videos held in memory (small synthetic datasets). Each step
draws its clips, its crop and its posterior noise from generators seeded by (seed, purpose, step), so a resumed run
repeats exactly what an uninterrupted one does. Early steps may train on random spatial crops (`crop`, `crop_steps`):
the VAE is convolutional, a crop costs a fraction of a whole frame, and the last steps at the full size adapt the
GroupNorm statistics to whole frames.

Checkpoints (VAE weights, optimizer state, discriminator, step and loss history) are written to a temporary folder
and renamed, so a killed run resumes from the latest complete one.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CogVXError
from ..vae import CausalVAE
from .checkpoint import latest_checkpoint, read_checkpoint, write_checkpoint
from .rng import generator

CHECKPOINT_PREFIX = "vae-step-"


@dataclass
class VAETrainSettings:
    steps: int = 2000
    batch_size: int = 4
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05  # cosine decay down to this fraction of the learning rate
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    kl_weight: float = 1e-6
    gan_weight: float = 0.0  # 0: no discriminator (the default; the adversarial term only sharpens textures)
    gan_start: int = 0  # step at which the adversarial term switches on
    crop: int = 0  # spatial crop side (multiple of 8) for the first `crop_steps` steps; 0: whole frames
    crop_steps: int = 0
    initial_logvar: float = -6.0  # posterior log-variance the encoder starts at (a fresh model only)
    mixed_precision: str = "bf16"  # "bf16" autocast or "no"
    seed: int = 0
    save_every: int = 0

    def check(self) -> None:
        problems = []
        if self.steps < 1 or self.batch_size < 1:
            problems.append(f"steps ({self.steps}) and batch size ({self.batch_size}) must be at least 1")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            problems.append(f"learning rate {self.learning_rate} must be a positive number")
        if min(self.l1_weight, self.mse_weight, self.kl_weight, self.gan_weight) < 0:
            problems.append("loss weights must be 0 or more")
        if self.crop and self.crop % 8:
            problems.append(f"crop {self.crop} must be a multiple of 8 (the VAE's spatial factor)")
        if self.mixed_precision not in ("bf16", "no"):
            problems.append(f"mixed precision {self.mixed_precision!r}: use 'bf16' or 'no'")
        if problems:
            raise CogVXError("VAE training settings: " + "; ".join(problems) + ".")


def to_model_input(clips: torch.Tensor) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) -> float (B, 3, T, H, W) in [-1, 1]."""
    return clips.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


def kl_to_unit_gaussian(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) averaged over every latent element."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


class PatchDiscriminator3D(nn.Module):
    """A small 3D patch discriminator (strided Conv3d, LeakyReLU): one real/fake logit per spatio-temporal patch."""

    def __init__(self, channels: int = 32, layers: int = 3):
        super().__init__()
        blocks, c_in = [], 3
        for i in range(layers):
            c_out = channels * 2 ** i
            blocks += [nn.Conv3d(c_in, c_out, kernel_size=(3, 4, 4), stride=(1, 2, 2), padding=(1, 1, 1)),
                       nn.GroupNorm(min(8, c_out), c_out) if i else nn.Identity(), nn.LeakyReLU(0.2)]
            c_in = c_out
        blocks.append(nn.Conv3d(c_in, 1, kernel_size=3, padding=1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 1, T, H/2^layers, W/2^layers)


def reconstruction_psnr(vae: CausalVAE, clips: torch.Tensor, batch_size: int = 4) -> list[float]:
    """PSNR (dB, pixel range [0, 1]) of each clip's round trip through the VAE (posterior mean), uint8 clips in."""
    out = []
    with torch.no_grad():
        for i in range(0, len(clips), batch_size):
            x = to_model_input(clips[i:i + batch_size]).to(vae.device, vae.dtype)
            y = vae.decode(vae.encode(x)).float().clamp(-1, 1)
            mse = ((y - x.float()) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-12)
            out += (10 * torch.log10(1 / mse)).tolist()
    return out


class VAETrainer:
    def __init__(self, vae: CausalVAE, clips: torch.Tensor, settings: VAETrainSettings, *,
                 checkpoint_dir: str | os.PathLike | None = None, fresh: bool = True):
        settings.check()
        if clips.dtype != torch.uint8 or clips.ndim != 5 or clips.shape[-1] != 3:
            raise CogVXError(f"VAE training clips must be uint8 (N, T, H, W, 3); got {clips.dtype} "
                             f"{tuple(clips.shape)}.")
        if settings.crop and settings.crop > min(clips.shape[2:4]):
            raise CogVXError(f"crop {settings.crop} is larger than the {clips.shape[2]}x{clips.shape[3]} clips.")
        frames = clips.shape[1]
        if vae.pixel_frames(vae.latent_frames(frames)) != frames:
            raise CogVXError(f"{frames}-frame clips do not come back as {frames} frames from this VAE (it decodes "
                             f"{vae.latent_frames(frames)} latent frames to {vae.pixel_frames(vae.latent_frames(frames))}"
                             "); train on 1, 9, 17, 25, ... frames (an odd number of latent frames).")
        self.vae, self.clips, self.settings = vae, clips, settings
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        vae.train().requires_grad_(True)
        if fresh:  # start with a near-deterministic posterior: unit noise on fresh latents drowns the signal
            with torch.no_grad():
                vae.encoder.conv_out.conv.bias[vae.config["latent_channels"]:] = settings.initial_logvar
        self.optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.learning_rate, betas=settings.betas,
                                           weight_decay=settings.weight_decay)
        self.discriminator = self.disc_optimizer = None
        if settings.gan_weight > 0:
            torch.manual_seed(settings.seed)
            self.discriminator = PatchDiscriminator3D()
            self.disc_optimizer = torch.optim.AdamW(self.discriminator.parameters(), lr=settings.learning_rate,
                                                    betas=(0.5, 0.9))
        self.step = 0
        self.history: list[dict] = []

    # -- schedule and batches --------------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        s = self.settings
        if step < s.warmup_steps:
            return s.learning_rate * (step + 1) / s.warmup_steps
        progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
        return s.learning_rate * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def batch(self, step: int) -> torch.Tensor:
        """The step's clips as model input (B, 3, T, h, w): random clips, each cropped during the crop phase."""
        s = self.settings
        g = generator(s.seed, "vae-batch", step)
        idx = torch.randint(0, len(self.clips), (s.batch_size,), generator=g)
        x = self.clips[idx]  # (B, T, H, W, 3)
        if s.crop and step < s.crop_steps:
            x = torch.stack([self._crop(clip, g) for clip in x])
        return to_model_input(x)

    def _crop(self, clip: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """A random crop of one clip (T, H, W, 3) on the 8-pixel grid of the latents."""
        c, (h, w) = self.settings.crop, clip.shape[1:3]
        top = int(torch.randint(0, (h - c) // 8 + 1, (), generator=g)) * 8
        left = int(torch.randint(0, (w - c) // 8 + 1, (), generator=g)) * 8
        return clip[:, top:top + c, left:left + c]

    def _autocast(self):
        return torch.autocast("cpu" if self.vae.device.type == "cpu" else self.vae.device.type, dtype=torch.bfloat16,
                              enabled=self.settings.mixed_precision == "bf16")

    # -- one step --------------------------------------------------------------------------------------------------
    def train_step(self) -> dict:
        s, step = self.settings, self.step
        start = time.perf_counter()
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x = self.batch(step).to(self.vae.device)
        with self._autocast():
            posterior = self.vae.encode_posterior(x)
            z = posterior.mean + posterior.std * torch.randn(
                posterior.mean.shape, generator=generator(s.seed, "vae-posterior", step)).to(posterior.mean)
            y = self.vae.decode(z)
        y = y.float()
        l1 = (y - x).abs().mean()
        mse = (y - x).pow(2).mean()
        kl = kl_to_unit_gaussian(posterior.mean.float(), posterior.logvar.float())
        loss = s.l1_weight * l1 + s.mse_weight * mse + s.kl_weight * kl
        gan = torch.zeros(())
        use_gan = self.discriminator is not None and step >= s.gan_start
        if use_gan:
            self.discriminator.requires_grad_(False)
            gan = -self.discriminator(y).mean()  # hinge generator loss
            loss = loss + s.gan_weight * gan
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.vae.parameters(), s.max_grad_norm or float("inf"))
        if torch.isfinite(loss) and torch.isfinite(grad_norm):
            self.optimizer.step()
        if use_gan:
            self.discriminator.requires_grad_(True)
            d_loss = F.relu(1 - self.discriminator(x)).mean() + F.relu(1 + self.discriminator(y.detach())).mean()
            self.disc_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            self.disc_optimizer.step()
        self.step += 1
        record = {"step": self.step, "loss": loss.item(), "l1": l1.item(), "mse": mse.item(), "kl": kl.item(),
                  "gan": gan.item(), "lr": lr, "grad_norm": float(grad_norm), "seconds": time.perf_counter() - start}
        self.history.append(record)
        if s.save_every and self.checkpoint_dir and self.step % s.save_every == 0:
            self.save_checkpoint()
        return record

    def run(self, until: int | None = None, on_step: Callable[[dict], None] | None = None) -> int:
        target = min(self.settings.steps, until if until is not None else self.settings.steps)
        while self.step < target:
            record = self.train_step()
            if on_step is not None:
                on_step(record)
        self.vae.eval().requires_grad_(False)
        return self.step

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        if self.checkpoint_dir is None:
            raise CogVXError("No checkpoint folder was given to the VAE trainer; pass checkpoint_dir.")
        tensors = {f"vae.{k}": v for k, v in self.vae.state_dict().items()}
        tensors.update(_optimizer_tensors("optim", self.optimizer))
        if self.discriminator is not None:
            tensors.update({f"disc.{k}": v for k, v in self.discriminator.state_dict().items()})
            tensors.update(_optimizer_tensors("disc_optim", self.disc_optimizer))
        state = {"step": self.step, "settings": asdict(self.settings), "history": self.history,
                 "optimizer_groups": self.optimizer.state_dict()["param_groups"],
                 "disc_groups": self.disc_optimizer.state_dict()["param_groups"] if self.disc_optimizer else None,
                 "steps_taken": {k: _step_counts(o) for k, o in (("optim", self.optimizer),
                                                                 ("disc_optim", self.disc_optimizer)) if o}}
        return write_checkpoint(self.checkpoint_dir, self.step, tensors, state, keep=2, prefix=CHECKPOINT_PREFIX)

    def resume(self) -> int | None:
        """Continues from the latest complete checkpoint in checkpoint_dir; returns its step, or None."""
        path = latest_checkpoint(self.checkpoint_dir, CHECKPOINT_PREFIX) if self.checkpoint_dir else None
        if path is None:
            return None
        state, tensors = read_checkpoint(path)
        mine = asdict(self.settings)
        changed = [k for k in mine if k not in ("steps", "save_every") and
                   json.loads(json.dumps(mine[k])) != state["settings"].get(k)]
        if changed:
            raise CogVXError(f"{path}: made with other VAE settings ({', '.join(changed)}); resume with the same "
                             "settings or start over in an empty folder.")
        self.vae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("vae.")})
        _load_optimizer(self.optimizer, "optim", tensors, state["optimizer_groups"], state["steps_taken"]["optim"])
        if self.discriminator is not None:
            self.discriminator.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("disc.")})
            _load_optimizer(self.disc_optimizer, "disc_optim", tensors, state["disc_groups"],
                            state["steps_taken"]["disc_optim"])
        self.step, self.history = int(state["step"]), list(state["history"])
        return self.step


def _optimizer_tensors(prefix: str, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, st in optimizer.state_dict()["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                out[f"{prefix}.{i}.{k}"] = v.reshape(-1) if v.ndim == 0 else v
    return out


def _step_counts(optimizer: torch.optim.Optimizer) -> dict:
    return {str(i): {k: v for k, v in st.items() if not torch.is_tensor(v)}
            for i, st in optimizer.state_dict()["state"].items()}


def _load_optimizer(optimizer, prefix: str, tensors: dict, groups: list, scalars: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            rest = key[len(prefix) + 1:]
            i, name = rest.split(".", 1)
            if not i.isdigit():
                continue
            state.setdefault(int(i), {})[name] = v.reshape(()) if name == "step" else v
    for i, extra in scalars.items():
        state.setdefault(int(i), {}).update(extra)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
