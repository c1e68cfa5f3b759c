"""Prompt -> T5 context for the CogVideoX transformer, exactly as diffusers' CogVideoXPipeline encodes prompts.

Each prompt is tokenized to exactly `max_length` tokens (the transformer's `max_text_seq_length`, 226 for every
released model): the prompt's tokens, EOS, then pad tokens. The encoder runs with NO attention mask, so the padding
is encoded and attended to like any token; the transformer was trained on that. A longer prompt is cut to
`max_length - 1` tokens + EOS, with a note that says how much was dropped (never an error); words the tokenizer
maps to its unknown token (a small model's word-level vocabulary lacks them) get a note naming them. `encode` logs
these notes; `encode_with_info` hands them to the caller to show. The empty negative prompt is "" (EOS + pads), not
zeros.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from .checkpoints.t5 import find_tokenizer_folder, load_t5_encoder, load_t5_tokenizer
from .errors import CogVXError

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 226  # `max_text_seq_length` of every released CogVideoX transformer
EXCERPT_CHARS = 60  # a note quotes at most this much of a prompt


@dataclass(frozen=True)
class PromptTokens:
    """How one prompt fit the text length."""

    prompt: str
    tokens: int  # tokens the whole prompt needs, EOS included
    dropped: int  # tokens cut off the end (0 when it fit)
    dropped_text: str  # what those tokens spelled ("" when nothing was cut)
    unknown: tuple[str, ...] = ()  # words the tokenizer reads as its unknown token
    notes: tuple[str, ...] = ()  # for the user: what was dropped (a short excerpt), which words are unknown


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """`text` quoted, cut to about `limit` characters at a word boundary."""
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return repr(text)


class TextEncoder:
    """A T5 encoder, its tokenizer and the text length of the transformer it feeds."""

    def __init__(self, model, tokenizer, max_length: int = DEFAULT_MAX_LENGTH):
        if len(tokenizer) > model.config.vocab_size:
            raise CogVXError(
                f"The tokenizer has {len(tokenizer)} tokens but the T5 encoder only {model.config.vocab_size}: they "
                "do not belong together. Use the T5-XXL (v1.1) tokenizer with a T5-XXL encoder.")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.last_info: list[PromptTokens] = []  # per prompt of the latest encode

    @property
    def dtype(self) -> torch.dtype:
        """The encoder's dtype (its embedding's), which the output has unless another is asked for."""
        return self.model.shared.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    @property
    def last_truncation(self) -> list[PromptTokens]:
        """The prompts of the latest encode that were too long, with what was dropped; empty when all fit."""
        return [p for p in self.last_info if p.dropped]

    def to(self, device: torch.device | str) -> "TextEncoder":
        self.model.to(device)
        return self

    def tokenize(self, prompts: list[str] | str) -> tuple[torch.Tensor, list[PromptTokens]]:
        """Token ids (B, max_length) as the reference makes them, and how each prompt fit."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise CogVXError("Prompts must be text (a string or a list of strings).")
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                             add_special_tokens=True, return_tensors="pt").input_ids  # (B, L)
        full = self.tokenizer(prompts, add_special_tokens=True, verbose=False).input_ids  # untruncated, per prompt
        info = []
        for prompt, seq in zip(prompts, full):
            dropped = max(0, len(seq) - self.max_length)
            text, notes = "", []
            if dropped:
                # The cut keeps the first max_length - 1 tokens and the closing EOS.
                text = self.tokenizer.decode(seq[self.max_length - 1: -1])
                notes.append(f"the prompt is {len(seq)} tokens (EOS included) but the text encoder takes "
                             f"{self.max_length}: the last {dropped} were dropped ({excerpt(text)}); shorten the "
                             "prompt to keep them")
            unknown = self._unknown_words(prompt, seq)
            if unknown:
                notes.append(f"the text encoder does not know {', '.join(map(repr, unknown))} (read as its unknown "
                             "token, so they steer nothing); use words from the model's captions")
            info.append(PromptTokens(prompt=prompt, tokens=len(seq), dropped=dropped, dropped_text=text,
                                     unknown=unknown, notes=tuple(notes)))
        return ids, info

    def _unknown_words(self, prompt: str, ids: list[int], most: int = 10) -> tuple[str, ...]:
        """The prompt's words (at most `most`, each once) that hold the tokenizer's unknown token."""
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if unk is None or unk not in ids:
            return ()
        words = list(dict.fromkeys(prompt.split()))
        per_word = self.tokenizer(words, add_special_tokens=False, verbose=False).input_ids
        return tuple(w for w, seq in zip(words, per_word) if unk in seq)[:most]

    @torch.no_grad()
    def encode_with_info(self, prompts: list[str] | str, dtype: torch.dtype | None = None,
                         device: torch.device | str | None = None) -> tuple[torch.Tensor, list[PromptTokens]]:
        """Context (B, max_length, d_model) and how each prompt fit. The encoder runs in its own dtype; the result is
        then cast to `dtype` (default: the encoder's) and moved to `device` (default: the encoder's)."""
        ids, info = self.tokenize(prompts)
        self.last_info = info
        hidden = self.model(ids.to(self.device))[0]  # (B, L, D); no attention mask, as the reference
        return hidden.to(dtype=dtype or self.dtype, device=device or self.device), info

    def encode(self, prompts: list[str] | str, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        """Context (B, max_length, d_model) for the transformer; see `encode_with_info`. The prompts' notes are logged
        (each once)."""
        context, info = self.encode_with_info(prompts, dtype=dtype, device=device)
        for note in dict.fromkeys(n for p in info for n in p.notes):
            logger.warning("Prompt note: %s.", note)
        return context


def load_text_encoder(path: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                      dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                      max_length: int = DEFAULT_MAX_LENGTH, operations=None,
                      weight_dtype: torch.dtype | None = None) -> TextEncoder:
    """A TextEncoder from a diffusers CogVideoX folder, its `text_encoder/` folder, or one T5 .safetensors file.

    `tokenizer`: the tokenizer folder (spiece.model or tokenizer.json). A model folder finds its own `tokenizer/`; a
    single file needs one (a `tokenizer/` folder beside it is found too). `dtype=None` keeps the checkpoint's dtype
    (bfloat16 for fp8 storage). `max_length`: the transformer's `max_text_seq_length`. `operations`: the layer
    classes (modules/ops.py); `weight_dtype`: an fp8 dtype stores the big matmul weights in it.
    """
    tokenizer_folder = find_tokenizer_folder(path, tokenizer)
    model = load_t5_encoder(path, dtype=dtype, device=device or "cpu", operations=operations,
                            weight_dtype=weight_dtype)
    return TextEncoder(model, load_t5_tokenizer(tokenizer_folder), max_length=max_length)


def fit_context(context: torch.Tensor, length: int) -> torch.Tensor:
    """Pads (with zeros) or cuts a (B, L, D) text context to the transformer's text length.

    For contexts made elsewhere (ComfyUI's CLIPTextEncode gives 77, 256 or any number of tokens). Zero padding is not
    what the reference feeds (it encodes pad tokens), so an exact match needs `TextEncoder.encode`.
    """
    if context.ndim != 3:
        raise CogVXError(f"A text context must be (batch, tokens, channels); got shape {tuple(context.shape)}. "
                         "Connect the output of a text encode node.")
    b, n, d = context.shape
    if n == length:
        return context
    if n > length:
        logger.warning("The text conditioning has %d tokens but the model takes %d: the last %d were dropped. "
                       "Shorten the prompt, or encode it with the CogVX text encoder, which pads and cuts like the "
                       "reference.", n, length, n - length)
        return context[:, :length]
    logger.info("The text conditioning has %d tokens; zero-padded to the model's %d.", n, length)
    return torch.cat([context, context.new_zeros(b, length - n, d)], dim=1)
