"""CogVXLoraLoader: a LoRA from models/loras on a COGVX_MODEL, at a strength (negative too); several chain.

The node returns a new model handle that lists the LoRA; the transformer is not copied or reloaded. The sampler
makes exactly the handle's LoRAs the transformer's before each run, so a strength change re-weights without
reloading, and two graphs with different LoRAs on one model never see each other's.
"""

from __future__ import annotations

import dataclasses

from .core import load_lora

from . import host


class CogVXLoraLoader:
    """Applies a LoRA (diffusers/peft, kohya, ComfyUI or SAT layout) to a CogVideoX model."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("COGVX_MODEL",),
            "lora_name": (host.list_models("loras"), {"tooltip": "a .safetensors LoRA from models/loras"}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                   "tooltip": "1.0 applies the LoRA as trained; negative values subtract it"}),
        }}

    RETURN_TYPES = ("COGVX_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    CATEGORY = "CogVX/loaders"
    DESCRIPTION = ("Adds a LoRA to the model at a strength. Chain several for stacking. Layers the LoRA does not "
                   "match are listed in a warning; a LoRA for another base model is refused.")

    def load(self, model, lora_name: str, strength: float):
        lora = load_lora(host.model_path("loras", lora_name))
        return (dataclasses.replace(model, loras=(*model.loras, (lora, float(strength)))),)
