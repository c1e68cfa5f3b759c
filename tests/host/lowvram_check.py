"""Run by the host's own Python (tests/host/test_lowvram.py): the pack inside ComfyUI's memory manager, with a
CogVX transformer loaded through ComfyUI's partial-load path under a budget smaller than the model.

    COMFYUI_PATH=... python lowvram_check.py PACK_PARENT MODELS_DIR OUT_JSON

PACK_PARENT holds the pack as the package `cogvx` (as custom_nodes does); MODELS_DIR has cogvideox/tiny-5b and
loras/tiny.safetensors. A CPU has no VRAM to save, so ComfyUI never partial-loads by itself there: the check calls
the partial load ComfyUI makes for a card that is too small (ModelPatcher.load with a lowvram budget), then samples
and decodes through the pack's nodes exactly as a graph does, with and without a LoRA, and compares the frames with
those of a full load. Writes the frames' digests and the streamed layer counts as JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

PACK_PARENT, MODELS, OUT = sys.argv[1:4]
COMFY = os.environ["COMFYUI_PATH"]
sys.argv = [os.path.join(COMFY, "main.py"), "--cpu"]  # comfy.cli_args parses these on import
sys.path[:0] = [COMFY, PACK_PARENT]
os.chdir(COMFY)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()  # as main.py does, so --cpu applies
import comfy.model_management  # noqa: E402, F401  (sets up devices from --cpu)
import folder_paths  # noqa: E402

from cogvx.nodes import NODE_CLASS_MAPPINGS as N  # noqa: E402
from cogvx.nodes import host  # noqa: E402

assert host.IN_COMFY, "the pack did not see ComfyUI"
host.register_folders()
folder_paths.add_model_folder_path("cogvideox", os.path.join(MODELS, "cogvideox"))
folder_paths.add_model_folder_path("loras", os.path.join(MODELS, "loras"))

(model,) = N["CogVXModelLoader"]().load("tiny-5b", "fp32")
(vae,) = N["CogVXVAELoader"]().load("tiny-5b/vae", "fp32")
(t5,) = N["CogVXT5Loader"]().load("tiny-5b/text_encoder", "fp32")
(with_lora,) = N["CogVXLoraLoader"]().load(model, "tiny.safetensors", 0.8)
encode = N["CogVXTextEncode"]().encode
positive, negative = encode(t5, "a red fox runs")["result"][0], encode(t5, "")["result"][0]
latent = N["CogVXEmptyLatent"]().make("5b", 9, 64, 48, 1, model=model)["result"][0]
layer_type = type(model.transformer.transformer_blocks[0].attn1.to_q)


def frames(handle) -> np.ndarray:
    (samples,) = N["CogVXSampler"]().sample(handle, positive, negative, latent, 7, 3, 6.0, "ddim", False, 1.0)
    (images,) = N["CogVXDecode"]().decode(vae, samples, "off")
    return (images.numpy() * 255).round().astype(np.uint8)


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(a.tobytes()).hexdigest()


report = {"operations": f"{layer_type.__module__}.{layer_type.__qualname__}", "model_bytes": model.managed.size()}
report["full"] = digest(frames(model))
report["full_lora"] = digest(frames(with_lora))
report["full_streamed"] = host.streamed_layers(model.managed)

patcher = model.managed.patcher
budget = model.managed.size() // 3  # a "card" with room for a third of the weights


def partial_load(memory_required: int = 0) -> torch.device:
    """What load_models_gpu does for a model that does not fit (ComfyUI's own partial load)."""
    patcher.unpatch_model(device_to=patcher.offload_device, unpatch_weights=True)
    patcher.load(patcher.load_device, lowvram_model_memory=budget)
    return patcher.load_device


model.managed.load = partial_load  # the handle with the LoRA shares this Managed
report["partial"] = digest(frames(model))
report["partial_streamed"] = host.streamed_layers(model.managed)
report["partial_lora"] = digest(frames(with_lora))
report["partial_lora_streamed"] = host.streamed_layers(model.managed)
report["layers"] = sum(1 for m in model.transformer.modules() if hasattr(m, "comfy_cast_weights"))
with open(OUT, "w") as f:
    json.dump(report, f)
print(json.dumps(report))
