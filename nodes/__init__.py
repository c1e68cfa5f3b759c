"""ComfyUI nodes: thin adapters over cogvx_core. Only nodes/host.py touches ComfyUI's own APIs."""

from . import caption

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

NODE_CLASS_MAPPINGS.update({"CogVXLLMLoader": caption.CogVXLLMLoader,
                            "CogVXCaptionUpsample": caption.CogVXCaptionUpsample})
NODE_DISPLAY_NAME_MAPPINGS.update({"CogVXLLMLoader": "CogVX LLM Loader",
                                   "CogVXCaptionUpsample": "CogVX Caption Upsample"})
