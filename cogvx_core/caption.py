"""Caption upsampling: turn a short user prompt into the long, dense caption CogVideoX was trained on.

CogVideoX learned from captions of about a hundred words that describe subjects, motion, setting, light and camera.
A short prompt sits far from that distribution and gives flat videos, so (as the paper's appendix E does) an
instruction LLM rewrites the prompt first. Everything runs offline:

    backend = load_llm("models/LLM/Qwen2.5-3B-Instruct")        # or OpenAIBackend("http://127.0.0.1:11434/v1", "qwen2.5")
    caption = upsample("a cat on a chair", backend, token_budget=226, tokenizer=t5_tokenizer)

Backends answer one chat (`Backend.chat(messages, ...) -> Reply`):
- `TransformersBackend`: a local causal-LM folder with a chat template (safetensors only, no remote code).
- `TransformersVisionBackend`: a local image-text-to-text folder (Qwen2-VL, LLaVA, Gemma 3, ...); takes a start image
  for image-to-video prompts.
- `OpenAIBackend`: an OpenAI-compatible `/chat/completions` endpoint (a llama.cpp or ollama server), stdlib only.

`upsample` is greedy and deterministic by default, keeps the result within the video model's text length (counted with
its T5 tokenizer when given, else estimated from words), and caches results for identical inputs.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import logging
import math
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .checkpoints.io import PICKLE_SUFFIXES, folder_weight_files
from .checks import parse_device
from .errors import CheckpointError, CogVXError

log = logging.getLogger(__name__)

# The text length of every released CogVideoX transformer, counted in T5 tokens including the closing </s>.
DEFAULT_TOKEN_BUDGET = 226
DEFAULT_MAX_NEW_TOKENS = 256

# Written for this project after the rules in the paper's appendix E: one description per request, and a requested
# change rewrites the whole description instead of appending to it. The length and style match the training captions
# (appendix F: about a hundred words, the content first, in the order things happen, no "The video shows").
SYSTEM_PROMPT = (
    "You write the prompts for a text-to-video model. That model was trained on long, dense captions of short video "
    "clips, so short prompts give it too little to work with. Each user message is a short idea for a clip. Turn it "
    "into a single rich description of one continuous shot, about 80 to 120 words of plain English prose.\n"
    "Cover, in the order things happen: who or what is in the shot and how they look (shape, colour, material, "
    "clothing, expression), what they do and how they move, the place and its background, the light, weather and time "
    "of day, the mood, and the framing and movement of the camera. Keep every element of the user's idea and "
    "contradict none of it; invent concrete visual details only where the idea leaves them open.\n"
    "Answer with the description and nothing else: no title, no list, no quotation marks, no line breaks, no sound or "
    "dialogue, and no opening such as \"The video shows\" or \"In this scene\"; start with the content itself.\n"
    "If the user asks you to change a description you wrote, do not simply add to it: rewrite the whole description "
    "so the change is woven in and the length stays about the same."
)

# Appended to the system prompt when a start image comes with the prompt (image-to-video).
IMAGE_INSTRUCTIONS = (
    "\nAn image comes with the idea: it is the first frame of the clip. Describe faithfully what it shows (subjects, "
    "setting, colours, light, style), then how the scene moves and develops from that frame."
)

# The follow-up turn when the first answer is longer than the video model reads.
SHORTEN_REQUEST = (
    "That is too long: the video model reads only about {words} words. Rewrite the whole description in at most "
    "{words} words, keeping the main subjects, their actions, the setting and the camera, as one paragraph."
)


# ---------------------------------------------------------------------------------------------------------------------
# Backends


@dataclass(frozen=True)
class Reply:
    text: str
    truncated: bool  # generation stopped at max_new_tokens, so the last sentence may be cut off


class Backend(Protocol):
    cache_key: tuple  # identifies the model (and anything else that changes its answers) for the result cache
    accepts_images: bool

    def chat(self, messages: list[dict], *, max_new_tokens: int, do_sample: bool, temperature: float, seed: int,
             image: Any = None) -> Reply: ...


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _file_stamp(folder: Path) -> tuple:
    """Names, sizes and modification times of a folder's files, so a replaced model never hits a stale cache."""
    return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()))


def check_llm_folder(path: str | Path) -> Path:
    """A local transformers model folder ready to load, or a CheckpointError naming what is missing and the fix."""
    folder = Path(path).expanduser()
    what = "a chat model folder (config.json, tokenizer files and *.safetensors weights)"
    if not folder.exists():
        raise CheckpointError(f"LLM folder {folder} does not exist; pass {what}, for example "
                              "models/LLM/Qwen2.5-3B-Instruct.")
    if not folder.is_dir():
        hint = " Pickled weights are never loaded." if str(folder).lower().endswith(PICKLE_SUFFIXES) else ""
        raise CheckpointError(f"LLM {folder} is a file, not a folder; pass the folder that holds it ({what}).{hint}")
    config = folder / "config.json"
    if not config.is_file():
        raise CheckpointError(f"LLM folder {folder} has no config.json, so it is not a transformers model folder; "
                              f"download the complete model folder ({what}).")
    try:
        json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"LLM folder {folder}: config.json is not valid JSON ({_one_line(e)}); the file is "
                              "corrupt, download it again.") from None
    folder_weight_files(folder, "LLM")  # safetensors only; names missing shards and refuses pickled weights
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                                                 "vocab.json", "spiece.model")):
        raise CheckpointError(f"LLM folder {folder} has no tokenizer files (tokenizer.json, tokenizer_config.json); "
                              "download the complete model folder, tokenizer included.")
    return folder


def is_image_text_to_text(folder: Path) -> bool:
    """True when the folder holds a vision-language model (an architecture transformers runs as image-text-to-text,
    with its image processor saved beside it)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    has_processor = any((folder / n).is_file() for n in ("processor_config.json", "preprocessor_config.json"))
    return model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and has_processor


def _default_device(device):
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return parse_device(device)


def _default_dtype(device, dtype):
    import torch

    if dtype is not None:
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _load_failed(folder: Path, part: str, error: BaseException) -> CheckpointError:
    reason = _one_line(error)
    if "trust_remote_code" in reason:
        fix = ("it needs custom code from the model repository, which CogVX never runs; pick a model whose "
               "architecture transformers supports natively (Qwen2.5, Llama 3, Gemma, Phi, Mistral, Qwen2-VL).")
    else:
        fix = "the folder is incomplete, corrupt or for an architecture this transformers version does not know; " \
              "download it again or update transformers."
    return CheckpointError(f"LLM folder {folder}: the {part} could not be loaded ({reason}); {fix}")


class TransformersBackend:
    """A local causal LM with a chat template, run with transformers. Greedy unless asked to sample.

    The model stays on `offload_device` between calls and moves to `device` only while it generates, so it does not
    hold GPU memory the video model needs. Weights load from safetensors only; no remote code runs.
    """

    accepts_images = False

    def __init__(self, path: str | Path, *, device=None, offload_device=None, dtype=None):
        import torch

        self.folder = check_llm_folder(path)
        self.device = _default_device(device)
        self.offload_device = torch.device(offload_device) if offload_device is not None else self.device
        self.dtype = _default_dtype(self.device, dtype)
        self._load()
        if self.chat_template is None:
            raise CheckpointError(f"LLM folder {self.folder} has no chat template, so it is a base model, not a chat "
                                  "model; use the instruct/chat version of the model (e.g. Qwen2.5-3B-Instruct).")
        self.model.eval()
        self.cache_key = (type(self).__name__, str(self.folder.resolve()), _file_stamp(self.folder), str(self.dtype),
                          self.device.type)

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder, trust_remote_code=False)
        except Exception as e:  # transformers raises OSError, ValueError, KeyError, ... for a bad folder
            raise _load_failed(self.folder, "tokenizer", e) from None
        try:
            self.model = AutoModelForCausalLM.from_pretrained(self.folder, dtype=self.dtype, use_safetensors=True,
                                                              trust_remote_code=False)
        except Exception as e:
            raise _load_failed(self.folder, "model", e) from None
        self.model.to(self.offload_device)
        self.chat_template = self.tokenizer.chat_template

    # The prompt as the model's chat template lays it out (input_ids, attention_mask, and pixel values for images).
    def _inputs(self, messages: list[dict], image) -> dict:
        if image is not None:
            raise CogVXError(f"LLM {self.folder.name} reads text only, so it cannot look at the start image; pick an "
                             "image-text-to-text model folder (e.g. Qwen2.5-VL-3B-Instruct) or leave the image out.")
        return dict(_apply_template(self.tokenizer, messages, return_dict=True, return_tensors="pt"))

    def chat(self, messages, *, max_new_tokens, do_sample=False, temperature=0.7, seed=0, image=None) -> Reply:
        import torch

        inputs = self._inputs(messages, image)
        generation = copy.deepcopy(self.model.generation_config)
        generation.max_new_tokens = int(max_new_tokens)
        generation.do_sample = bool(do_sample)
        if do_sample:
            generation.temperature = float(temperature)
        else:  # the model's sampling defaults mean nothing for greedy decoding (and make transformers warn)
            generation.temperature = generation.top_p = generation.top_k = generation.min_p = None
        tokenizer = self.tokenizer
        if generation.pad_token_id is None:
            generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
                tokenizer.eos_token_id
        on_gpu = self.device.type == "cuda"
        try:
            self.model.to(self.device)
            inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            # Sampling draws from torch's global generator: seed a private copy so the host's RNG is left untouched.
            with torch.random.fork_rng(devices=[self.device] if on_gpu else []), torch.inference_mode():
                torch.manual_seed(int(seed))
                output = self.model.generate(**inputs, generation_config=generation)
        finally:
            self.model.to(self.offload_device)
        new_tokens = output[0, inputs["input_ids"].shape[1]:].tolist()
        stops = generation.eos_token_id
        stops = set(stops if isinstance(stops, (list, tuple)) else [stops]) - {None}
        truncated = len(new_tokens) >= max_new_tokens and not (new_tokens and new_tokens[-1] in stops)
        return Reply(tokenizer.decode(new_tokens, skip_special_tokens=True), truncated)


class TransformersVisionBackend(TransformersBackend):
    """A local image-text-to-text model (AutoModelForImageTextToText + AutoProcessor): reads the start image for
    image-to-video prompts, and works on text alone too."""

    accepts_images = True

    def _load(self) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(self.folder, trust_remote_code=False)
        except Exception as e:
            raise _load_failed(self.folder, "processor", e) from None
        try:
            self.model = AutoModelForImageTextToText.from_pretrained(self.folder, dtype=self.dtype,
                                                                     use_safetensors=True, trust_remote_code=False)
        except Exception as e:
            raise _load_failed(self.folder, "model", e) from None
        self.model.to(self.offload_device)
        self.tokenizer = getattr(self.processor, "tokenizer", None)
        self.chat_template = getattr(self.processor, "chat_template", None) or \
            getattr(self.tokenizer, "chat_template", None)

    def _inputs(self, messages, image) -> dict:
        # Vision chat templates take a list of typed parts per message; the image goes first in the user's turn.
        parts, image_placed = [], image is None
        for m in messages:
            content = [{"type": "text", "text": m["content"]}]
            if m["role"] == "user" and not image_placed:
                content.insert(0, {"type": "image"})
                image_placed = True
            parts.append({"role": m["role"], "content": content})
        text = _apply_template(self.processor, parts, tokenize=False)
        images = [_to_pil(image)] if image is not None else None
        return dict(self.processor(text=[text], images=images, return_tensors="pt"))


def _apply_template(owner, messages: list[dict], **kwargs):
    """apply_chat_template with a fallback for templates that refuse a system turn (they get it in the user turn)."""
    kwargs.setdefault("add_generation_prompt", True)
    if not hasattr(owner, "tokenizer"):  # a tokenizer, not a processor (which would take it for its own option)
        kwargs["enable_thinking"] = False  # Qwen3-style templates: answer directly, no reasoning block
    try:
        return owner.apply_chat_template(messages, **kwargs)
    except Exception as e:  # jinja2 raises TemplateError (via raise_exception) for roles the template does not know
        if messages[0]["role"] != "system":
            raise CogVXError(f"the model's chat template failed ({_one_line(e)}); use a chat model whose template "
                             "takes plain user and assistant turns.") from None
    system, first, rest = messages[0], messages[1], messages[2:]
    if isinstance(first["content"], str):
        merged = {"role": "user", "content": system["content"] + "\n\n" + first["content"]}
    else:  # typed parts: the system text goes in front of the user's text part
        *head, last = first["content"]
        merged = {"role": "user", "content": head + [
            {"type": "text", "text": system["content"][-1]["text"] + "\n\n" + last["text"]}]}
    try:
        return owner.apply_chat_template([merged, *rest], **kwargs)
    except Exception as e:
        raise CogVXError(f"the model's chat template failed ({_one_line(e)}); use a chat model whose template "
                         "takes plain user and assistant turns.") from None


def _to_pil(image):
    """A PIL image from a PIL image, an (H, W, C) uint8/float array, or a ComfyUI IMAGE tensor (B, H, W, C) 0..1."""
    from PIL import Image
    import numpy as np

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = image.detach().cpu().float().numpy() if hasattr(image, "detach") else np.asarray(image)
    if array.ndim == 4:  # (B, H, W, C): the first frame is the start image
        array = array[0]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise CogVXError(f"the start image has shape {tuple(array.shape)}; pass one (H, W, C) RGB image.")
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return Image.fromarray(array[..., :3], "RGB")


class OpenAIBackend:
    """An OpenAI-compatible chat endpoint, e.g. llama.cpp's `llama-server` (http://127.0.0.1:8080/v1) or ollama
    (http://127.0.0.1:11434/v1). Uses urllib only. Every failure becomes one CogVXError with the URL and the fix."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout: float = 120.0,
                 accepts_images: bool = True):
        base_url = (base_url or "").strip().rstrip("/")
        if not re.match(r"^https?://[^/\s]+", base_url):
            raise CogVXError(f"LLM base URL {base_url!r} is not an http(s) URL; give the server's OpenAI-compatible "
                             "base, e.g. http://127.0.0.1:11434/v1 for ollama or http://127.0.0.1:8080/v1 for "
                             "llama.cpp.")
        if not (model or "").strip():
            raise CogVXError(f"no model name for the LLM server at {base_url}; give the name the server knows the "
                             "model by (ollama: `ollama list`; llama.cpp: any name).")
        if timeout <= 0:
            raise CogVXError(f"LLM timeout must be positive seconds, got {timeout}.")
        self.url = base_url if base_url.endswith("/chat/completions") else base_url + "/chat/completions"
        self.model = model.strip()
        self.api_key = api_key
        self.timeout = float(timeout)
        self.accepts_images = accepts_images
        self.cache_key = (type(self).__name__, self.url, self.model)

    def chat(self, messages, *, max_new_tokens, do_sample=False, temperature=0.7, seed=0, image=None) -> Reply:
        if image is not None:
            messages = _with_image_url(messages, _to_pil(image))
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": int(max_new_tokens),
            # Temperature 0 is greedy decoding on llama.cpp, ollama and OpenAI alike.
            "temperature": float(temperature) if do_sample else 0.0,
            "seed": int(seed) & 0x7FFFFFFF,  # servers take a 31/32-bit seed
            "stream": False,
        }
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        where = f"LLM server {self.url} (model {self.model!r})"
        deadline = time.monotonic() + self.timeout  # for the whole answer, not for each byte of it
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = _read_before(response, deadline)
        except urllib.error.HTTPError as e:
            detail = _one_line(e.read().decode("utf-8", "replace"), 200) if e.fp else ""
            fix = {404: "check the base URL (it usually ends in /v1) and that the server has this model",
                   401: "the server wants an API key", 403: "the server refused the API key"}.get(
                e.code, "see the server's log")
            raise CogVXError(f"{where} answered HTTP {e.code} {e.reason}{': ' + detail if detail else ''}; "
                             f"{fix}.") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise _timed_out(where, self.timeout) from None
            raise CogVXError(f"{where} cannot be reached ({_one_line(e.reason)}); start the server (ollama serve, "
                             "llama-server) or fix the base URL.") from None
        except (TimeoutError, socket.timeout):
            raise _timed_out(where, self.timeout) from None
        except (ConnectionError, OSError) as e:
            raise CogVXError(f"{where} dropped the connection ({_one_line(e)}); check the server's log.") from None
        try:
            answer = json.loads(raw)
            choice = answer["choices"][0]
            text = choice["message"]["content"]
            if not isinstance(text, str):
                raise TypeError(f"content is {type(text).__name__}")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise CogVXError(f"{where} sent an answer that is not an OpenAI chat completion ({_one_line(e, 120)}; "
                             f"starts {raw[:80]!r}); check that the base URL points at an OpenAI-compatible API "
                             "(usually ending in /v1).") from None
        return Reply(text, choice.get("finish_reason") == "length")


def _read_before(response, deadline: float, chunk: int = 65536) -> bytes:
    """The body, read in chunks, each read allowed only the time left: a server that trickles bytes cannot stretch
    the timeout (a socket timeout alone is per read)."""
    sock = getattr(getattr(getattr(response, "fp", None), "raw", None), "_sock", None)
    parts = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        if sock is not None:
            sock.settimeout(left)
        data = response.read1(chunk) if hasattr(response, "read1") else response.read(chunk)
        if not data:
            return b"".join(parts)
        parts.append(data)


def _timed_out(where: str, timeout: float) -> CogVXError:
    return CogVXError(f"{where} gave no answer within {timeout:g} s; raise the timeout, use a smaller model, or check "
                      "that the server is not busy.")


def _with_image_url(messages: list[dict], image) -> list[dict]:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    out, done = [], False
    for m in messages:
        if m["role"] == "user" and not done:
            m = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": m["content"]}]}
            done = True
        out.append(m)
    return out


def load_llm(path: str | Path, *, device=None, offload_device=None, dtype=None) -> TransformersBackend:
    """The right transformers backend for a local model folder: vision-language folders get the image variant."""
    folder = check_llm_folder(path)
    cls = TransformersVisionBackend if is_image_text_to_text(folder) else TransformersBackend
    return cls(folder, device=device, offload_device=offload_device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Token counting and fitting


def estimate_t5_tokens(text: str) -> int:
    """A word-based estimate of T5's token count (its closing </s> included), for when no T5 tokenizer is at hand.

    T5's sentencepiece vocabulary keeps common English words whole and splits long, rare ones into pieces of about
    four letters; punctuation marks and digits are tokens of their own. The estimate leans high so that text it
    accepts is rarely cut by the real tokenizer.
    """
    count = 1  # </s>
    for piece in re.findall(r"[^\W\d_]+|\d|[^\w\s]", text):
        if piece[0].isalpha():
            count += 1 + max(0, len(piece) - 6) // 4
        else:
            count += 1
    return count


def count_tokens(text: str, tokenizer=None) -> int:
    """Tokens the video model's text encoder sees for `text`, special tokens included.

    `tokenizer` is a transformers tokenizer (T5TokenizerFast), a `tokenizers.Tokenizer`, or anything with `encode`;
    None uses `estimate_t5_tokens`.
    """
    if tokenizer is None:
        return estimate_t5_tokens(text)
    ids = tokenizer.encode(text)
    return len(getattr(ids, "ids", ids))  # tokenizers.Tokenizer returns an Encoding


def trim_to_budget(text: str, budget: int, tokenizer=None) -> str:
    """The longest run of whole sentences from the start of `text` that fits `budget` tokens; when even the first
    sentence is too long, its longest fitting run of words, closed with a full stop."""
    if count_tokens(text, tokenizer) <= budget:
        return text
    sentences = _sentences(text)
    kept = ""
    for sentence in sentences:
        candidate = f"{kept} {sentence}".strip()
        if count_tokens(candidate, tokenizer) > budget:
            break
        kept = candidate
    if kept:
        return kept
    words = sentences[0].split() if sentences else text.split()
    lo, hi = 0, len(words)  # binary search for the most words that fit (with the added full stop)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(_close(words[:mid]), tokenizer) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return _close(words[:lo])


def _close(words: list[str]) -> str:
    text = " ".join(words).rstrip(",;:-–— ")
    return text + "." if text and text[-1] not in ".!?" else text


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


# "Sure! Here is the description:", "Caption:" ... at the start of an answer (a short first-line lead-in only).
_PREAMBLE = re.compile(r"^(?:(?:sure|certainly|of course|okay|ok)\b[^\n:.]{0,80}|here(?: is|'s)[^\n:.]{0,80}|"
                       r"(?:video )?(?:description|caption|prompt))\s*:\s*", re.IGNORECASE)


def clean_reply(reply: Reply) -> str:
    """One paragraph of caption text from a model's answer: no reasoning block, no 'Here is...' lead-in, no wrapping
    quotes, no line breaks or control characters, and no half sentence left by the token limit."""
    text = re.sub(r"<think>.*?(</think>|$)", " ", reply.text, flags=re.DOTALL).strip()
    text = _PREAMBLE.sub("", text)  # before joining lines: a lead-in ends within its first line
    # Control characters, and the replacement marks of a multi-byte character the token limit split, go.
    text = "".join(c if c.isprintable() and c != "\ufffd" else " " for c in text)
    text = " ".join(text.split())
    if len(text) >= 2 and text[0] in "\"'“[" and text[-1] in "\"'”]":
        text = text[1:-1].strip()
    if reply.truncated:  # drop the sentence the token limit cut off, when a complete one comes before it
        sentences = _sentences(text)
        if len(sentences) > 1 and sentences[-1][-1] not in ".!?\"'”":
            text = " ".join(sentences[:-1])
    return text


# ---------------------------------------------------------------------------------------------------------------------
# Upsampling with a result cache

_CACHE_SIZE = 64
_cache: OrderedDict[tuple, str] = OrderedDict()
_cache_lock = threading.Lock()


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


def _tokenizer_key(tokenizer) -> tuple | None:
    if tokenizer is None:
        return None
    size = tokenizer.get_vocab_size() if hasattr(tokenizer, "get_vocab_size") else len(tokenizer)
    return (type(tokenizer).__name__, str(getattr(tokenizer, "name_or_path", "")), size)


def _image_key(image) -> str | None:
    if image is None:
        return None
    pil = _to_pil(image)
    return hashlib.sha256(f"{pil.size}".encode() + pil.tobytes()).hexdigest()


def upsample(prompt: str, backend: Backend, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, seed: int = 0,
             do_sample: bool = False, temperature: float = 0.7, token_budget: int | None = DEFAULT_TOKEN_BUDGET,
             tokenizer=None, image=None, system_prompt: str | None = None) -> str:
    """The detailed caption for a short prompt, within `token_budget` tokens of the video model's text encoder.

    Greedy (deterministic) unless `do_sample`; then `temperature` and `seed` decide the draw. Token counts use
    `tokenizer` (the video model's T5 tokenizer) when given, else a word-based estimate. An over-long answer is sent
    back once with a request to shorten it, then cut at a sentence boundary if still too long. `token_budget=None`
    leaves the length alone. Results are cached (in memory, LRU) by every input that can change them.
    """
    prompt = (prompt or "").strip()
    if not prompt:
        raise CogVXError("the prompt to upsample is empty; write a short description of the video you want.")
    if max_new_tokens < 1:
        raise CogVXError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    if token_budget is not None and token_budget < 2:
        raise CogVXError(f"token_budget {token_budget} leaves no room for a caption; use the video model's text "
                         f"length ({DEFAULT_TOKEN_BUDGET}).")
    if do_sample and temperature <= 0:
        raise CogVXError(f"sampling needs a temperature above 0, got {temperature}; turn sampling off for greedy "
                         "decoding.")
    if image is not None and not backend.accepts_images:
        raise CogVXError("this LLM reads text only, so it cannot look at the start image; pick an image-text-to-text "
                         "model folder (e.g. Qwen2.5-VL-3B-Instruct) or leave the image out.")
    system = (system_prompt or SYSTEM_PROMPT) + (IMAGE_INSTRUCTIONS if image is not None else "")
    # Greedy output does not depend on the seed or temperature, so they only enter the key when sampling.
    key = (backend.cache_key, prompt, system, int(max_new_tokens), bool(do_sample),
           (int(seed), float(temperature)) if do_sample else None, token_budget, _tokenizer_key(tokenizer),
           _image_key(image))
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            log.info("upsample: cached result")
            return _cache[key]

    options = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, seed=seed,
                   image=image)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    reply = backend.chat(messages, **options)
    caption = clean_reply(reply)
    if not caption:
        raise CogVXError("the LLM returned no caption; raise max_new_tokens, or use an instruction-tuned chat model.")
    if token_budget is not None:
        caption = _fit(caption, messages, backend, options, token_budget, tokenizer)

    with _cache_lock:
        _cache[key] = caption
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return caption


def _fit(caption: str, messages: list[dict], backend: Backend, options: dict, budget: int, tokenizer) -> str:
    tokens = count_tokens(caption, tokenizer)
    if tokens <= budget:
        log.info("upsample: %d of %d tokens", tokens, budget)
        return caption
    # Ask once, as a follow-up turn, for a rewrite that fits (the words-per-token rate of this caption sets the
    # word limit, with a margin because the model rarely counts exactly).
    words = max(1, math.floor(len(caption.split()) * budget / tokens * 0.85))
    follow_up = messages + [{"role": "assistant", "content": caption},
                            {"role": "user", "content": SHORTEN_REQUEST.format(words=words)}]
    shorter = clean_reply(backend.chat(follow_up, **options))
    log.info("upsample: %d tokens is over the budget of %d; asked for %d words, got %d tokens", tokens, budget, words,
             count_tokens(shorter, tokenizer) if shorter else 0)
    fitted = trim_to_budget(shorter or caption, budget, tokenizer)
    return fitted or trim_to_budget(caption, budget, tokenizer)
