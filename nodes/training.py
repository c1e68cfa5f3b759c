"""LoRA training nodes:

    CogVXModelLoader ─COGVX_MODEL─┬───────────────────────────▶ CogVXTrainLora ─COGVX_LORA─▶ CogVXSaveLora
    CogVXVAELoader ──COGVX_VAE──┐ │                                  │        └─LOSS_MAP──▶ CogVXLossPlot ─IMAGE─▶
    CogVXT5Loader ───COGVX_T5───┴─┴▶ CogVXDataset ─COGVX_DATASET─────┘

CogVXDataset checks a folder of clips and captions and encodes what its cache lacks (cogvx_core/train/dataset.py).
CogVXTrainLora runs `steps_per_run` steps per queue run and keeps its trainer between runs (per node), so queueing
it again (or with auto-queue) continues the same run up to `total_steps`; Cancel stops after the current step and
the next run continues from there, and after a failed run the next one starts clean (the failed session's LoRA comes
off the model). The loss shows once, as the chart on the node (web/training.js): live per step, then redrawn from the
history after each run; its running mean is computed here, so the chart and the node's text give the same number.
The memory and time estimate is shown on the node too. Between runs the base model is left as it was (the LoRA at
strength 0), so other nodes sharing the model sample the base model. LOSS_MAP is ComfyUI's own type
({"loss": [...]}), so ComfyUI's loss graph node takes it too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import torch

from .core import (
    clear_checkpoints,
    CogVXError,
    ddp,
    DEFAULT_TARGETS,
    estimate,
    Lora,
    loss_chart,
    buckets_for,
    parse_resolutions,
    running_mean,
    prepare_dataset,
    remove_trainable_lora,
    save_lora,
    scan_folder,
    Trainer,
    TrainingDataset,
    TrainSettings,
)

from . import host

log = logging.getLogger("cogvx")

UI_POINTS = 2000  # loss points sent to the frontend at most


def _load(handle) -> None:
    """Puts a loaded model handle's module on its compute device (ComfyUI frees memory for it as needed)."""
    managed = getattr(handle, "managed", None)
    if managed is not None:
        managed.load()


def _variant_of(model):
    return getattr(model, "variant", None) or model.transformer.variant


# ---------------------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------------------
class CogVXDataset:
    """A folder of clips and captions -> a prepared, cached training set."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("COGVX_MODEL", {"tooltip": "The model to train: its variant sets the frame rules."}),
                "vae": ("COGVX_VAE",),
                "t5": ("COGVX_T5",),
                "folder": (host.list_models("training_data"), {"tooltip": "A dataset folder in "
                           "models/training_data: videos (mp4, webm, gif, mov), frame folders and images, each with "
                           "a caption file of the same name (clip.mp4 + clip.txt), or a metadata.jsonl (file_name, "
                           "text per line). Latents and text embeddings are cached in its .cogvx_cache."}),
                "frames": ("INT", {"default": 0, "min": 0, "max": 161, "tooltip": "The longest clip in frames "
                                   "(4k+1); 0 = the model's (49 for 1.0, 81 for 1.5, 9 for cogvx-tiny). Shorter "
                                   "clips train at the longest count they fill, images as 1 frame."}),
                "width": ("INT", {"default": 0, "min": 0, "max": 2048, "step": 16, "tooltip": "Training width; "
                                  "0 = the model's."}),
                "height": ("INT", {"default": 0, "min": 0, "max": 2048, "step": 16, "tooltip": "Training height; "
                                   "0 = the model's."}),
            },
            "optional": {
                "more_sizes": ("STRING", {"default": "", "tooltip": "Extra resolution buckets WIDTHxHEIGHT, comma "
                                          "separated (e.g. 480x720): each clip trains at the size nearest its "
                                          "aspect ratio."}),
                "fps": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 120.0, "tooltip": "Resample clips to this "
                                  "frame rate; 0 = the model's (8 for 1.0, 16 for 1.5)."}),
            },
        }

    RETURN_TYPES = ("COGVX_DATASET",)
    RETURN_NAMES = ("dataset",)
    FUNCTION = "prepare"
    CATEGORY = "CogVX/training"
    DESCRIPTION = ("Checks a training folder (every missing caption or unreadable clip is named), assigns each clip "
                   "its duration and size bucket, and encodes what the cache lacks with the VAE and T5.")

    @staticmethod
    def _folder(name: str) -> Path:
        if not str(name).strip():
            raise CogVXError("CogVXDataset: choose a dataset folder (put it in models/training_data first).")
        try:
            return host.model_path("training_data", name)  # never a path outside the registered folders
        except FileNotFoundError as e:
            raise CogVXError(f"CogVXDataset: {e} Put the clips in a sub-folder of models/training_data.")

    @classmethod
    def IS_CHANGED(cls, folder, **kwargs):
        # An edited, added or removed clip or caption must prepare again.
        try:
            root = cls._folder(folder)
            files = sorted(p for p in root.rglob("*") if p.is_file() and ".cogvx_cache" not in p.parts)
            return str([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]) + json.dumps(
                kwargs, sort_keys=True, default=str)
        except (OSError, CogVXError):
            return folder

    def prepare(self, model, vae, t5, folder, frames=0, width=0, height=0, more_sizes="", fps=0.0):
        folder = self._folder(folder)
        variant = _variant_of(model)
        _, default_height, default_width = model.transformer.default_size()
        height, width = height or default_height, width or default_width
        sizes = [(height, width)] + (parse_resolutions(more_sizes) if more_sizes.strip() else [])
        buckets = buckets_for(model.transformer, frames, height, width, sizes)
        scan_folder(folder)  # the folder's problems, before loading any model
        _load(vae)
        _load(t5)
        progress = host.Progress(1)

        def step(done: int, total: int) -> None:
            progress.total = max(total, 1)
            progress.update(done)

        with torch.inference_mode(False):
            dataset = prepare_dataset(folder, vae=vae.vae, text_encoder=t5.encoder, variant=variant, buckets=buckets,
                                      cache_dir=None, fps=fps or None, progress=step)
        summary = f"{dataset.summary()}\n{buckets.describe()}" + "".join(f"\nnote: {n}" for n in dataset.notes)
        return {"ui": {"text": [summary]}, "result": (dataset,)}


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Session:
    trainer: Trainer
    signature: str
    checkpoint_dir: str
    estimate: str = ""  # the memory and time estimate made when the session began


_SESSIONS: dict[str, _Session] = {}  # node id -> its trainer, kept between queue runs


def _remove_trainable(trainer: Trainer) -> None:
    """Takes the trainer's LoRA off the shared model for good (other LoRAs stay)."""
    trainer.deactivate()
    remove_trainable_lora(trainer.transformer)


def drop_session(node_id: str) -> None:
    session = _SESSIONS.pop(str(node_id), None)
    if session is not None:
        _remove_trainable(session.trainer)


class CogVXTrainLora:
    """Trains a LoRA a chunk of steps per queue run, continuing the same run each time."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("COGVX_MODEL",),
                "dataset": ("COGVX_DATASET",),
                "steps_per_run": ("INT", {"default": 50, "min": 1, "max": 100000, "tooltip": "Steps this queue run "
                                          "trains; queue again (or auto-queue) to continue."}),
                "total_steps": ("INT", {"default": 2000, "min": 1, "max": 1000000, "tooltip": "Length of the whole "
                                        "run (the cosine schedule and the end)."}),
                "rank": ("INT", {"default": 64, "min": 1, "max": 1024}),
                "alpha": ("FLOAT", {"default": 64.0, "min": 0.0, "max": 4096.0, "step": 1.0, "tooltip": "LoRA "
                                    "alpha; the LoRA scale is alpha / rank. 0 = the rank (scale 1)."}),
                "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1.0, "step": 1e-5, "round": 1e-7}),
                "seed": ("INT", {"default": 42, "min": 0, "max": 0xFFFFFFFF}),
            },
            "optional": {
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
                "lr_schedule": (["constant", "cosine"], {"default": "constant"}),
                "warmup_steps": ("INT", {"default": 0, "min": 0, "max": 100000}),
                "targets": ("STRING", {"default": ",".join(DEFAULT_TARGETS), "tooltip": "Layer-name endings to "
                                       "adapt (default: attention q, k, v, out)."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": True, "tooltip": "Far less memory for about a "
                                                       "third more time per step."}),
                "mixed_precision": (["bf16", "no"], {"default": "bf16"}),
                "timestep_sampling": (["explicit", "uniform"], {"default": "explicit", "tooltip": "explicit: the "
                                      "paper's Explicit Uniform Sampling (steadier loss); uniform: the reference "
                                      "trainers' plain draw."}),
                "frame_pack": ("BOOLEAN", {"default": True, "tooltip": "Mixed durations in one batch (padded and "
                                           "masked), as the paper's Frame Pack."}),
                "validation_every": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": "Fixed-noise "
                                             "validation loss every N steps (0: off)."}),
                "checkpoint_dir": ("STRING", {"default": "", "tooltip": "A name: resumable checkpoints go to "
                                              "models/training_checkpoints/<name>; a new session resumes from the "
                                              "latest one there (e.g. after a restart). Empty: no checkpoints."}),
                "save_every": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": "Checkpoint every N steps "
                                       "(0: at the end of each run only, when checkpoint_dir is set)."}),
                "restart": ("BOOLEAN", {"default": False, "tooltip": "Start over at step 0 (a new LoRA)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("COGVX_LORA", "LOSS_MAP", "INT")
    RETURN_NAMES = ("lora", "loss", "steps")
    FUNCTION = "train"
    CATEGORY = "CogVX/training"
    DESCRIPTION = ("Trains a LoRA on a prepared dataset with the CogVideoX objective (v-prediction, zero SNR), "
                   "steps_per_run steps per queue run, continuing where the last run stopped.")

    @classmethod
    def IS_CHANGED(cls, **_):
        return float("nan")  # never cached: each queue run trains on

    def train(self, model, dataset: TrainingDataset, steps_per_run, total_steps, rank, alpha, learning_rate, seed,
              batch_size=1, lr_schedule="constant", warmup_steps=0, targets=",".join(DEFAULT_TARGETS),
              gradient_checkpointing=True, mixed_precision="bf16", timestep_sampling="explicit", frame_pack=True,
              validation_every=0, checkpoint_dir="", save_every=0, restart=False, unique_id=None):
        node = str(unique_id or "default")
        device = host.torch_device()
        settings = TrainSettings(
            steps=total_steps, rank=rank, alpha=alpha or None, learning_rate=learning_rate, seed=seed,
            batch_size=batch_size, lr_schedule=lr_schedule, warmup_steps=warmup_steps,
            targets=tuple(t.strip() for t in targets.split(",") if t.strip()),
            gradient_checkpointing=gradient_checkpointing,
            mixed_precision=mixed_precision if device.type == "cuda" else "no",
            timestep_sampling=timestep_sampling, frame_pack=frame_pack, val_every=validation_every,
            save_every=save_every if checkpoint_dir.strip() else 0)
        settings.check()
        # ComfyUI runs nodes under torch.inference_mode: the LoRA, the optimizer state and every step must not be
        # inference tensors, so the whole session lives outside it
        folder = ""
        if checkpoint_dir.strip():
            try:
                folder = str(host.writable_folder("training_checkpoints", checkpoint_dir.strip()))
            except ValueError as e:
                raise CogVXError(f"CogVXTrainLora: checkpoint_dir {e}")
        with torch.inference_mode(False), torch.enable_grad():
            return self._train(node, model, dataset, settings, steps_per_run, total_steps, folder, restart, device)

    def _train(self, node, model, dataset, settings, steps_per_run, total_steps, checkpoint_dir, restart, device):
        session = self._session(node, model, dataset, settings, checkpoint_dir, restart, device)
        trainer = session.trainer
        trainer.settings.val_every, trainer.settings.save_every = settings.val_every, settings.save_every
        _load(model)
        start = trainer.step
        target = min(total_steps, start + steps_per_run)
        progress = host.Progress(max(target - start, 1))

        def on_step(report) -> None:
            mean = _last_mean(trainer.losses)
            host.send("cogvx.train.progress", {"node": node, "step": report.step, "total": total_steps,
                                               "loss": None if report.skipped else report.loss, "mean": mean})
            progress.update(report.step - start)  # no preview image: the node's chart is the one loss display
            host.throw_if_interrupted()

        try:
            trainer.activate()
            trainer.run(until=target, on_step=on_step)
        finally:
            trainer.deactivate()
            if session.checkpoint_dir and trainer.step > start:
                trainer.save_checkpoint()  # also on Cancel: the next run (or a restart) continues from here
        return self._outputs(trainer, total_steps, session.estimate)

    @staticmethod
    def _session(node, model, dataset, settings, checkpoint_dir, restart, device) -> _Session:
        signature = json.dumps({"model": id(model.transformer), "data": dataset.fingerprint,
                                "settings": settings.trajectory(), "steps": settings.steps}, sort_keys=True)
        session = _SESSIONS.get(node)
        if session is not None and (restart or session.signature != signature
                                    or session.checkpoint_dir != checkpoint_dir):
            drop_session(node)
            session = None
        if session is None:
            for other, held in list(_SESSIONS.items()):  # one trainer per model: another node's session ends
                if held.trainer.transformer is model.transformer:
                    log.warning("CogVXTrainLora: node %s now trains this model; the session of node %s ends", node,
                                other)
                    drop_session(other)
            _load(model)
            remove_trainable_lora(model.transformer)  # a LoRA a crashed session may have left (none normally)
            trainer = Trainer(model.transformer, dataset, settings, schedule=getattr(model, "schedule", None),
                              scaling_factor=getattr(model, "scaling_factor", None),
                              dist=ddp.DistInfo(device=device), checkpoint_dir=checkpoint_dir or None)
            try:
                if checkpoint_dir and restart:
                    removed = clear_checkpoints(checkpoint_dir)
                    if removed:
                        log.warning("CogVXTrainLora: restart: removed %d old checkpoint(s) from %s", removed,
                                    checkpoint_dir)
                elif checkpoint_dir:
                    resumed = trainer.resume()
                    if resumed is not None:
                        log.warning("CogVXTrainLora: resumed from step %d in %s", resumed, checkpoint_dir)
                described = estimate(trainer).describe()
            except BaseException:  # the next queue run must start clean, not find this LoRA on the model
                _remove_trainable(trainer)
                raise
            host.say(described, node)
            trainer.deactivate()
            session = _SESSIONS[node] = _Session(trainer, signature, checkpoint_dir, described)
        return session

    @staticmethod
    def _outputs(trainer: Trainer, total_steps: int, described: str = ""):
        history = [[h["step"], h["loss"] if h["loss"] == h["loss"] else None] for h in trainer.history]
        if len(history) > UI_POINTS:  # keep the frontend message small: every k-th point and the last
            k = -(-len(history) // UI_POINTS)
            history = history[::k] + ([history[-1]] if (len(history) - 1) % k else [])
        validations = [[v["step"], v["loss"]] for v in trainer.validations]
        losses = trainer.losses
        mean = _last_mean(losses)
        text = (f"step {trainer.step}/{total_steps}" + (f", loss {mean:.4f} (running mean)" if mean is not None
                                                        else "")
                + (f", validation {validations[-1][1]:.4f}" if validations else "")
                + (" (done)" if trainer.done else ""))
        loss_map = {"loss": losses, "steps": [h["step"] for h in trainer.history],
                    "validation": trainer.validations}
        ui = {"cogvx_loss": history, "cogvx_validation": validations, "cogvx_total": [total_steps],
              "cogvx_mean": [mean], "text": [text] + ([described] if described else [])}
        return {"ui": ui, "result": (trainer.lora(), loss_map, trainer.step)}


def _last_mean(losses: list[float]) -> float | None:
    """The loss's running mean at the latest step (what the node's chart and text show), None before any step."""
    mean = running_mean(losses)[-1] if losses else float("nan")
    return mean if mean == mean else None


# ---------------------------------------------------------------------------------------------------------------
# Saving and plotting
# ---------------------------------------------------------------------------------------------------------------
class CogVXSaveLora:
    """Writes a LoRA into the loras model folder (diffusers/peft layout, loadable by diffusers and the LoRA nodes)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora": ("COGVX_LORA",),
                "filename_prefix": ("STRING", {"default": "cogvx/lora", "tooltip": "Name under the loras folder; "
                                               "the step count and a counter are appended."}),
            },
        }

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "CogVX/training"
    DESCRIPTION = "Saves the trained LoRA (.safetensors with rank, alpha, targets, base variant and training settings)."

    def save(self, lora: Lora, filename_prefix):
        prefix = filename_prefix.strip().replace("\\", "/").strip("/") or "cogvx/lora"
        if ".." in prefix.split("/"):
            raise CogVXError(f"filename_prefix {filename_prefix!r}: stay inside the loras folder (no '..').")
        folder = host.save_folder("loras")
        steps = lora.metadata.get("cogvx.steps", "0")
        stem = Path(prefix).name
        target_dir = (folder / prefix).parent
        target_dir.mkdir(parents=True, exist_ok=True)
        pattern = re.compile(re.escape(f"{stem}_{steps}steps_") + r"(\d+)\.safetensors$")
        taken = [int(m.group(1)) for p in target_dir.iterdir() if (m := pattern.match(p.name))]
        path = target_dir / f"{stem}_{steps}steps_{max(taken, default=0) + 1:05d}.safetensors"
        save_lora(path, lora)  # keeps the LoRA's training metadata
        shown = os.path.relpath(path, folder)
        return {"ui": {"text": [f"saved loras/{shown}"]}}


class CogVXLossPlot:
    """The loss history as an image: raw loss, running mean and validation loss."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "loss": ("LOSS_MAP",),
                "smoothing": ("FLOAT", {"default": 0.9, "min": 0.0, "max": 0.999, "step": 0.01, "tooltip": "Running "
                                        "mean weight of the past (0: no smoothing)."}),
                "width": ("INT", {"default": 768, "min": 256, "max": 4096, "step": 16}),
                "height": ("INT", {"default": 384, "min": 128, "max": 4096, "step": 16}),
            },
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "plot"
    CATEGORY = "CogVX/training"
    DESCRIPTION = "Draws the training loss (and the fixed-noise validation loss) as an image."

    def plot(self, loss, smoothing, width, height):
        losses = [float("nan") if v is None else float(v) for v in loss.get("loss", [])]
        steps = loss.get("steps") or [1]
        image = loss_chart(losses, loss.get("validation"), width=width, height=height, smoothing=smoothing,
                           first_step=int(steps[0]))
        array = np.asarray(image, dtype=np.float32) / 255.0
        return (torch.from_numpy(array)[None],)  # (1, H, W, 3)
