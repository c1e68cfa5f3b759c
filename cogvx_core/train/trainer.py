"""The training loop: LoRA (or full) fine-tuning of a CogVideoX transformer on a prepared dataset.

    trainer = Trainer(transformer, dataset, TrainSettings(steps=2000, rank=64), checkpoint_dir="ckpt")
    trainer.resume()                      # continues from the latest checkpoint, if there is one
    trainer.run(on_step=print)            # or run(until=trainer.step + 50) for a chunk of steps
    trainer.save("style.safetensors")     # diffusers/peft layout with rank, alpha, targets and variant

One step, on each data-parallel rank:
    batch       BatchPlan(step, rank): clips of one size, durations mixed by Frame Pack (buckets.py)
    x0          a draw from each clip's cached VAE posterior, times the scaling factor (1.5: a front-padded
                first frame for an even latent length, as THUDM's trainer does)
    t, noise    Explicit Uniform Sampling (timesteps.py) and Gaussian noise, both pure functions of (seed, step, rank)
    loss        objective.v_prediction_loss on transformer(add_noise(x0, noise, t), t, text), padded frames masked
    update      gradients averaged over ranks (DDP), clipped, AdamW; skipped when the loss or the gradient norm is
                not finite, and after `nan_patience` such steps in a row the trainable weights and optimizer state
                roll back to the last good snapshot and the learning rate is halved

Exact resume: save_checkpoint / resume write and read the whole training state as atomic folders (checkpoint.py);
a run killed at any moment resumes from the latest complete one and ends with bitwise the same weights as a run
never interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ..checkpoints.lora import Lora, lora_from_state_dict
from ..errors import CogVXError
from ..lora import DEFAULT_TARGETS, add_trainable_lora, lora_state_dict, save_lora
from ..safe_write import FolderLock, atomic_path, writing
from ..schedule import NoiseSchedule
from ..transformer import CogVideoXTransformer
from . import ddp, fsdp
from .buckets import BatchPlan, attention_key_mask, pack
from .cache import module_fingerprint
from .checkpoint import latest_checkpoint, restore_training_state, training_state, write_checkpoint
from .dataset import CogVXDataset
from .objective import v_prediction_loss
from .rng import generator
from .timesteps import MODES, TimestepSampler

log = logging.getLogger(__name__)

LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("bf16", "no")


@dataclass
class TrainSettings:
    steps: int = 1000
    rank: int = 64
    alpha: float | None = None  # None: alpha = rank (scale 1)
    targets: tuple[str, ...] = DEFAULT_TARGETS
    full_finetune: bool = False
    learning_rate: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    lr_schedule: str = "constant"  # "constant" or "cosine", both after a linear warmup
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0: no clipping
    batch_size: int = 1
    seed: int = 0
    gradient_checkpointing: bool = True
    mixed_precision: str = "bf16"  # "bf16" autocast, or "no" (compute in the model's dtype)
    timestep_sampling: str = "explicit"  # Explicit Uniform Sampling, or "uniform" as the reference trainers
    latent_sampling: str = "sample"  # a new draw from the VAE posterior every step, or its "mean"
    frame_pack: bool = True  # mixed durations in one batch
    # not part of the trajectory: may change between a run and its resume
    save_every: int = 0
    keep_checkpoints: int = 2
    val_every: int = 0
    val_timesteps: tuple[int, ...] = (100, 300, 500, 700, 900)
    val_items: int = 4
    nan_patience: int = 3
    snapshot_every: int = 50

    FREE = ("steps", "save_every", "keep_checkpoints", "val_every", "val_timesteps", "val_items", "nan_patience",
            "snapshot_every")

    def trajectory(self) -> dict:
        """The settings a resumed run must share with the run it continues."""
        d = dataclasses.asdict(self)
        for k in self.FREE:
            d.pop(k)
        d["targets"], d["betas"] = list(d["targets"]), list(d["betas"])
        return d

    def check(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise CogVXError(msg)

        need(self.steps >= 1, f"steps must be at least 1, got {self.steps}.")
        need(self.rank >= 1 or self.full_finetune, f"LoRA rank must be at least 1, got {self.rank}.")
        need(self.alpha is None or (math.isfinite(self.alpha) and self.alpha > 0),
             f"LoRA alpha must be a positive number, got {self.alpha}.")
        need(self.learning_rate > 0 and math.isfinite(self.learning_rate),
             f"learning rate must be a positive number, got {self.learning_rate}.")
        need(self.lr_schedule in LR_SCHEDULES, f"lr schedule {self.lr_schedule!r}: use one of {', '.join(LR_SCHEDULES)}.")
        need(self.warmup_steps >= 0, f"warmup steps must be 0 or more, got {self.warmup_steps}.")
        need(self.max_grad_norm >= 0, f"max grad norm must be 0 (off) or more, got {self.max_grad_norm}.")
        need(self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}.")
        need(self.mixed_precision in PRECISIONS, f"mixed precision {self.mixed_precision!r}: use 'bf16' or 'no'.")
        need(self.timestep_sampling in MODES, f"timestep sampling {self.timestep_sampling!r}: use 'explicit' or "
             "'uniform'.")
        need(self.latent_sampling in ("sample", "mean"), f"latent sampling {self.latent_sampling!r}: use 'sample' "
             "or 'mean'.")
        need(all(0 <= t < 1000 for t in self.val_timesteps), "validation timesteps must lie in [0, 1000).")
        need(self.save_every >= 0 and self.val_every >= 0, "save_every and val_every must be 0 (off) or more.")
        need(self.keep_checkpoints >= 1, f"keep at least one checkpoint, got {self.keep_checkpoints}.")


@dataclass
class StepReport:
    step: int  # steps done after this one
    loss: float  # mean over the batch and the ranks (nan for a skipped step)
    lr: float
    grad_norm: float
    seconds: float
    timesteps: list[int]
    skipped: bool = False
    rolled_back: bool = False
    validation: dict | None = None


class _KeyMaskedAttention:
    """Wraps a block's attention kernel: unchanged without a mask, SDPA with a key mask for Frame Pack batches.
    One instance is shared by all blocks; the mask is set for a step's forward and backward (checkpointing
    recomputes the forward during backward)."""

    def __init__(self, inner):
        self.inner = inner
        self.mask: torch.Tensor | None = None

    def __call__(self, q, k, v):
        if self.mask is None:
            return self.inner(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


def _as_normal_tensors(module: torch.nn.Module) -> None:
    """Hosts (ComfyUI) load models under torch.inference_mode; such tensors cannot be saved for backward. Replace
    them by normal ones (same values), one tensor at a time."""
    with torch.inference_mode(False), torch.no_grad():
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and p.is_inference():
                    m._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=p.requires_grad)
            for name, b in list(m._buffers.items()):
                if b is not None and b.is_inference():
                    m._buffers[name] = b.clone()


class Trainer:
    def __init__(self, transformer: CogVideoXTransformer, dataset: CogVXDataset, settings: TrainSettings, *,
                 schedule: NoiseSchedule | None = None, scaling_factor: float | None = None,
                 dist: ddp.DistInfo | None = None, checkpoint_dir: str | os.PathLike | None = None,
                 val_dataset: CogVXDataset | None = None, shard: str = "none"):
        """shard: "none" (DDP when there are several processes) or "fsdp" (parameters, gradients and optimizer
        state sharded over the processes, fsdp.py)."""
        settings.check()
        if shard not in fsdp.SHARDING:
            raise CogVXError(f"Unknown sharding {shard!r}; use one of {', '.join(fsdp.SHARDING)}.")
        variant = transformer.variant
        if variant.i2v:
            raise CogVXError(f"{transformer.name} is an image-to-video model; CogVX trains text-to-video models only "
                             "so far. Train the matching text-to-video model (5b or 1.5-5b).")
        if dataset.variant != variant.name:
            raise CogVXError(f"The dataset was prepared for CogVideoX {dataset.variant} but the model is "
                             f"{transformer.name} ({variant.title}); prepare it again with this model (its frame rules "
                             "differ).")
        self.settings = settings
        self.dataset, self.val_dataset = dataset, val_dataset or dataset
        self.schedule = schedule or NoiseSchedule.for_variant(variant)
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else variant.scaling_factor)
        self.dist = dist or ddp.DistInfo(device=transformer.device)
        self.device = self.dist.device
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        # One run per checkpoint folder (the main rank holds it for all): two would delete each other's checkpoints.
        self._folder_lock = (FolderLock(self.checkpoint_dir, "training run", "use another --checkpoint-dir")
                             if self.checkpoint_dir and self.dist.is_main else None)

        # the checks that can refuse the run come before the model is changed (a LoRA added)
        self.sampler = TimestepSampler(self.schedule.num_train_timesteps, settings.timestep_sampling,
                                       world_size=self.dist.world_size, batch_size=settings.batch_size,
                                       seed=settings.seed)
        self.plan = BatchPlan([dataset.group(i, settings.frame_pack) for i in range(len(dataset))],
                              settings.batch_size, world_size=self.dist.world_size, seed=settings.seed)
        _as_normal_tensors(transformer)
        self.base_fingerprint = module_fingerprint(transformer)
        self.transformer = transformer.to(self.device)
        if settings.full_finetune:
            transformer.float().requires_grad_(True)
            self.params = [p for p in transformer.parameters()]
        else:
            transformer.requires_grad_(False)  # only the LoRA learns (and only its gradients are kept)
            self.params = add_trainable_lora(transformer, settings.rank, settings.alpha, settings.targets,
                                             init="peft", dtype=torch.float32,
                                             generator=generator(settings.seed, "lora-init"))
        ids = {id(p) for p in self.params}
        self.param_names = [n for n, p in transformer.named_parameters() if id(p) in ids]
        self._attention = _KeyMaskedAttention(transformer.transformer_blocks[0].attn1.attention_fn)
        self._active = False
        self.activate()
        self.shard = shard
        if shard == "fsdp":
            self.model = fsdp.shard(transformer)
            named = dict(transformer.named_parameters())  # fully_shard put sharded parameters in their place
            self.params = [named[n] for n in self.param_names]
        else:
            self.model = ddp.wrap(transformer, self.dist)
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.learning_rate, betas=tuple(settings.betas),
                                           eps=settings.adam_eps, weight_decay=settings.weight_decay)
        self.alphas_cumprod = self.schedule.alphas_cumprod.to(self.device)
        self.step = 0
        self.history: list[dict] = []  # one entry per step: step, loss, lr, grad_norm, timesteps, skipped
        self.validations: list[dict] = []
        self.lr_scale = 1.0
        self.bad_streak = 0
        self._snapshot = self._take_snapshot()

    # -- sessions (a ComfyUI node runs a few steps per queue run and shares the model in between) ---------------
    def activate(self) -> None:
        """Puts the trainable LoRA, Frame Pack masking and gradient checkpointing on the model."""
        if self._active:
            return
        t = self.transformer
        self._saved_checkpointing = t.gradient_checkpointing
        t.gradient_checkpointing = self.settings.gradient_checkpointing
        self._attention.inner = t.transformer_blocks[0].attn1.attention_fn
        for block in t.transformer_blocks:
            block.attn1.attention_fn = self._attention
        self._set_lora_strength(1.0)
        self._active = True

    def deactivate(self) -> None:
        """Leaves the model as it was (the LoRA at strength 0), keeping all training state for `activate`."""
        if not self._active:
            return
        t = self.transformer
        t.gradient_checkpointing = self._saved_checkpointing
        for block in t.transformer_blocks:
            block.attn1.attention_fn = self._attention.inner
        self._set_lora_strength(0.0)
        self._active = False

    def _set_lora_strength(self, strength: float) -> None:
        for m in self.transformer.modules():
            for a in getattr(m, "lora_adapters", ()):
                if getattr(a, "trainable", False):
                    a.strength = strength

    # -- the learning rate -----------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        s = self.settings
        if step < s.warmup_steps:
            factor = step / max(1, s.warmup_steps)  # as diffusers' schedulers: 0 at step 0
        elif s.lr_schedule == "cosine":
            progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
            factor = max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        else:
            factor = 1.0
        return s.learning_rate * factor * self.lr_scale

    # -- one batch ----------------------------------------------------------------------------------------------
    @property
    def model_dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def _clip_latents(self, i: int, g: torch.Generator | None, dataset: CogVXDataset) -> torch.Tensor:
        """Model-scale latents (C, t, h, w) of entry i: a posterior draw with `g`, or its mean without."""
        mean, logvar = dataset.posterior(i)
        mean = mean.float()
        if g is not None:
            std = torch.exp(0.5 * logvar.float().clamp(-30.0, 20.0))
            x = mean + std * torch.randn(mean.shape, generator=g, dtype=torch.float32)
        else:
            x = mean
        x = x * self.scaling_factor
        pt = self.transformer.patch_size_t
        if x.shape[1] % pt:  # 1.5: repeat the first latent frame at the front for an even length (as THUDM)
            x = torch.cat([x[:, :1].repeat(1, pt - x.shape[1] % pt, 1, 1), x], dim=1)
        return x

    def batch(self, step: int):
        """This rank's inputs of a step: (items, latents (B, C, T, H, W), frame mask, context, noise, timesteps);
        a pure function of (seed, step, rank)."""
        s, rank = self.settings, self.dist.rank
        items = self.plan.batch(step, rank)
        g = generator(s.seed, "latents", step, rank) if s.latent_sampling == "sample" else None
        latents, frame_mask = pack([self._clip_latents(i, g, self.dataset) for i in items])
        context = torch.stack([self.dataset.context(i) for i in items])
        noise = torch.randn(latents.shape, generator=generator(s.seed, "noise", step, rank), dtype=torch.float32)
        timesteps = self.sampler(step, rank)
        return items, latents, frame_mask, context, noise, timesteps

    def _key_mask(self, frame_mask: torch.Tensor | None, latents: torch.Tensor, text_len: int):
        if frame_mask is None:
            return None
        p = self.transformer.patch_size
        tokens_per_frame = (latents.shape[3] // p) * (latents.shape[4] // p)
        return attention_key_mask(frame_mask, text_len, tokens_per_frame, self.transformer.patch_size_t).to(self.device)

    def autocast(self):
        """The settings' mixed precision around a forward pass."""
        enabled = self.settings.mixed_precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def compute_loss(self, latents, noise, timesteps, context, frame_mask=None, model=None) -> torch.Tensor:
        """Per-sample losses (B,) of one batch: the objective the reference trainers compute (objective.py)."""
        model = model or self.model
        dtype, dev = self.model_dtype, self.device
        x0 = latents.to(dev, dtype)
        noisy = self.schedule.add_noise(x0, noise.to(dev, dtype), timesteps.to(dev))
        self._attention.mask = self._key_mask(frame_mask, latents, context.shape[1])
        with self.autocast():
            out = model(noisy, timesteps.to(dev), context.to(dev, dtype))
        return v_prediction_loss(out, noisy, x0, timesteps.to(dev), self.alphas_cumprod, frame_mask)

    # -- a step ---------------------------------------------------------------------------------------------------
    def train_step(self) -> StepReport:
        if not self._active:
            self.activate()
        start = time.perf_counter()
        step, s = self.step, self.settings
        _, latents, frame_mask, context, noise, timesteps = self.batch(step)
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.transformer.train()
        try:
            loss = self.compute_loss(latents, noise, timesteps, context, frame_mask).mean()
            loss.backward()
        finally:
            self._attention.mask = None
        max_norm = s.max_grad_norm if s.max_grad_norm > 0 else float("inf")
        grad_norm = fsdp.full(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        mean_loss = float(ddp.all_mean(loss.detach().float(), self.dist))
        finite = ddp.all_true(bool(math.isfinite(mean_loss) and torch.isfinite(grad_norm)), self.dist)
        rolled_back = False
        if finite:
            self.optimizer.step()
            self.bad_streak = 0
        else:
            self.bad_streak += 1
            weights_bad = not ddp.all_true(all(bool(torch.isfinite(fsdp.local(p)).all()) for p in self.params),
                                           self.dist)
            log.warning("step %d: loss %s / grad norm %s is not finite; the step is skipped", step + 1, mean_loss,
                        float(grad_norm))
            if weights_bad or self.bad_streak >= s.nan_patience:
                self._restore_snapshot(self._snapshot)
                self.lr_scale *= 0.5
                self.bad_streak = 0
                rolled_back = True
                log.warning("rolled back to the last good state (step %d); learning rate halved to %g",
                            self._snapshot["step"], self.lr_at(step + 1))
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if finite and s.snapshot_every and self.step % s.snapshot_every == 0:
            self._snapshot = self._take_snapshot()
        report = StepReport(self.step, mean_loss if finite else float("nan"), lr, float(grad_norm),
                            time.perf_counter() - start, timesteps.tolist(), skipped=not finite,
                            rolled_back=rolled_back)
        self.history.append({"step": self.step, "loss": report.loss, "lr": lr, "grad_norm": report.grad_norm,
                             "timesteps": report.timesteps, "skipped": report.skipped})
        if s.val_every and self.step % s.val_every == 0:
            report.validation = self.validate()
        if s.save_every and self.checkpoint_dir and self.step % s.save_every == 0:
            self.save_checkpoint()
        return report

    def run(self, until: int | None = None, on_step: Callable[[StepReport], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> int:
        """Trains until step `until` (default: settings.steps) or until should_stop(); returns the step reached.
        on_step runs after each whole step, so an exception raised there (a host's interrupt) leaves a
        consistent state that `run` can continue."""
        target = min(self.settings.steps, until if until is not None else self.settings.steps)
        while self.step < target:
            if should_stop is not None and should_stop():
                break
            report = self.train_step()
            if on_step is not None:
                on_step(report)
        return self.step

    @property
    def done(self) -> bool:
        return self.step >= self.settings.steps

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.history]

    # -- validation ----------------------------------------------------------------------------------------------
    def validation_indices(self) -> list[int]:
        n, k = len(self.val_dataset), min(self.settings.val_items, len(self.val_dataset))
        return sorted({round(j * (n - 1) / max(k - 1, 1)) for j in range(k)}) if k else []

    @torch.no_grad()
    def validate(self) -> dict:
        """The loss at fixed timesteps with fixed noise on fixed clips (the posterior mean): comparable across steps,
        unlike the training loss. Each rank scores its share of the clips."""
        was_active = self._active
        self.activate()
        ts = torch.tensor(self.settings.val_timesteps, dtype=torch.long)
        sums = torch.zeros(len(ts), dtype=torch.float64)
        count = 0
        base = ddp.unwrap(self.model)
        for n, i in enumerate(self.validation_indices()):
            if n % self.dist.world_size != self.dist.rank and self.shard != "fsdp":
                continue  # sharded: every rank runs every forward (each gathers the weights with the others)
            x = self._clip_latents(i, None, self.val_dataset)[None].expand(len(ts), -1, -1, -1, -1)
            noise = torch.randn(x.shape[1:], generator=generator(self.settings.seed, "val-noise", i))
            context = self.val_dataset.context(i)[None].expand(len(ts), -1, -1)
            sums += self.compute_loss(x, noise[None].expand_as(x), ts, context, model=base).double().cpu()
            count += 1
        totals = torch.cat([sums, torch.tensor([float(count)], dtype=torch.float64)]).to(self.device)
        totals = ddp.all_mean(totals, self.dist) * self.dist.world_size
        per_t = (totals[:-1] / totals[-1].clamp(min=1)).cpu()
        result = {"step": self.step, "loss": float(per_t.mean()),
                  "per_timestep": {int(t): float(v) for t, v in zip(ts, per_t)}}
        self.validations.append(result)
        if not was_active:
            self.deactivate()
        return result

    # -- rollback snapshots (in memory) ---------------------------------------------------------------------------
    def _take_snapshot(self) -> dict:
        return {"step": self.step, "params": [p.detach().to("cpu", copy=True) for p in self.params],
                "optimizer": _clone_state(self.optimizer.state_dict())}

    def _restore_snapshot(self, snap: dict) -> None:
        with torch.no_grad():
            for p, saved in zip(self.params, snap["params"]):
                p.copy_(saved)
        self.optimizer.load_state_dict(_clone_state(snap["optimizer"]))

    # -- checkpoints (checkpoint.py) ----------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Writes the full training state to <checkpoint_dir>/step-NNNNNNNN (atomically); the main rank writes."""
        if self.checkpoint_dir is None:
            raise CogVXError("No checkpoint folder was given; pass checkpoint_dir (--checkpoint-dir).")
        if self.shard == "fsdp":
            return fsdp.save_checkpoint(self, self.checkpoint_dir, training_state(self)[0],
                                        self.settings.keep_checkpoints)
        path = None
        if self.dist.is_main:
            state, tensors = training_state(self)
            with writing(self.checkpoint_dir):  # a full disk: the previous checkpoints stay, and the error says so
                path = write_checkpoint(self.checkpoint_dir, self.step, tensors, state,
                                        keep=self.settings.keep_checkpoints)
        ddp.barrier(self.dist)
        return path

    def resume(self, path: str | os.PathLike | None = None) -> int | None:
        """Loads a checkpoint (default: the latest complete one in checkpoint_dir); returns its step, or None when
        there is none. Refuses a checkpoint of other settings, data, base model or number of processes."""
        if path is None:
            if self.checkpoint_dir is None:
                return None
            path = latest_checkpoint(self.checkpoint_dir)
            if path is None:
                return None
        path = Path(path)
        if self.shard == "fsdp":  # the sharded checkpoint, with everything else the checkpoint holds
            fsdp.load_checkpoint(self, path)
            self._snapshot = self._take_snapshot()
            return self.step
        if fsdp.is_sharded_checkpoint(path):
            raise CogVXError(f"{path}: this checkpoint is sharded (saved with --shard fsdp); resume with --shard fsdp "
                             f"and {self.dist.world_size} processes as it was made.")
        restore_training_state(self, path)
        self._snapshot = self._take_snapshot()
        return self.step

    # -- outputs ------------------------------------------------------------------------------------------------
    def metadata(self) -> dict:
        s, d = self.settings, self.dataset
        sizes = sorted({(e.width, e.height, e.frames) for e in d.entries})
        return {"cogvx.steps": str(self.step), "cogvx.trainer": json.dumps(s.trajectory(), sort_keys=True),
                "cogvx.train_sizes": ",".join(f"{w}x{h}x{f}" for w, h, f in sizes),
                "cogvx.train_fps": str(d.fps or ""), "cogvx.train_clips": str(len(d))}

    def lora(self) -> Lora:
        """The trained LoRA as it is now (copied: training on does not change it)."""
        if self.settings.full_finetune:
            raise CogVXError("This run fine-tunes every weight; there is no LoRA. Save the weights with save().")
        state = {k: v.detach().to("cpu", copy=True) for k, v in lora_state_dict(self.transformer).items()}
        alpha = self.settings.alpha if self.settings.alpha is not None else self.settings.rank
        meta = {"cogvx.alpha": str(alpha), "cogvx.rank": str(self.settings.rank),
                "cogvx.base_variant": self.transformer.variant.name, **self.metadata()}
        lora = lora_from_state_dict(state, meta)
        return lora

    def save(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path | None:
        """The LoRA (diffusers/peft layout, metadata with rank, alpha, targets and base variant) or, for full
        fine-tuning, the whole transformer as diffusers-named .safetensors. The main rank writes."""
        if self.shard == "fsdp" and self.settings.full_finetune:
            return self._save(path, dtype, fsdp.full_state_dict(self.model))  # every rank gathers, rank 0 keeps
        if self.shard == "fsdp":
            with fsdp.gathered(self.model):  # every rank gathers; the main rank writes the full LoRA
                return self._save(path, dtype)
        return self._save(path, dtype)

    def _save(self, path, dtype, state: dict | None = None) -> Path | None:
        out = None
        if self.dist.is_main:
            if self.settings.full_finetune:
                out = _save_full(path, self.transformer, {**self.metadata(),
                                                          "cogvx.base_variant": self.transformer.variant.name}, dtype,
                                 state_dict=state)
            else:
                alpha = self.settings.alpha if self.settings.alpha is not None else None
                out = save_lora(path, self.transformer, rank=self.settings.rank, alpha=alpha,
                                targets=self.settings.targets, variant=self.transformer.variant.name,
                                extra_metadata=self.metadata(), dtype=dtype)
        ddp.barrier(self.dist)
        return out


def _clone_state(sd: dict) -> dict:
    """A deep copy of an optimizer state dict with its tensors on the CPU (load_state_dict moves them back)."""
    def clone(v):
        if torch.is_tensor(v):
            return v.detach().to("cpu", copy=True)
        if isinstance(v, dict):
            return {k: clone(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clone(x) for x in v]
        return v

    return clone(sd)


def _save_full(path, transformer, metadata: dict, dtype, state_dict: dict | None = None) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise CogVXError(f"{path}: weights are saved as .safetensors; use a name ending in .safetensors.")
    state_dict = state_dict if state_dict is not None else transformer.state_dict()
    state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in state_dict.items()
             if ".lora_adapters." not in k}
    meta = {"format": "pt", "config": json.dumps({k: v for k, v in transformer.config.items()}), **metadata}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path
