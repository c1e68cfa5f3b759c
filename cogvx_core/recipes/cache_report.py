"""What step caching costs: each cache setting against the uncached run on the same prompts and seeds (`eval --cache`).

Per setting: held-out adherence (quality.adherence), transformer passes computed and skipped, wall time end to end
(text encoding, sampling, decoding and judging) and its speed-up over the uncached run (from the process's CPU time,
which other programs' load on a shared machine inflates far less than wall time; both are reported), and the PSNR of every video
against the uncached video of the same prompt and seed (8-bit frames, as saved).
"""

from __future__ import annotations

import time

import torch
from PIL import Image, ImageDraw

from .quality import ATTRIBUTES, AdherenceResult, adherence


def video_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) of two videos (T, H, W, 3) in [0, 1] after 8-bit rounding; 100 when identical."""
    a, b = (a.float().clamp(0, 1) * 255).round() / 255, (b.float().clamp(0, 1) * 255).round() / 255
    mse = (a - b).pow(2).mean().item()
    return 100.0 if mse == 0 else float(10 * torch.log10(torch.tensor(1 / mse)))


def compare(pipe, prompts: list[str], settings: list, *, sampler: str, steps: int, guidance: float = 6.0,
            seed: int = 0, batch_size: int = 10, size=None, progress=None) -> list[dict]:
    """One row per setting, the uncached run first, each against the uncached videos. The settings take turns
    batch by batch (same seeds as one quality.adherence run), so load drift on a shared machine hits all alike."""
    runs: list = [None, *settings]
    totals = [AdherenceResult(sampler, steps, 0, {a: 0 for a in ATTRIBUTES}) for _ in runs]
    cpu = [0.0 for _ in runs]
    videos: list[list] = [[] for _ in runs]
    batches = list(range(0, len(prompts), batch_size))
    bar = progress(f"{sampler} {steps} steps, {len(runs)} settings") if progress else None
    for k, start in enumerate(batches):
        for i, (cache, total, kept) in enumerate(zip(runs, totals, videos)):
            start_cpu = time.process_time()
            r = adherence(pipe, prompts[start:start + batch_size], sampler=sampler, steps=steps, guidance=guidance,
                          seed=seed + k, batch_size=batch_size, size=size, cache=cache, videos=kept)
            cpu[i] += time.process_time() - start_cpu
            total.n += r.n
            total.seconds += r.seconds
            total.computed += r.computed
            total.skipped += r.skipped
            for a in ATTRIBUTES:
                total.correct[a] += r.correct[a]
        if bar is not None:
            bar(min(start + batch_size, len(prompts)), len(prompts))
    return [_row(cache, total, [video_psnr(v, b) for v, b in zip(kept, videos[0])], cpu_s, totals[0].seconds,
                 cpu[0], sampler, steps) for cache, total, kept, cpu_s in zip(runs, totals, videos, cpu)]


def _row(cache, r, psnrs: list[float], cpu_seconds: float, base_seconds: float, base_cpu: float, sampler: str,
         steps: int) -> dict:
    return {"sampler": sampler, "steps": steps, "cache": cache.label() if cache else "off",
            "coefficients": cache.source if cache is not None and cache.kind == "teacache" else None,
            "adherence": round(r.rate("all"), 4), "passes_computed": r.computed, "passes_skipped": r.skipped,
            "computed_fraction": round(r.computed / max(r.computed + r.skipped, 1), 4),
            "seconds": round(r.seconds, 2), "wall_speedup": round(base_seconds / max(r.seconds, 1e-9), 3),
            "cpu_seconds": round(cpu_seconds, 2), "speedup": round(base_cpu / max(cpu_seconds, 1e-9), 3),
            "psnr_mean": round(sum(psnrs) / len(psnrs), 2), "psnr_min": round(min(psnrs), 2)}


def format_table(rows: list[dict]) -> str:
    lines = ["| sampler | steps | cache | adherence | passes computed / skipped | CPU s | speed-up (CPU time) | wall s | "
             "speed-up (wall) | PSNR vs uncached (mean / min) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        psnr = "(reference)" if r["cache"] == "off" else f"{r['psnr_mean']:.1f} / {r['psnr_min']:.1f} dB"
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['cache']} | {100 * r['adherence']:.0f}% | "
                     f"{r['passes_computed']} / {r['passes_skipped']} | {r['cpu_seconds']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['seconds']:.1f} | {r['wall_speedup']:.2f}x | {psnr} |")
    return "\n".join(lines)


COLOURS = {"ddim": (30, 70, 160), "dpm": (210, 90, 30)}


def speed_quality_chart(rows: list[dict], width: int = 720, height: int = 420) -> Image.Image:
    """Speed-up (x) against mean PSNR to the uncached video (y), one point per cached setting, labelled."""
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, 20, 30, 40
    points = [r for r in rows if r["cache"] != "off"]
    if not points:
        return img
    x_max = max(2.0, max(r["speedup"] for r in points) * 1.1)
    y_lo = min(25.0, min(r["psnr_mean"] for r in points) - 2)
    y_hi = max(r["psnr_mean"] for r in points) + 3

    def xy(x, y):
        return (left + (x - 1) / (x_max - 1) * (width - left - right),
                height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline=(90, 90, 90))
    for k in range(int(x_max) + 1):
        for frac in (0.0, 0.5):
            x = 1 + k + frac
            if x <= x_max:
                px, _ = xy(x, y_lo)
                draw.line([px, top, px, height - bottom], fill=(232, 232, 232))
                draw.text((px - 10, height - bottom + 4), f"{x:g}x", fill=(40, 40, 40))
    for y in range(int(y_lo // 5 * 5), int(y_hi) + 1, 5):
        if y >= y_lo:
            _, py = xy(1, y)
            draw.line([left, py, width - right, py], fill=(232, 232, 232))
            draw.text((8, py - 6), f"{y} dB", fill=(40, 40, 40))
    for r in points:
        px, py = xy(r["speedup"], r["psnr_mean"])
        colour = COLOURS.get(r["sampler"], (0, 0, 0))
        draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)
        draw.text((px + 6, py - 6), f"{r['sampler']} {r['cache']} ({100 * r['adherence']:.0f}%)", fill=colour)
    draw.text((left, 8), "step caching: speed-up (end to end, CPU time) vs PSNR to the uncached video",
              fill=(40, 40, 40))
    return img
