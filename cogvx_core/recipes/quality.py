"""The quality benchmark of a text-to-video model on synthetic prompts (`python -m cogvx_core eval`).

Prompt adherence: videos generated from held-out captions (caption combinations no training clip shows, see
synthetic.split) are read by the deterministic judge (analysis.judge): is the moving shape of the named colour, the
named shape, and does it move in the named direction? A video counts as adherent only when all three are right
("unknown" answers are wrong). The table runs each sampler at each step count on the same prompts and seeds.

VAE: held-out clips go through the VAE (posterior mean) and back: PSNR against the source, and the CogVideoX paper's
flickering measure (analysis.flicker) of the reconstruction beside that of the source (the same motion, so any
excess is flicker the VAE adds). Generated videos' flicker is reported next to the real clips' flicker too.

Determinism: prompt i of a run uses batch i // batch_size, whose noise comes from a generator seeded with
(seed + batch index); the same model, prompts, seed and batch size give the same videos and the same numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import CogVXError
from .analysis import flicker, judge
from .synthetic import SPLITS, caption, combos_for, dataset_clips, render_uint8

ATTRIBUTES = ("colour", "shape", "direction", "background", "all")


def benchmark_prompts(n: int, split: str = "heldout", seed: int = 0) -> list[str]:
    """n captions of `split`'s combinations in a seeded order; more than the split holds cycles through it again."""
    if split not in SPLITS:
        raise CogVXError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}.")
    combos = combos_for(split)
    if n < 1:
        raise CogVXError(f"--prompts {n}: ask for at least one prompt.")
    prompts = []
    cycle = 0
    while len(prompts) < n:
        order = np.random.default_rng([seed, cycle]).permutation(len(combos))
        prompts += [caption(combos[i]) for i in order]
        cycle += 1
    return prompts[:n]


@dataclass
class AdherenceResult:
    sampler: str
    steps: int
    n: int
    correct: dict = field(default_factory=dict)  # attribute -> count right
    flicker: float = 0.0  # mean over the generated videos
    seconds: float = 0.0
    verdicts: list = field(default_factory=list)  # per prompt: {"prompt", attribute: bool, "found": {...}}
    computed: int = 0  # transformer passes computed and skipped (step caching), over all batches
    skipped: int = 0

    def rate(self, attribute: str = "all") -> float:
        return self.correct.get(attribute, 0) / max(self.n, 1)

    def to_dict(self, with_verdicts: bool = False) -> dict:
        d = {"sampler": self.sampler, "steps": self.steps, "n": self.n,
             **{a: round(self.rate(a), 4) for a in ATTRIBUTES}, "flicker": round(self.flicker, 3),
             "seconds": round(self.seconds, 1), "passes_computed": self.computed, "passes_skipped": self.skipped}
        if with_verdicts:
            d["verdicts"] = self.verdicts
        return d


def adherence(pipe, prompts: list[str], *, sampler: str = "ddim", steps: int = 50, guidance: float = 6.0,
              seed: int = 0, batch_size: int = 10, size: tuple[int, int, int] | None = None,
              progress=None, cache=None, videos: list | None = None) -> AdherenceResult:
    """Generates one video per prompt and judges it against its prompt. cache: a resolved cache.StepCache; videos:
    a list the frames (T, H, W, 3) of each video are appended to."""
    frames, height, width = size or pipe.transformer.default_size()
    result = AdherenceResult(sampler, steps, len(prompts), {a: 0 for a in ATTRIBUTES})
    start = time.perf_counter()
    flickers = []
    for b in range(0, len(prompts), batch_size):
        batch = prompts[b:b + batch_size]
        generator = torch.Generator("cpu").manual_seed(seed + b // batch_size)
        with torch.no_grad():
            out = pipe.generate(batch, "", frames=frames, height=height, width=width, steps=steps,
                                guidance=guidance, sampler=sampler, generator=generator, cache=cache)
        result.computed += out.passes.computed
        result.skipped += out.passes.skipped
        if videos is not None:
            videos += list(out.frames)
        for prompt, video in zip(batch, out.frames):  # (T, H, W, 3) in [0, 1]
            verdict = judge(video, prompt)
            for a in ATTRIBUTES:
                result.correct[a] += int(verdict[a])
            found = verdict["analysis"]
            result.verdicts.append({"prompt": prompt, **{a: bool(verdict[a]) for a in ATTRIBUTES},
                                    "found": {k: found[k] for k in ("colour", "shape", "direction", "background")}})
            flickers.append(flicker(video))
        if progress is not None:
            progress(min(b + batch_size, len(prompts)), len(prompts))
    result.flicker = float(np.mean(flickers)) if flickers else 0.0
    result.seconds = time.perf_counter() - start
    return result


def heldout_clips(n: int, size: tuple[int, int, int], seed: int = 1) -> torch.Tensor:
    """n held-out clips (combinations never trained) as uint8 (n, T, H, W, 3); seed 1 keeps them apart from the
    recipe's seed-0 data."""
    frames, height, width = size
    clips = dataset_clips(n, seed=seed, frames=frames, height=height, width=width, split="heldout")
    return render_uint8(clips)


def vae_quality(vae, clips: torch.Tensor, batch_size: int = 4) -> dict:
    """Round trip of uint8 clips (N, T, H, W, 3) through the VAE (posterior mean): PSNR (dB, [0, 1] range) and the
    paper's flicker of the reconstructions beside the sources'."""
    psnr, flick_rec, flick_src = [], [], []
    with torch.no_grad():
        for i in range(0, len(clips), batch_size):
            src = clips[i:i + batch_size].float() / 255.0  # (B, T, H, W, 3)
            x = (src * 2 - 1).permute(0, 4, 1, 2, 3).to(vae.device, vae.dtype)  # (B, 3, T, H, W)
            rec = (vae.decode(vae.encode(x)).float().clamp(-1, 1) / 2 + 0.5).permute(0, 2, 3, 4, 1).cpu()
            rec = (rec * 255).round() / 255  # as a saved 8-bit video
            mse = (rec - src).pow(2).flatten(1).mean(1).clamp_min(1e-12)
            psnr += (10 * torch.log10(1 / mse)).tolist()
            flick_rec += [flicker(v) for v in rec]
            flick_src += [flicker(v) for v in src]
    return {"clips": len(clips), "psnr": round(float(np.mean(psnr)), 2), "psnr_min": round(float(np.min(psnr)), 2),
            "flicker_reconstruction": round(float(np.mean(flick_rec)), 3),
            "flicker_source": round(float(np.mean(flick_src)), 3)}


def format_table(results: list[AdherenceResult]) -> str:
    """A markdown table: one row per (sampler, steps)."""
    lines = ["| sampler | steps | adherence (all three) | colour | shape | direction | background | flicker | "
             "seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.sampler} | {r.steps} | {100 * r.rate('all'):.0f}% | {100 * r.rate('colour'):.0f}% | "
                     f"{100 * r.rate('shape'):.0f}% | {100 * r.rate('direction'):.0f}% | "
                     f"{100 * r.rate('background'):.0f}% | {r.flicker:.2f} | {r.seconds:.1f} |")
    return "\n".join(lines)
