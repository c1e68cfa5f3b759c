"""CogVXCache: step caching (TeaCache or first-block cache) and compiled blocks for a COGVX_MODEL.

Like the LoRA loader, the node returns a new model handle carrying the setting; the sampler runs with it. TeaCache's
coefficients are resolved here: a calibration file (from `python -m cogvx_core calibrate-cache`), else the
cogvx_cache.json in the model's folder, else the published ones of a released model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .core import CACHE_KINDS, DEFAULT_THRESHOLDS, StepCache, compile_blocks, resolve_cache


class CogVXCache:
    """Skips transformer passes whose output would barely change; optionally compiles the blocks."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("COGVX_MODEL",),
            "cache": (["off", *CACHE_KINDS], {"default": "teacache", "tooltip": "teacache: decides from the "
                                              "timestep embedding's change (needs coefficients fitted to the model); "
                                              "fbcache: from the first block's output change (no coefficients)"}),
            "threshold": ("FLOAT", {"default": DEFAULT_THRESHOLDS["teacache"], "min": 0.0, "max": 5.0,
                                    "step": 0.01, "tooltip": "higher skips more steps: faster, less exact (TeaCache "
                                    "0.1-0.3, first-block cache 0.05-0.2)"}),
            "compile": ("BOOLEAN", {"default": False, "tooltip": "torch.compile the transformer blocks (one graph "
                                    "for all; the first run compiles). Stays on the loaded model."}),
        }, "optional": {
            "coefficients_file": ("STRING", {"default": "", "tooltip": "a calibration file from calibrate-cache "
                                             "(empty: the model folder's cogvx_cache.json, else the published "
                                             "coefficients)"}),
        }}

    RETURN_TYPES = ("COGVX_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"
    CATEGORY = "CogVX/sampling"
    DESCRIPTION = ("Step caching: the sampler skips the transformer's blocks on steps where they would barely change "
                   "and reuses their last output (TeaCache or first-block cache). The sampler reports how many "
                   "passes it computed and skipped.")

    def apply(self, model, cache: str, threshold: float, compile: bool = False, coefficients_file: str = ""):
        setting = None
        if cache != "off":
            source = Path(model.source)
            setting = resolve_cache(StepCache(cache, float(threshold)), model.variant,
                                    released=model.transformer.released_size,
                                    model_dir=source if source.is_dir() else None,
                                    coefficients_file=coefficients_file.strip() or None)
        if compile:
            compile_blocks(model.transformer)
        return (dataclasses.replace(model, cache=setting),)
