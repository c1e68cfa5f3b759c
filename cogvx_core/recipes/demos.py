"""Two measured demonstrations on the built-in tiny model, each a seeded sub-command of `cogvx recipe`:

lora-demo  A LoRA trained by the project's trainer (train/trainer.py, LoRA mode) teaches the base model a shape colour
           it never drew: by default "purple", a word in the tokenizer that no base clip has; "black" and "gray"
           (words the base only ever read as backgrounds) can be asked for too. The transformer never saw any of
           them as a shape; the VAE did (recipes/tiny.py, vae_unseen_colour_clips), so it can decode what the LoRA
           teaches. The LoRA learns from clips of some caption combinations of that colour
           (mixed 1:1 with ordinary clips, so other colours keep their meaning) and is judged on prompts of the
           other combinations, before and after, by the same analyser as `eval`; ordinary held-out prompts are
           judged with the LoRA on too (nothing else should break).

eus        The CogVideoX paper's Explicit Uniform Sampling ablation (section 3.3): the same transformer, data, seed and
           steps trained twice from scratch, once with EUS (each batch's timesteps stratified over [0, T)) and once
           with the plain uniform draw. The per-step loss curves are compared by their variance around a moving
           average (and of step-to-step changes), over several seeds; a fixed-noise validation loss checks that EUS
           does not train worse.

Both write numbers (JSON) and a figure (PNG, drawn with PIL) to their output folder.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..checkpoints.io import write_json
from ..errors import CogVXError
from .synthetic import (SPARE_COLOUR_NAMES, UNSEEN_SHAPE_COLOURS, Combo, all_combos, caption, centred, combos_for,
                         random_clip, render)
from .tiny import SCHEDULER_CONFIG, TinyRecipe, init_transformer, say

LORA_COLOUR = SPARE_COLOUR_NAMES[0]  # "purple", the default colour the LoRA teaches (see the module docstring)


def _model_folder(model) -> Path:
    from ..models import TINY_MODEL, builtin_models

    if model is None:
        if not builtin_models():
            raise CogVXError(f"The built-in model is missing ({TINY_MODEL}); pass --model or build it with "
                             "`python -m cogvx_core recipe tiny --replace-builtin`.")
        return TINY_MODEL
    path = Path(model)
    if not (path / "transformer").is_dir():
        raise CogVXError(f"--model {path}: not a diffusers-format model folder (no transformer/ inside).")
    return path


def model_layout(model: Path) -> str:
    """The clip layout a recipe-built model learnt ("centred" or "random", see recipes.tiny.TinyRecipe.layout)."""
    recipe = model / "cogvx_recipe.json"
    return json.loads(recipe.read_text())["settings"].get("layout", "random") if recipe.is_file() else "random"


def write_clips(folder: Path, combos: list[Combo], per_combo: int, seed: int, size: tuple[int, int, int],
                layout: str = "random") -> int:
    """`per_combo` random clips of each combination as PNG frame folders with captions (the trainer's layout),
    centred like the base model's training clips when `layout` is "centred"."""
    from ..video_io import write_frames

    frames, height, width = size
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for i, combo in enumerate(combos):
        for k in range(per_combo):
            clip = random_clip(combo, np.random.default_rng([seed, i, k]), frames, height, width)
            clip = centred(clip) if layout == "centred" else clip
            name = f"{n:05d}"
            write_frames(render(clip), folder / name, fps=8)
            (folder / f"{name}.txt").write_text(caption(clip) + "\n", encoding="utf-8")
            n += 1
    return n


def _prepare(folder: Path, cache: Path, model: Path, text_length: int, size: tuple[int, int, int]):
    from ..checkpoints.vae import load_vae
    from ..text import load_text_encoder
    from ..train.buckets import make_buckets
    from ..train.dataset import prepare_dataset
    from ..variants import VARIANTS

    vae = load_vae(model / "vae", dtype=torch.float32)
    text_encoder = load_text_encoder(model, dtype=torch.float32, max_length=text_length)
    frames, height, width = size
    buckets = make_buckets(VARIANTS["5b"], frames, height, width, frame_counts=[frames])
    dataset = prepare_dataset(folder, vae=vae, text_encoder=text_encoder, variant=VARIANTS["5b"], buckets=buckets,
                              cache_dir=cache, fps=0)
    return dataset, text_encoder, vae.scaling_factor


# ---------------------------------------------------------------------------------------------------------------
# LoRA demonstration
# ---------------------------------------------------------------------------------------------------------------
def lora_split(colour: str = LORA_COLOUR) -> tuple[list[Combo], list[Combo]]:
    """(combinations of a new shape colour the LoRA trains on, those it is judged on): a fixed quarter is judged."""
    if colour not in UNSEEN_SHAPE_COLOURS:
        raise CogVXError(f"--colour {colour}: the base model has drawn shapes of that colour; choose one it never "
                         f"drew: {', '.join(UNSEEN_SHAPE_COLOURS)}.")
    combos = all_combos((colour,))
    judged = [c for i, c in enumerate(combos) if i % 4 == 3]
    return [c for c in combos if c not in judged], judged


def _frames_strip(videos: list[torch.Tensor], frames: int = 5) -> Image.Image:
    """Rows of `frames` evenly spaced frames of each video (T, H, W, 3) in [0, 1]."""
    t, h, w, _ = videos[0].shape
    picks = np.linspace(0, t - 1, frames).round().astype(int)
    sheet = Image.new("RGB", (frames * (w + 2), len(videos) * (h + 2)), (255, 255, 255))
    for r, video in enumerate(videos):
        for c, i in enumerate(picks):
            tile = Image.fromarray((video[i].clamp(0, 1).numpy() * 255).round().astype(np.uint8))
            sheet.paste(tile, (c * (w + 2), r * (h + 2)))
    return sheet


def _lora_figure(prompts: list[str], before: list[torch.Tensor], after: list[torch.Tensor], path: Path,
                 numbers: str, lora_name: str) -> None:
    left, right = _frames_strip(before), _frames_strip(after)
    scale = 2
    left = left.resize((left.width * scale, left.height * scale), Image.NEAREST)
    right = right.resize((right.width * scale, right.height * scale), Image.NEAREST)
    label_w, top = 330, 40
    img = Image.new("RGB", (label_w + left.width + 20 + right.width + 10, top + left.height + 30), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.text((label_w, 8), "base model", fill=(0, 0, 0))
    draw.text((label_w + left.width + 20, 8), f"base + {lora_name} LoRA", fill=(0, 0, 0))
    img.paste(left, (label_w, top))
    img.paste(right, (label_w + left.width + 20, top))
    row_h = left.height // max(len(prompts), 1)
    for i, p in enumerate(prompts):
        draw.text((6, top + i * row_h + row_h // 2 - 6), p, fill=(0, 0, 0))
    draw.text((6, top + left.height + 10), numbers, fill=(40, 40, 40))
    img.save(path)


def lora_demo(model=None, out="out/lora-demo", *, colour: str = LORA_COLOUR, smoke: bool = False,
              say=say) -> dict:
    from ..lora import apply_loras, load_lora, remove_loras
    from ..pipeline import load_pipeline
    from ..schedule import NoiseSchedule
    from ..train.trainer import Trainer, TrainSettings
    from ..transformer import CogVideoXTransformer  # noqa: F401  (type of pipe.transformer)
    from .quality import adherence, benchmark_prompts

    model, out = _model_folder(model), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pipe = load_pipeline(model, dtype=torch.float32)
    size = pipe.transformer.default_size()
    text_length = pipe.transformer.config["max_text_seq_length"]
    train_combos, judged_combos = lora_split(colour)
    base_combos = combos_for("train")
    rng = np.random.default_rng(7)
    if smoke:
        train_combos, judged_combos = train_combos[:4], judged_combos[:2]
        per_combo, n_base, steps, n_prompts, eval_steps = 1, 4, 4, 2, 2
    else:
        per_combo, n_base, steps, n_prompts, eval_steps = 4, 180, 600, 30, 25
    base_pick = [base_combos[i] for i in rng.choice(len(base_combos), n_base, replace=False)]

    data = out / "data"
    if not (data / "done").is_file():
        import shutil

        shutil.rmtree(data, ignore_errors=True)
        layout = model_layout(model)
        write_clips(data / colour, train_combos, per_combo, seed=11, size=size, layout=layout)
        write_clips(data / "base", base_pick, 1, seed=12, size=size, layout=layout)
        (data / "done").write_text("")
    dataset, _, scaling_factor = _prepare(data, out / "cache", model, text_length, size)
    say(f"lora-demo: {len(dataset)} clips ({len(train_combos) * per_combo} {colour}, {n_base} ordinary)")

    new_prompts = [caption(c) for c in judged_combos] * math.ceil(n_prompts / len(judged_combos))
    new_prompts = new_prompts[:n_prompts]
    base_prompts = benchmark_prompts(n_prompts, "heldout", seed=0)

    def judge_all(tag: str) -> dict:
        res = {}
        for name, prompts in (("new", new_prompts), ("heldout", base_prompts)):
            r = adherence(pipe, prompts, sampler="ddim", steps=eval_steps, seed=0, size=size)
            res[name] = r.to_dict(with_verdicts=False)
            say(f"lora-demo {tag}: {name} prompts: adherence {r.rate('all'):.0%}, colour {r.rate('colour'):.0%}")
        return res

    before = judge_all("before")
    lora_path = out / f"{colour}.safetensors"
    transformer = pipe.transformer
    if not lora_path.is_file():
        settings = TrainSettings(steps=steps, rank=16, learning_rate=1e-3, batch_size=8, lr_schedule="cosine",
                                 warmup_steps=20, mixed_precision="no", gradient_checkpointing=False, seed=0,
                                 weight_decay=0.0)
        train_start = time.perf_counter()
        trainer = Trainer(transformer, dataset, settings, schedule=NoiseSchedule.from_config(SCHEDULER_CONFIG),
                          scaling_factor=scaling_factor)
        trainer.run(on_step=lambda r: say(f"lora step {r.step}/{steps} loss {r.loss:.4f}")
                    if r.step % max(1, steps // 10) == 0 else None)
        trainer.save(lora_path)
        trainer.deactivate()
        train_seconds = time.perf_counter() - train_start
        remove_loras(transformer)
        transformer.requires_grad_(False).eval()
    else:
        train_seconds = None
    apply_loras(transformer, [(load_lora(lora_path), 1.0)])  # as `generate --lora` applies it
    after = judge_all("after")

    shown = new_prompts[:4]
    videos_after = _generate(pipe, shown, size)
    remove_loras(transformer)
    videos_before = _generate(pipe, shown, size)
    numbers = (f"{colour} shapes, adherence: {before['new']['all']:.0%} -> {after['new']['all']:.0%} "
               f"(colour {before['new']['colour']:.0%} -> {after['new']['colour']:.0%});  ordinary held-out "
               f"prompts: {before['heldout']['all']:.0%} -> {after['heldout']['all']:.0%}")
    _lora_figure(shown, videos_before, videos_after, out / "lora_demo.png", numbers, colour)
    result = {"model": str(model), "lora": str(lora_path), "train_clips": len(dataset),
              "colour": colour, "train_combos": len(train_combos), "judged_combos": len(judged_combos),
              "steps": steps, "rank": 16, "sampler": "ddim", "eval_steps": eval_steps,
              "before": before, "after": after, "train_seconds": train_seconds,
              "seconds": round(time.perf_counter() - start, 1), "figure": str(out / "lora_demo.png")}
    write_json(out / "lora_demo.json", result)
    return result


def _generate(pipe, prompts: list[str], size) -> list[torch.Tensor]:
    frames, height, width = size
    with torch.no_grad():
        out = pipe.generate(prompts, "", frames=frames, height=height, width=width, steps=25, sampler="ddim",
                            generator=torch.Generator("cpu").manual_seed(0))
    return list(out.frames)


# ---------------------------------------------------------------------------------------------------------------
# Explicit Uniform Sampling ablation
# ---------------------------------------------------------------------------------------------------------------
def moving_average(values: list[float], window: int) -> list[float]:
    """Centred moving average (shorter windows at the ends)."""
    half = window // 2
    csum = np.concatenate([[0.0], np.cumsum(values)])
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        out.append((csum[hi] - csum[lo]) / (hi - lo))
    return out


def curve_variance(losses: list[float], window: int = 25, skip: int = 0) -> dict:
    """How much a loss curve jitters: variance of the loss around its centred moving average, and of the step-to-step
    change, over the steps after `skip` (the fast initial descent is excluded) where the whole window fits."""
    x = np.asarray(losses, dtype=np.float64)
    trend = np.asarray(moving_average(list(x), window))
    end = len(x) - window // 2
    resid = (x - trend)[max(skip, window // 2):end]
    diffs = np.diff(x)[skip:]
    return {"residual_variance": float(resid.var()), "step_change_variance": float(diffs.var()),
            "mean_loss": float(x[skip:].mean())}


def _eus_figure(curves: dict[str, list[float]], path: Path, numbers: str, window: int) -> None:
    width, height = 900, 420
    left, right, top, bottom = 70, 20, 40, 60
    pw, ph = width - left - right, height - top - bottom
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    colours = {"explicit": ((220, 120, 120), (180, 20, 20)), "uniform": ((130, 160, 220), (20, 60, 170))}
    allv = [v for c in curves.values() for v in c if math.isfinite(v) and v > 0]
    lo, hi = math.log10(min(allv)), math.log10(max(allv))
    n = max(len(c) for c in curves.values())

    def xy(i, v):
        return left + i / max(n - 1, 1) * pw, top + (1 - (math.log10(v) - lo) / max(hi - lo, 1e-9)) * ph

    for k in range(5):
        y = top + k * ph / 4
        draw.line([(left, y), (left + pw, y)], fill=(232, 232, 232))
        draw.text((4, y - 6), f"{10 ** (hi - k * (hi - lo) / 4):.3g}", fill=(40, 40, 40))
    draw.rectangle([left, top, left + pw, top + ph], outline=(90, 90, 90))
    for name, losses in curves.items():
        raw, dark = colours[name]
        draw.line([xy(i, v) for i, v in enumerate(losses)], fill=raw, width=1)
    for name, losses in curves.items():
        raw, dark = colours[name]
        draw.line([xy(i, v) for i, v in enumerate(moving_average(losses, window))], fill=dark, width=2)
    draw.text((left, 12), "training loss per step (log scale): Explicit Uniform Sampling (red) vs uniform (blue); "
              f"dark = {window}-step moving average", fill=(0, 0, 0))
    draw.text((left, top + ph + 8), f"step 1 .. {n}", fill=(40, 40, 40))
    draw.text((left, top + ph + 28), numbers, fill=(40, 40, 40))
    img.save(path)


def eus_ablation(model=None, out="out/eus", *, smoke: bool = False, say=say) -> dict:
    from ..schedule import NoiseSchedule
    from ..train.trainer import Trainer, TrainSettings
    from .synthetic import make_dataset

    model, out = _model_folder(model), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    config = json.loads((model / "transformer" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    size = (config["sample_frames"], config["sample_height"] * 8, config["sample_width"] * 8)
    if smoke:
        clips, steps, seeds, batch, window, skip = 8, 12, [0], 4, 5, 2
    else:
        clips, steps, seeds, batch, window, skip = 420, 500, [0, 1, 2], 8, 25, 100
    data = out / "data"
    if not (data / "clips.jsonl").is_file() or len((data / "clips.jsonl").read_text().splitlines()) != clips:
        make_dataset(data, clips, seed=0, frames=size[0], height=size[1], width=size[2], split="train")
    dataset, _, scaling_factor = _prepare(data, out / "cache", model, config["max_text_seq_length"], size)
    runs: dict = {}
    for mode in ("explicit", "uniform"):
        for seed in seeds:
            t0 = time.perf_counter()
            transformer = init_transformer(config, seed)
            settings = TrainSettings(full_finetune=True, steps=steps, batch_size=batch, learning_rate=1e-3,
                                     lr_schedule="constant", warmup_steps=min(50, steps // 4), weight_decay=0.0,
                                     mixed_precision="no", gradient_checkpointing=False, seed=seed,
                                     timestep_sampling=mode, val_every=steps, val_items=min(8, len(dataset)))
            trainer = Trainer(transformer, dataset, settings, schedule=NoiseSchedule.from_config(SCHEDULER_CONFIG),
                              scaling_factor=scaling_factor)
            trainer.run()
            stats = curve_variance(trainer.losses, window, skip)
            runs[f"{mode}/{seed}"] = {"mode": mode, "seed": seed, **stats,
                                      "validation_loss": trainer.validations[-1]["loss"],
                                      "seconds": round(time.perf_counter() - t0, 1), "losses": trainer.losses}
            say(f"eus {mode} seed {seed}: residual variance {stats['residual_variance']:.3e}, "
                f"validation {trainer.validations[-1]['loss']:.4f}")
    summary = {}
    for mode in ("explicit", "uniform"):
        mine = [r for r in runs.values() if r["mode"] == mode]
        summary[mode] = {k: statistics.fmean(r[k] for r in mine)
                         for k in ("residual_variance", "step_change_variance", "mean_loss", "validation_loss")}
    ratio = summary["explicit"]["residual_variance"] / max(summary["uniform"]["residual_variance"], 1e-30)
    numbers = (f"residual variance (after step {skip}, mean of {len(seeds)} seeds): EUS "
               f"{summary['explicit']['residual_variance']:.3e}, uniform {summary['uniform']['residual_variance']:.3e}"
               f" (ratio {ratio:.2f});  validation loss: EUS {summary['explicit']['validation_loss']:.4f}, uniform "
               f"{summary['uniform']['validation_loss']:.4f}")
    _eus_figure({m: runs[f"{m}/{seeds[0]}"]["losses"] for m in ("explicit", "uniform")}, out / "eus_ablation.png",
                numbers, window)
    result = {"model": str(model), "clips": len(dataset), "steps": steps, "batch_size": batch, "seeds": seeds,
              "window": window, "skip": skip, "summary": summary, "variance_ratio": ratio,
              "runs": {k: {kk: vv for kk, vv in v.items() if kk != "losses"} for k, v in runs.items()},
              "seconds": round(time.perf_counter() - start, 1), "figure": str(out / "eus_ablation.png")}
    write_json(out / "eus_ablation.json", {**result, "losses": {k: v["losses"] for k, v in runs.items()}})
    return result
