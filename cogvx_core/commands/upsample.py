"""`cogvx upsample`: rewrite a short prompt into the detailed caption CogVideoX was trained on, and print it."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import CogVXError

HELP = "Rewrite a short prompt into a long, detailed video caption with a local LLM (prints the caption)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--llm", metavar="PATH", help="a local chat model folder (transformers layout, safetensors, "
                        "with a chat template), e.g. models/LLM/Qwen2.5-3B-Instruct")
    source.add_argument("--base-url", metavar="URL", help="an OpenAI-compatible server instead, e.g. "
                        "http://127.0.0.1:11434/v1 (ollama) or http://127.0.0.1:8080/v1 (llama.cpp)")
    p.add_argument("--model", metavar="NAME", help="the model name on the server (with --base-url)")
    p.add_argument("--api-key", metavar="KEY", help="bearer key, if the server wants one (with --base-url)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="S", help="seconds to wait for the server "
                   "(default 120)")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the short prompt to upsample")
    p.add_argument("--image", metavar="PATH", help="start image for image-to-video (needs an image-text-to-text "
                   "model folder or a vision model on the server)")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="LLM tokens to generate at most "
                   "(default 256)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="sampling seed (only used with --sample)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding (varies with --seed)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    p.add_argument("--token-budget", type=int, default=226, metavar="N", help="the video model's text length in T5 "
                   "tokens; longer captions are shortened (default 226; 0 = no limit)")
    p.add_argument("--t5-tokenizer", metavar="PATH", help="folder of the video model's T5 tokenizer, to count tokens "
                   "exactly (a CogVideoX folder's tokenizer/ works); without it the count is estimated from words")
    p.add_argument("--device", default=None, help="torch device for a local LLM (default: cuda when available)")


def _load_t5_tokenizer(path: str):
    folder = Path(path).expanduser()
    if (folder / "tokenizer").is_dir():  # a whole CogVideoX diffusers folder
        folder = folder / "tokenizer"
    if not folder.is_dir():
        raise CogVXError(f"T5 tokenizer folder {folder} does not exist; pass the tokenizer/ folder of a CogVideoX "
                         "model, or leave --t5-tokenizer out to estimate the count.")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise CogVXError(f"T5 tokenizer folder {folder} could not be loaded ({' '.join(str(e).split())[:200]}); "
                         "pass the tokenizer/ folder of a CogVideoX model.") from None


def run(args) -> int:
    if getattr(args, "verbose", False):
        return _run(args)
    import transformers

    # Keep stderr to the one error line: no load progress bars or warnings (restored after, for in-process callers).
    verbosity, bars_on = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        return _run(args)
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars_on:
            transformers.logging.enable_progress_bar()


def _run(args) -> int:
    from .. import caption

    if args.base_url:
        if not args.model:
            raise CogVXError("--base-url needs --model, the name the server knows the model by.")
        backend = caption.OpenAIBackend(args.base_url, args.model, api_key=args.api_key, timeout=args.timeout)
    else:
        if args.model:
            raise CogVXError("--model names a model on a server; with --llm the folder is the model. Drop --model, "
                             "or use --base-url.")
        backend = caption.load_llm(args.llm, device=args.device)
    image = None
    if args.image:
        image = _open_image(args.image)
    tokenizer = _load_t5_tokenizer(args.t5_tokenizer) if args.t5_tokenizer else None
    text = caption.upsample(args.prompt, backend, max_new_tokens=args.max_new_tokens, seed=args.seed,
                            do_sample=args.sample, temperature=args.temperature,
                            token_budget=args.token_budget or None, tokenizer=tokenizer, image=image)
    logging.getLogger(__name__).info("%d T5 tokens (%s)", caption.count_tokens(text, tokenizer),
                                     "counted" if tokenizer is not None else "estimated")
    print(text)
    return 0


def _open_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise CogVXError(f"image {path} could not be read ({' '.join(str(e).split())[:200]}); pass a PNG or JPEG "
                         "file.") from None
