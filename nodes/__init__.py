"""ComfyUI nodes: thin adapters over cogvx_core. Only nodes/host.py touches ComfyUI's own APIs.

Node ids are permanent (saved workflows refer to them): never rename one; add a new input with a default instead.
"""

from . import cache, caption, conditioning, decode, loaders, lora, sampling, training

NODES = {  # id: (class, display name)
    "CogVXModelLoader": (loaders.CogVXModelLoader, "CogVX Model Loader"),
    "CogVXVAELoader": (loaders.CogVXVAELoader, "CogVX VAE Loader"),
    "CogVXT5Loader": (loaders.CogVXT5Loader, "CogVX T5 Loader"),
    "CogVXTextEncode": (conditioning.CogVXTextEncode, "CogVX Text Encode"),
    "CogVXEmptyLatent": (conditioning.CogVXEmptyLatent, "CogVX Empty Latent"),
    "CogVXImageToVideo": (conditioning.CogVXImageToVideo, "CogVX Image to Video"),
    "CogVXVideoEncode": (conditioning.CogVXVideoEncode, "CogVX Video Encode"),
    "CogVXLoraLoader": (lora.CogVXLoraLoader, "CogVX LoRA Loader"),
    "CogVXCache": (cache.CogVXCache, "CogVX Cache"),
    "CogVXSampler": (sampling.CogVXSampler, "CogVX Sampler"),
    "CogVXDecode": (decode.CogVXDecode, "CogVX Decode"),
    "CogVXLLMLoader": (caption.CogVXLLMLoader, "CogVX LLM Loader"),
    "CogVXCaptionUpsample": (caption.CogVXCaptionUpsample, "CogVX Caption Upsample"),
    "CogVXDataset": (training.CogVXDataset, "CogVX Training Dataset"),
    "CogVXTrainLora": (training.CogVXTrainLora, "CogVX Train LoRA"),
    "CogVXSaveLora": (training.CogVXSaveLora, "CogVX Save LoRA"),
    "CogVXLossPlot": (training.CogVXLossPlot, "CogVX Loss Plot"),
}

NODE_CLASS_MAPPINGS: dict = {key: cls for key, (cls, _) in NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS: dict = {key: name for key, (_, name) in NODES.items()}
