"""A loss chart as a PIL image: the raw per-step training loss (light), its running mean (dark) and the fixed-noise
validation loss (red points), on a log scale when the losses span more than a decade. Used for the node's live
preview and loss-plot output, and by the CLI (--plot)."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

RAW, MEAN, VAL, AXIS, GRID, TEXT = (170, 190, 225), (30, 70, 160), (210, 40, 40), (90, 90, 90), (232, 232, 232), (40, 40, 40)


def running_mean(values: list[float], smoothing: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (skipped, non-finite steps leave it unchanged)."""
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        if math.isfinite(v):
            avg = smoothing * avg + (1 - smoothing) * v
            weight = smoothing * weight + (1 - smoothing)
        out.append(avg / weight if weight else float("nan"))
    return out


def loss_chart(losses: list[float], validations: list[dict] | None = None, *, width: int = 768, height: int = 384,
               smoothing: float = 0.9, title: str = "", first_step: int = 1) -> Image.Image:
    """losses[i] is the loss of step first_step + i; validations: [{"step": s, "loss": v}, ...]."""
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 64, 16, 28, 34
    pw, ph = width - left - right, height - top - bottom
    validations = [v for v in (validations or []) if math.isfinite(v.get("loss", float("nan")))]
    finite = [v for v in losses if math.isfinite(v)] + [v["loss"] for v in validations]
    draw.text((left, 8), title or "loss", fill=TEXT)
    if not finite:
        draw.text((left + pw // 2 - 40, top + ph // 2), "no steps yet", fill=AXIS)
        return img
    lo, hi = min(finite), max(finite)
    log_scale = lo > 0 and hi / lo > 10
    f = (lambda v: math.log10(v)) if log_scale else (lambda v: v)
    y_lo, y_hi = f(lo), f(hi)
    if y_hi - y_lo < 1e-12:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    last_step = first_step + max(len(losses) - 1, 0)
    if validations:
        last_step = max(last_step, max(int(v["step"]) for v in validations))
    span = max(last_step - first_step, 1)

    def xy(step: float, value: float) -> tuple[float, float]:
        return (left + (step - first_step) / span * pw, top + (1 - (f(value) - y_lo) / (y_hi - y_lo)) * ph)

    for k in range(5):  # horizontal grid with labels
        y = top + k * ph / 4
        draw.line([(left, y), (left + pw, y)], fill=GRID)
        value = y_hi - k * (y_hi - y_lo) / 4
        draw.text((4, y - 6), f"{10 ** value if log_scale else value:.3g}", fill=TEXT)
    draw.rectangle([left, top, left + pw, top + ph], outline=AXIS)
    draw.text((left, top + ph + 6), str(first_step), fill=TEXT)
    draw.text((left + pw - 40, top + ph + 6), str(last_step), fill=TEXT)
    draw.text((left + pw // 2 - 14, top + ph + 6), "step", fill=AXIS)

    def polyline(values: list[float], colour, w: int) -> None:
        run: list[tuple[float, float]] = []
        for i, v in enumerate(values):
            if math.isfinite(v):
                run.append(xy(first_step + i, v))
            else:
                if len(run) > 1:
                    draw.line(run, fill=colour, width=w)
                run = []
        if len(run) > 1:
            draw.line(run, fill=colour, width=w)
        elif len(run) == 1:
            x, y = run[0]
            draw.ellipse([x - 1, y - 1, x + 1, y + 1], fill=colour)

    polyline(losses, RAW, 1)
    polyline(running_mean(losses, smoothing), MEAN, 2)
    for v in validations:
        x, y = xy(int(v["step"]), v["loss"])
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=VAL)
    legend = f"train (mean {running_mean(losses, smoothing)[-1]:.4g})" if losses else "train"
    if validations:
        legend += f"   validation {validations[-1]['loss']:.4g}"
    draw.text((left + pw - 7 * len(legend) - 8, 8), legend, fill=MEAN)
    return img
