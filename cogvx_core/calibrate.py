"""Fitting TeaCache's rescale polynomial to a model (`python -m cogvx_core calibrate-cache`).

TeaCache decides from the change of the time embedding how much the transformer's output would change. The mapping
differs between models, and between a base model and its fine-tunes and LoRAs, so it is fitted from full (uncached)
generations: at every step after the first, x = the relative L1 change of the time embedding (what cache.CacheRun
measures) and y = the relative L1 change of the transformer's output (the v-prediction of the whole CFG batch); a
4th-degree polynomial y(x) is fitted by least squares over all steps of all runs. Several step counts give x values
over the range sampling will meet (fewer steps, bigger changes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .cache import CacheRun, relative_l1
from .errors import CogVXError

DEGREE = 4


@dataclass
class _Recorder(CacheRun):
    """Computes every pass (no cache) and keeps each pass's time embedding."""

    tembs: list = field(default_factory=list)

    def blocks(self, model, tokens, temb, text_len, rope):
        self.tembs.append(temb.detach().float().clone())
        return super().blocks(model, tokens, temb, text_len, rope)


def record(pipe, prompts: list[str], *, steps: int, sampler: str = "ddim", guidance: float = 6.0, seed: int = 0,
           size: tuple[int, int, int] | None = None) -> tuple[list[float], list[float]]:
    """(x, y) of every step after the first of one uncached generation of `prompts` (one batch)."""
    outputs: list[torch.Tensor] = []
    hook = pipe.transformer.register_forward_hook(lambda m, args, out: outputs.append(out.detach().float().clone()))
    frames, height, width = size or (None, None, None)
    recorder = _Recorder(None, steps)
    try:
        pipe.generate(prompts, "", frames=frames, height=height, width=width, steps=steps, sampler=sampler,
                      guidance=guidance, seed=seed, decode_frames=False, cache=recorder)
    finally:
        hook.remove()
    x = [relative_l1(recorder.tembs[i], recorder.tembs[i - 1]) for i in range(1, len(recorder.tembs))]
    y = [relative_l1(outputs[i], outputs[i - 1]) for i in range(1, len(outputs))]
    return x, y


def fit(x: list[float], y: list[float], degree: int = DEGREE) -> tuple[tuple[float, ...], float]:
    """(coefficients highest power first, R^2) of the least-squares polynomial y(x)."""
    if len(set(round(v, 12) for v in x)) <= degree:
        raise CogVXError(f"{len(set(x))} distinct input changes cannot fix a degree-{degree} polynomial: calibrate "
                         "with more steps or more step counts.")
    coefficients = np.polyfit(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), degree)
    pred = np.polyval(coefficients, x)
    total = float(np.sum((np.asarray(y) - np.mean(y)) ** 2))
    r2 = 1 - float(np.sum((np.asarray(y) - pred) ** 2)) / total if total > 0 else 1.0
    return tuple(float(c) for c in coefficients), r2


def calibrate(pipe, prompts: list[str], *, steps: list[int], sampler: str = "ddim", guidance: float = 6.0,
              seed: int = 0, batch_size: int = 4, size: tuple[int, int, int] | None = None,
              progress=None) -> dict:
    """Full generations of `prompts` (batches of batch_size) at each step count; the fitted polynomial and the
    points it was fitted to, as calibrate-cache writes them."""
    xs: list[float] = []
    ys: list[float] = []
    runs = [(n, b) for n in steps for b in range(0, len(prompts), batch_size)]
    for done, (n, b) in enumerate(runs, 1):
        x, y = record(pipe, prompts[b:b + batch_size], steps=n, sampler=sampler, guidance=guidance,
                      seed=seed + b // batch_size, size=size)
        xs += x
        ys += y
        if progress is not None:
            progress(done, len(runs))
    coefficients, r2 = fit(xs, ys)
    return {"teacache": {"coefficients": list(coefficients), "r2": round(r2, 4), "prompts": len(prompts),
                         "steps": list(steps), "sampler": sampler, "guidance": guidance, "points": len(xs)},
            "points": {"x": [round(v, 6) for v in xs], "y": [round(v, 6) for v in ys]}}


def write_calibration(result: dict, path: str | Path, **about) -> Path:
    """The calibration as JSON (about: model, LoRAs, ... recorded with it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"teacache": {**about, **result["teacache"]}, "points": result["points"]}
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path
