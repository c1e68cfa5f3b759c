"""Step caching: skip the transformer blocks on steps where their output would barely change.

A transformer pass is patch embedding -> blocks -> output head; the blocks are nearly all of the work. On a skipped
pass the blocks' residual (their output minus their input, cached at the last computed pass) is added to the new
input instead. Two published ways to decide when:

  - TeaCache (Liu et al. 2024, ali-vilab/TeaCache): the relative L1 change of the timestep embedding that modulates
    every block (for CogVideoX the public code measures exactly this), mapped through a 4th-degree polynomial fitted
    per model (input change -> output change), is summed over the steps since the last computed pass; while the sum
    stays under the threshold the blocks are skipped, and the sum restarts at each computed pass. CogVideoX's
    modulation depends on the timestep only, so for a given schedule the skipped steps are the same for every prompt.
  - First-block cache: the first block always runs; when the relative L1 change of its residual against the last
    computed pass's stays under the threshold, the remaining blocks are skipped. No coefficients.

One decision covers a whole pass, so the cond and uncond halves of a CFG batch are computed or skipped together.
The first and last steps of a run always compute. Off by default: a transformer without a CacheRun attached runs
exactly as before.

StepCache is a setting (immutable: what the CLI flag, the pipeline keyword and the node carry); CacheRun holds one
sampling run's state and counts the passes it computed and skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .errors import CogVXError

CACHE_KINDS = ("teacache", "fbcache")
DEFAULT_THRESHOLDS = {"teacache": 0.3, "fbcache": 0.1}
CACHE_FILE = "cogvx_cache.json"  # calibrated coefficients, written beside a model by `calibrate-cache`

# TeaCache's rescale polynomials (highest power first) as published in ali-vilab/TeaCache,
# TeaCache4CogVideoX1.5/teacache_sample_video.py; keyed by our variant names. 5B-I2V shares 5B's.
PUBLISHED_COEFFICIENTS = {
    "2b": (-3.10658903e+01, 2.54732368e+01, -5.92380459e+00, 1.75769064e+00, -3.61568434e-03),
    "5b": (-1.53880483e+03, 8.43202495e+02, -1.34363087e+02, 7.97131516e+00, -5.23162339e-02),
    "5b-i2v": (-1.53880483e+03, 8.43202495e+02, -1.34363087e+02, 7.97131516e+00, -5.23162339e-02),
    "1.5-5b": (2.50210439e+02, -1.65061612e+02, 3.57804877e+01, -7.81551492e-01, 3.58559703e-02),
    "1.5-5b-i2v": (1.22842302e+02, -1.04088754e+02, 2.62981677e+01, -3.06009921e-01, 3.71213220e-02),
}


@dataclass(frozen=True)
class StepCache:
    """A step-caching setting. coefficients: TeaCache's polynomial (highest power first), None until resolved."""

    kind: str
    threshold: float
    coefficients: tuple[float, ...] | None = None
    source: str = ""  # where the coefficients come from, for reports

    def __post_init__(self):
        if self.kind not in CACHE_KINDS:
            raise CogVXError(f"Unknown step cache {self.kind!r}; use one of {', '.join(CACHE_KINDS)}.")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or \
                not 0 <= self.threshold < float("inf"):
            raise CogVXError(f"The {self.kind} threshold must be a number of at least 0, got {self.threshold!r}.")

    def label(self) -> str:
        return f"{self.kind}:{self.threshold:g}"


def parse_cache(spec: str | None) -> StepCache | None:
    """`teacache[:THRESHOLD]` or `fbcache[:THRESHOLD]` -> StepCache; None, "", "off" or "none" -> None."""
    if spec is None or spec.strip().lower() in ("", "off", "none"):
        return None
    kind, sep, value = spec.strip().lower().partition(":")
    if kind not in CACHE_KINDS:
        raise CogVXError(f"--cache {spec!r}: use teacache[:THRESHOLD] or fbcache[:THRESHOLD] (e.g. teacache:0.3).")
    if not sep:
        return StepCache(kind, DEFAULT_THRESHOLDS[kind])
    try:
        threshold = float(value)
    except ValueError:
        raise CogVXError(f"--cache {spec!r}: the threshold after ':' must be a number, e.g. {kind}:0.2.") from None
    return StepCache(kind, threshold)


# ---------------------------------------------------------------------------------------------------------------
# Coefficients
# ---------------------------------------------------------------------------------------------------------------
def read_coefficients(path: str | Path) -> tuple[float, ...]:
    """The TeaCache polynomial of a calibration file written by `calibrate-cache`."""
    path = Path(path)
    if path.is_dir():
        path = path / CACHE_FILE
    try:
        coefficients = json.loads(path.read_text())["teacache"]["coefficients"]
    except FileNotFoundError:
        raise CogVXError(f"{path}: no such calibration file; make one with `python -m cogvx_core calibrate-cache`."
                         ) from None
    except (ValueError, KeyError, TypeError):
        raise CogVXError(f"{path}: not a calibration file of `calibrate-cache` (no teacache.coefficients).") from None
    if not isinstance(coefficients, list) or not coefficients or \
            not all(isinstance(c, (int, float)) and abs(c) < float("inf") for c in coefficients):
        raise CogVXError(f"{path}: teacache.coefficients must be a list of finite numbers.")
    return tuple(float(c) for c in coefficients)


def resolve(cache: StepCache | None, variant, *, released: bool, model_dir: str | Path | None = None,
            coefficients_file: str | Path | None = None) -> StepCache | None:
    """Fill in TeaCache's coefficients: a given calibration file, else the one beside the model folder, else the
    published polynomial of the variant when the model has a released size (`released`, see
    transformer.released_size). A model of another size has to be calibrated."""
    if cache is None or cache.kind != "teacache" or cache.coefficients is not None:
        return cache
    for path in (coefficients_file, Path(model_dir) / CACHE_FILE if model_dir is not None else None):
        if path is not None and (coefficients_file is not None or Path(path).is_file()):
            return replace(cache, coefficients=read_coefficients(path), source=str(path))
    if released and variant.name in PUBLISHED_COEFFICIENTS:
        return replace(cache, coefficients=PUBLISHED_COEFFICIENTS[variant.name],
                       source=f"published TeaCache coefficients of {variant.title}")
    raise CogVXError(f"TeaCache needs coefficients fitted to this model ({variant.title} architecture at a size no "
                     "released model has): run `python -m cogvx_core calibrate-cache --model FOLDER` once, or use "
                     "--cache fbcache, which needs none.")


def polynomial(coefficients: tuple[float, ...], x: float) -> float:
    """Horner's rule, highest power first (numpy.polyval's order)."""
    y = 0.0
    for c in coefficients:
        y = y * x + c
    return y


def relative_l1(new: torch.Tensor, old: torch.Tensor) -> float:
    """mean |new - old| / mean |old|, over the whole tensor (a CFG batch's halves together: one decision)."""
    return ((new.float() - old.float()).abs().mean() / old.float().abs().mean().clamp_min(1e-12)).item()


# ---------------------------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class CacheRun:
    """One sampling run's cache state. Attach it to the transformer for the run (`attached`); each transformer pass
    is one step. setting None counts passes only (every pass computed)."""

    setting: StepCache | None
    num_steps: int
    computed: int = 0
    skipped: int = 0
    _indicator: torch.Tensor | None = field(default=None, repr=False)  # last pass's temb (TeaCache)
    _first: torch.Tensor | None = field(default=None, repr=False)  # last computed first-block residual (fbcache)
    _residual: torch.Tensor | None = field(default=None, repr=False)  # blocks' residual at the last computed pass
    _accumulated: float = 0.0

    def __post_init__(self):
        if self.setting is not None and self.setting.kind == "teacache" and self.setting.coefficients is None:
            raise CogVXError("TeaCache has no coefficients: resolve the setting with cache.resolve() first.")

    @property
    def step(self) -> int:
        return self.computed + self.skipped

    def summary(self) -> str:
        total = max(self.step, 1)
        what = self.setting.label() if self.setting is not None else "no cache"
        return (f"transformer passes: {self.computed} computed, {self.skipped} skipped "
                f"({100 * self.skipped / total:.0f}% skipped, {what})")

    def blocks(self, model, tokens: torch.Tensor, temb: torch.Tensor, text_len: int,
               rope: torch.Tensor | None) -> torch.Tensor:
        """The transformer's blocks on tokens (B, S, D), or the cached residual instead. Called by its forward."""
        edge = self.step == 0 or self.step >= self.num_steps - 1
        reusable = self._residual is not None and self._residual.shape == tokens.shape
        kind = self.setting.kind if self.setting is not None else None
        if kind == "fbcache":
            return self._first_block(model, tokens, temb, text_len, rope, edge or not reusable)
        skip = False
        if kind == "teacache":
            if self._indicator is not None and self._indicator.shape == temb.shape:
                change = relative_l1(temb, self._indicator)
                self._accumulated += polynomial(self.setting.coefficients, change)
            self._indicator = temb.detach().clone()
            skip = not edge and reusable and self._accumulated < self.setting.threshold
        if skip:
            self.skipped += 1
            return tokens + self._residual
        self.computed += 1
        self._accumulated = 0.0
        if kind is None:
            return model.run_blocks(tokens, temb, text_len, rope)
        before = tokens.clone()  # the blocks work in place
        out = model.run_blocks(tokens, temb, text_len, rope)
        self._residual = out - before
        return out

    def _first_block(self, model, tokens, temb, text_len, rope, must_compute: bool) -> torch.Tensor:
        before = tokens.clone()
        hidden = model.run_blocks(tokens, temb, text_len, rope, stop=1)
        first = hidden - before
        if not must_compute and self._first is not None and \
                relative_l1(first, self._first) < self.setting.threshold:
            self.skipped += 1
            return hidden + self._residual
        self.computed += 1
        self._first = first
        middle = hidden.clone()
        out = model.run_blocks(hidden, temb, text_len, rope, start=1)
        self._residual = out - middle
        return out


class attached:
    """`with attached(transformer, run):` the transformer's passes go through the run's cache."""

    def __init__(self, transformer, run: CacheRun | None):
        self.transformer, self.run = transformer, run

    def __enter__(self):
        self.previous = getattr(self.transformer, "step_cache", None)
        self.transformer.step_cache = self.run
        return self.run

    def __exit__(self, *exc):
        self.transformer.step_cache = self.previous
        return False
