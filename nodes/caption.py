"""Caption upsampling nodes: load an LLM, and rewrite a short prompt into a detailed CogVideoX caption.

    CogVXLLMLoader ──COGVX_LLM──▶ CogVXCaptionUpsample ──STRING──▶ (text encoder's prompt input)

The upsampled text is also shown on the node (web/caption.js renders the `ui.text` it returns).
"""

from __future__ import annotations

import os

from .core import caption, CogVXError

from . import host

OPENAI_CHOICE = "openai-compatible"
PRECISIONS = ["auto", "bf16", "fp16", "fp32"]


def _dtype(precision: str):
    import torch

    return {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


class CogVXLLMLoader:
    """A local chat model from models/LLM (one sub-folder per model), or an OpenAI-compatible server."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "llm": (host.list_models("LLM") + [OPENAI_CHOICE], {
                    "tooltip": "A chat model folder under models/LLM (transformers layout, safetensors, with a chat "
                               "template; an image-text-to-text folder also reads the I2V start image), or "
                               f"'{OPENAI_CHOICE}' to use a llama.cpp / ollama server."}),
            },
            "optional": {
                "precision": (PRECISIONS, {"default": "auto", "tooltip": "Weights dtype of a local model; auto = "
                                           "bf16 (or fp16) on GPU, fp32 on CPU."}),
                "base_url": ("STRING", {"default": "http://127.0.0.1:11434/v1", "tooltip": "OpenAI-compatible base "
                             "URL (ollama: http://127.0.0.1:11434/v1, llama.cpp: http://127.0.0.1:8080/v1). Only for "
                             f"'{OPENAI_CHOICE}'."}),
                "model": ("STRING", {"default": "", "tooltip": "The model name on the server. Only for "
                          f"'{OPENAI_CHOICE}'."}),
                "timeout_s": ("INT", {"default": 120, "min": 1, "max": 3600, "tooltip": "Seconds to wait for the "
                              "server's answer."}),
            },
        }

    RETURN_TYPES = ("COGVX_LLM",)
    RETURN_NAMES = ("llm",)
    FUNCTION = "load"
    CATEGORY = "CogVX/caption"
    DESCRIPTION = "Loads an instruction LLM for prompt upsampling, offline: a local model folder or a local server."

    @classmethod
    def IS_CHANGED(cls, llm, **_):
        # A model folder replaced on disk under the same name must load again.
        if llm == OPENAI_CHOICE:
            return llm
        try:
            folder = host.model_path("LLM", llm)
            return str(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()))
        except (FileNotFoundError, OSError):
            return llm

    def load(self, llm, precision="auto", base_url="http://127.0.0.1:11434/v1", model="", timeout_s=120):
        if llm == OPENAI_CHOICE:
            # Keys never go in a workflow file: a server that wants one reads it from the environment.
            return (caption.OpenAIBackend(base_url, model, timeout=timeout_s,
                                          api_key=os.environ.get("COGVX_LLM_API_KEY")),)
        try:
            folder = host.model_path("LLM", llm)
        except FileNotFoundError as e:
            raise CogVXError(f"{e} Put the model folder under models/LLM, or pick another.") from None
        return (caption.load_llm(folder, device=host.torch_device(), offload_device=host.offload_device(),
                                 dtype=_dtype(precision)),)


class CogVXCaptionUpsample:
    """Short prompt in, the long detailed caption CogVideoX was trained on out (and shown on the node)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "llm": ("COGVX_LLM",),
                "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "The short idea to expand."}),
                "max_new_tokens": ("INT", {"default": caption.DEFAULT_MAX_NEW_TOKENS, "min": 16, "max": 4096,
                                           "tooltip": "LLM tokens to generate at most."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": "Used only when sampling; "
                                 "greedy decoding gives one answer whatever the seed."}),
                "sample": ("BOOLEAN", {"default": False, "label_on": "sample", "label_off": "greedy",
                                       "tooltip": "Greedy decoding is deterministic; sampling varies with the seed."}),
                "temperature": ("FLOAT", {"default": 0.7, "min": 0.05, "max": 2.0, "step": 0.05,
                                          "tooltip": "Sampling temperature (only when sampling)."}),
                "token_budget": ("INT", {"default": caption.DEFAULT_TOKEN_BUDGET, "min": 16, "max": 1024,
                                         "tooltip": "The video model's text length in T5 tokens (226 for every "
                                                    "CogVideoX); a longer caption is shortened to fit."}),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "I2V start image (first frame used); needs an image-text-to-text "
                                               "model."}),
            },
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("prompt",)
    FUNCTION = "upsample"
    CATEGORY = "CogVX/caption"
    DESCRIPTION = ("Rewrites a short prompt into one vivid, detailed video description (the long captions CogVideoX "
                   "was trained on), within the video model's text length. Identical inputs reuse the last result.")

    def upsample(self, llm, prompt, max_new_tokens, seed, sample, temperature, token_budget, image=None):
        # The core caches results by every input that changes them, so a re-run (e.g. with a new seed while
        # greedy) does not generate again.
        text = caption.upsample(prompt, llm, max_new_tokens=max_new_tokens, seed=seed, do_sample=sample,
                                temperature=temperature, token_budget=token_budget, image=image)
        return {"ui": {"text": [text]}, "result": (text,)}
