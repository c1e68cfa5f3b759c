"""Test fixtures for caption upsampling: tiny random-weight chat models in the transformers folder layout, built in
the test run (no download), and an OpenAI-compatible chat server on loopback.

A tokenizer trained on a few caption sentences (word-level for Llama, so decoded output is readable words and full
stops; byte-level BPE for Qwen2), a Jinja chat template in the ChatML style, and a 2-layer, 32-wide Llama or Qwen2
causal LM; plus a LLaVA-style image-text-to-text model with its processor for the image path.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

SENTENCES = [
    "a cat sits on a red chair in a sunny room .",
    "the camera slowly pans across a quiet forest at dawn .",
    "a woman in a blue coat walks along the beach while waves roll in .",
    "golden light falls through tall trees and mist drifts over the water .",
    "a small dog runs across green grass , its ears flapping in the wind !",
    "rewrite the whole description in fewer words ?",
    "system user assistant",  # the chat roles, so the rendered template decodes readably
]
SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<image>"]

# ChatML-like: string contents, or lists of typed parts for the vision model.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    " <|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def build_tokenizer(chat_template: str | None = CHAT_TEMPLATE, *, byte_level: bool = False):
    """A word-level tokenizer (one token per word or mark: decoded output is readable words), or with
    `byte_level` a byte-level BPE one, the kind Qwen2's tokenizer class rebuilds itself from."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if byte_level:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.decoder = decoders.WordPiece()  # joins words with spaces
        trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL)
    tok.train_from_iterator(SENTENCES, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>",
                                   unk_token="<unk>", pad_token="</s>", extra_special_tokens={"image_token": "<image>"})
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def _text_config(kind: str, tokenizer):
    from transformers import LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[kind]
    return cls(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)


def build_tiny_llm(folder: Path, kind: str = "llama", *, seed: int = 0, chat_template: str | None = CHAT_TEMPLATE
                   ) -> Path:
    """Saves a random-weight chat LM (safetensors, tokenizer, chat template) into `folder` and returns it."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    # transformers rebuilds a Qwen2 tokenizer as byte-level BPE whatever was saved, so give it that kind.
    tokenizer = build_tokenizer(chat_template, byte_level=kind == "qwen2")
    cls = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}[kind]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls(_text_config(kind, tokenizer))
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_vlm(folder: Path, *, seed: int = 0) -> Path:
    """Saves a random-weight LLaVA (CLIP vision tower, Llama text model) with its processor into `folder`."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)

    tokenizer = build_tokenizer()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=28, patch_size=14)
    config = LlavaConfig(vision_config=vision, text_config=_text_config("llama", tokenizer),
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


class ChatServer:
    """A /v1/chat/completions server on 127.0.0.1 in a thread. `answers` is a list of (status, body bytes, delay s),
    served in order (the last one repeats); requests are recorded. It shuts itself down after `lifetime` seconds."""

    def __init__(self, lifetime: float = 60.0):
        self.answers, self.requests = [], []
        self.release = threading.Event()  # ends any delayed answer early at shutdown
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.requests.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
                status, payload, delay, *trickle = server.answers[min(len(server.requests), len(server.answers)) - 1]
                if delay:
                    server.release.wait(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if trickle:  # one byte at a time, each within any per-read timeout
                        for i in range(len(payload)):
                            self.wfile.write(payload[i:i + 1])
                            self.wfile.flush()
                            if server.release.wait(trickle[0]):
                                break
                    else:
                        self.wfile.write(payload)
                except OSError:  # the client gave up (timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.watchdog = threading.Timer(lifetime, self.stop)
        self.watchdog.daemon = True

    def reply(self, content, finish_reason="stop", status=200, delay=0.0):
        body = {"id": "x", "object": "chat.completion", "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": finish_reason}]}
        self.answers.append((status, json.dumps(body).encode(), delay))

    def raw(self, payload: bytes, status=200, delay=0.0):
        self.answers.append((status, payload, delay))

    def trickle(self, payload: bytes, every: float):
        """An answer sent one byte every `every` seconds (a slow or stuck server)."""
        self.answers.append((200, payload, 0.0, every))

    def start(self):
        self.thread.start()
        self.watchdog.start()
        return self

    def stop(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.watchdog.cancel()
