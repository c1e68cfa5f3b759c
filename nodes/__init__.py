"""ComfyUI nodes: thin adapters over cogvx_core. Only nodes/host.py touches ComfyUI's own APIs."""

from . import caption, training

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

NODE_CLASS_MAPPINGS.update({"CogVXLLMLoader": caption.CogVXLLMLoader,
                            "CogVXCaptionUpsample": caption.CogVXCaptionUpsample})
NODE_DISPLAY_NAME_MAPPINGS.update({"CogVXLLMLoader": "CogVX LLM Loader",
                                   "CogVXCaptionUpsample": "CogVX Caption Upsample"})

NODE_CLASS_MAPPINGS.update({"CogVXDataset": training.CogVXDataset, "CogVXTrainLora": training.CogVXTrainLora,
                            "CogVXSaveLora": training.CogVXSaveLora, "CogVXLossPlot": training.CogVXLossPlot})
NODE_DISPLAY_NAME_MAPPINGS.update({"CogVXDataset": "CogVX Training Dataset", "CogVXTrainLora": "CogVX Train LoRA",
                                   "CogVXSaveLora": "CogVX Save LoRA", "CogVXLossPlot": "CogVX Loss Plot"})
