"""Caption upsampling: the transformers backends on tiny random chat models, the fitting to the video model's text
length, the result cache, and the OpenAI-compatible backend against a server started on loopback."""

from __future__ import annotations

import json
import re
import shutil
import socket
import time

import pytest
import torch

from cogvx_core import caption
from cogvx_core.errors import CheckpointError, CogVXError
from tests.llm_fixtures import ChatServer, build_tiny_llm, build_tiny_vlm, build_tokenizer


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return build_tiny_llm(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def llama(llama_folder):
    return caption.load_llm(llama_folder, device="cpu")


class Spy:
    """Wraps a backend's chat and records every call."""

    def __init__(self, backend):
        self.backend, self.calls = backend, []
        self._chat = backend.chat

    def __enter__(self):
        def chat(messages, **kw):
            self.calls.append((messages, kw))
            return self._chat(messages, **kw)

        self.backend.chat = chat
        return self

    def __exit__(self, *exc):
        del self.backend.chat  # back to the class method


class Scripted:
    """A backend that answers with fixed replies, in order."""

    accepts_images = False

    def __init__(self, *replies, truncated=False):
        self.replies, self.truncated, self.calls = list(replies), truncated, []
        self.cache_key = ("scripted", id(self))

    def chat(self, messages, **kw):
        self.calls.append((messages, kw))
        return caption.Reply(self.replies[min(len(self.calls), len(self.replies)) - 1], self.truncated)


class WordCounter:
    """A stand-in for the T5 tokenizer: one token per whitespace-separated word."""

    name_or_path = "words"

    def encode(self, text):
        return text.split()

    def __len__(self):
        return 1


# ---------------------------------------------------------------------------------------------------------------------
# transformers backends


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_greedy_caption_is_what_the_model_generates_after_the_chat_template(tmp_path, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_tiny_llm(tmp_path / kind, kind)
    backend = caption.load_llm(folder, device="cpu")
    assert type(backend) is caption.TransformersBackend

    text = caption.upsample("a cat sits on a chair", backend, max_new_tokens=24, token_budget=None)

    # The same generation done by hand with plain transformers.
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    messages = [{"role": "system", "content": caption.SYSTEM_PROMPT},
                {"role": "user", "content": "a cat sits on a chair"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    assert tokenizer.decode(ids[0]).rstrip().endswith("<|im_start|> assistant")  # the template ran
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    expected = " ".join(tokenizer.decode(new, skip_special_tokens=True).replace("\ufffd", " ").split())
    truncated = len(new) == 24 and new[-1] != tokenizer.eos_token_id
    if truncated and len(re.split(r"(?<=[.!?])\s+", expected)) > 1 and expected[-1] not in ".!?":
        expected = expected[: max(expected.rfind(m) for m in ".!?") + 1]  # the cut-off last sentence goes
    assert text == expected.strip()
    assert text and "\n" not in text


def test_greedy_is_deterministic_and_ignores_the_seed(llama):
    first = caption.upsample("a dog runs", llama, max_new_tokens=20, seed=1)
    caption.clear_cache()
    assert caption.upsample("a dog runs", llama, max_new_tokens=20, seed=1) == first
    caption.clear_cache()
    assert caption.upsample("a dog runs", llama, max_new_tokens=20, seed=999) == first


def test_sampling_follows_the_seed_and_leaves_the_global_rng_alone(llama):
    state = torch.get_rng_state()
    kw = dict(max_new_tokens=30, do_sample=True, temperature=1.0, token_budget=None)
    a = caption.upsample("a dog runs", llama, seed=1, **kw)
    caption.clear_cache()
    assert caption.upsample("a dog runs", llama, seed=1, **kw) == a
    b = caption.upsample("a dog runs", llama, seed=2, **kw)
    greedy = caption.upsample("a dog runs", llama, max_new_tokens=30, token_budget=None)
    assert a != b and a != greedy
    assert torch.equal(torch.get_rng_state(), state)


def test_a_long_caption_is_asked_to_shorten_once_then_fits_the_t5_budget(llama):
    t5 = build_tokenizer()  # word-level: its count is easy to check by hand
    with Spy(llama) as spy:
        text = caption.upsample("a woman walks along the beach", llama, max_new_tokens=40, token_budget=12,
                                tokenizer=t5)
    assert len(t5.encode(text)) <= 12
    assert len(spy.calls) == 2
    follow_up = spy.calls[1][0]
    assert [m["role"] for m in follow_up] == ["system", "user", "assistant", "user"]
    assert follow_up[3]["content"].startswith("That is too long")
    assert len(t5.encode(follow_up[2]["content"])) > 12  # the first answer really was over the budget


def test_cache_reuses_results_for_identical_inputs_only(llama):
    with Spy(llama) as spy:
        base = dict(max_new_tokens=16, token_budget=None)
        a = caption.upsample("a dog runs", llama, **base)
        assert caption.upsample("  a dog runs ", llama, **base) == a  # same prompt after stripping
        assert caption.upsample("a dog runs", llama, seed=7, **base) == a  # greedy: the seed changes nothing
        assert len(spy.calls) == 1
        caption.upsample("a dog runs", llama, max_new_tokens=17, token_budget=None)
        caption.upsample("a cat runs", llama, **base)
        caption.upsample("a dog runs", llama, do_sample=True, seed=1, **base)
        caption.upsample("a dog runs", llama, do_sample=True, seed=2, **base)
        caption.upsample("a dog runs", llama, do_sample=True, seed=2, temperature=0.9, **base)
        caption.upsample("a dog runs", llama, max_new_tokens=16, token_budget=200)
        caption.upsample("a dog runs", llama, max_new_tokens=16, token_budget=200, tokenizer=build_tokenizer())
        assert len(spy.calls) == 8  # one per distinct input set


def test_cache_is_bounded_and_drops_the_oldest_entry():
    backend = Scripted("A fixed caption.")
    for i in range(caption._CACHE_SIZE + 1):
        caption.upsample(f"prompt {i}", backend)
    assert len(backend.calls) == caption._CACHE_SIZE + 1
    caption.upsample(f"prompt {caption._CACHE_SIZE}", backend)  # newest: still cached
    assert len(backend.calls) == caption._CACHE_SIZE + 1
    caption.upsample("prompt 0", backend)  # oldest: evicted
    assert len(backend.calls) == caption._CACHE_SIZE + 2


def test_vision_model_gets_the_image_and_works_on_text_alone(tmp_path):
    backend = caption.load_llm(build_tiny_vlm(tmp_path / "vlm"), device="cpu")
    assert type(backend) is caption.TransformersVisionBackend and backend.accepts_images
    seen = []
    generate = backend.model.generate
    backend.model.generate = lambda **kw: (seen.append(kw), generate(**kw))[1]
    image = torch.rand(1, 40, 30, 3)  # a ComfyUI IMAGE (B, H, W, C)
    with_image = caption.upsample("a cat", backend, max_new_tokens=12, image=image)
    text_only = caption.upsample("a cat", backend, max_new_tokens=12)
    assert with_image and text_only
    image_token = backend.tokenizer.convert_tokens_to_ids("<image>")
    assert seen[0]["pixel_values"].shape == (1, 3, 28, 28)
    assert image_token in seen[0]["input_ids"][0].tolist()
    assert "pixel_values" not in seen[1] and image_token not in seen[1]["input_ids"][0].tolist()
    # a different image is a different cache entry
    caption.upsample("a cat", backend, max_new_tokens=12, image=torch.zeros(1, 40, 30, 3))
    assert len(seen) == 3


def test_templates_without_a_system_turn_get_the_instructions_in_the_user_turn():
    no_system = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                 "supported') }}{% endif %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    tokenizer = build_tokenizer(no_system)
    messages = [{"role": "system", "content": "Be vivid."}, {"role": "user", "content": "a cat"},
                {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "shorter"}]
    text = caption._apply_template(tokenizer, messages, tokenize=False)
    assert text == ("<|im_start|> user Be vivid.\n\na cat <|im_end|> <|im_start|> assistant A cat. <|im_end|> "
                    "<|im_start|> user shorter <|im_end|> <|im_start|> assistant ")


def test_text_only_model_refuses_an_image(llama):
    with pytest.raises(CogVXError, match="reads text only.*image-text-to-text"):
        caption.upsample("a cat", llama, image=torch.rand(1, 8, 8, 3))


# ---------------------------------------------------------------------------------------------------------------------
# fitting and cleaning (scripted backends: exact expectations)


def test_fitting_keeps_whole_sentences_when_the_shortened_answer_is_still_long():
    long = "One. Two two. Three three three. Four four four four."
    backend = Scripted(long, "Uno. Dos dos. Tres tres tres. Cuatro cuatro cuatro cuatro.")
    text = caption.upsample("x", backend, token_budget=7, tokenizer=WordCounter())
    assert text == "Uno. Dos dos. Tres tres tres."  # 6 words; the next sentence would make 10
    assert "at most 5 words" in backend.calls[1][0][-1]["content"]  # 10 words * 7 / 10 tokens * 0.85


def test_fitting_accepts_a_shortened_answer_that_fits():
    backend = Scripted("One. Two two. Three three three. Four four four four.", "Short enough now.")
    assert caption.upsample("x", backend, token_budget=7, tokenizer=WordCounter()) == "Short enough now."


def test_fitting_cuts_words_when_even_the_first_sentence_is_too_long():
    backend = Scripted("a b c d e f g h i j, k l m", "a b c d e f g h, i j k l m")
    assert caption.upsample("x", backend, token_budget=8, tokenizer=WordCounter()) == "a b c d e f g h."


def test_a_caption_within_the_budget_costs_one_call():
    backend = Scripted("A red fox crosses a snowy field at dawn.")
    assert caption.upsample("fox", backend) == "A red fox crosses a snowy field at dawn."
    assert len(backend.calls) == 1


def test_estimated_budget_is_used_without_a_tokenizer():
    sentence = "A red fox crosses the snowy field. "
    backend = Scripted(sentence * 40)  # 7 words + 1 mark each: far over 226 estimated tokens
    text = caption.upsample("fox", backend)
    assert caption.estimate_t5_tokens(text) <= caption.DEFAULT_TOKEN_BUDGET
    assert text.endswith(".") and len(backend.calls) == 2


def test_estimate_counts_words_marks_and_the_closing_token():
    assert caption.estimate_t5_tokens("") == 1
    assert caption.estimate_t5_tokens("a cat, 42.") == 1 + 2 + 1 + 2 + 1
    assert caption.estimate_t5_tokens("bioluminescent") > caption.estimate_t5_tokens("sunset")


@pytest.mark.parametrize("raw, truncated, expected", [
    ("<think>plan the answer</think>\nA fox runs.", False, "A fox runs."),
    ("Here is the description:\n\n\"A fox runs\nacross snow.\"", False, "A fox runs across snow."),
    ("Sure! Here's a detailed prompt: A fox runs.", False, "A fox runs."),
    ("A fox runs. It leaps over a", True, "A fox runs."),
    ("A fox runs. It leaps over a", False, "A fox runs. It leaps over a"),
    ("A fox runs and leaps over a", True, "A fox runs and leaps over a"),
    ("Okay, a fox runs. It stops: snow falls.", False, "Okay, a fox runs. It stops: snow falls."),
    ("Caption: A fox runs.", False, "A fox runs."),
])
def test_clean_reply(raw, truncated, expected):
    assert caption.clean_reply(caption.Reply(raw, truncated)) == expected


def test_bad_arguments_are_refused_with_the_fix():
    backend = Scripted("x.")
    with pytest.raises(CogVXError, match="empty"):
        caption.upsample("   ", backend)
    with pytest.raises(CogVXError, match="temperature"):
        caption.upsample("fox", backend, do_sample=True, temperature=0)
    with pytest.raises(CogVXError, match="max_new_tokens"):
        caption.upsample("fox", backend, max_new_tokens=0)
    with pytest.raises(CogVXError, match="no caption"):
        caption.upsample("fox", Scripted("  \n "))


# ---------------------------------------------------------------------------------------------------------------------
# broken model folders


def _copy(src, dst, drop=()):
    shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if n in drop])
    return dst


@pytest.mark.parametrize("breakage, message", [
    ("missing", r"does not exist"),
    ("file", r"is a file, not a folder"),
    ("no_config", r"no config\.json"),
    ("bad_json", r"config\.json is not valid JSON"),
    ("pickled", r"pickled weights.*never loaded"),
    ("no_tokenizer", r"no tokenizer files"),
    ("no_template", r"no chat template.*instruct"),
    ("truncated", r"the model could not be loaded"),
    ("unknown_arch", r"could not be loaded"),
])
def test_broken_folders_raise_one_clear_line(llama_folder, tmp_path, breakage, message):
    folder = tmp_path / "m"
    if breakage == "file":
        folder = tmp_path / "model.bin"
        folder.write_bytes(b"x")
    elif breakage == "no_template":
        build_tiny_llm(folder, chat_template=None)
    elif breakage != "missing":
        drop = {"no_config": ["config.json"], "pickled": ["model.safetensors"],
                "no_tokenizer": ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]}.get(breakage, [])
        _copy(llama_folder, folder, drop)
        if breakage == "bad_json":
            (folder / "config.json").write_text("{not json")
        if breakage == "pickled":
            (folder / "pytorch_model.bin").write_bytes(b"\x80\x02")
        if breakage == "truncated":
            with open(folder / "model.safetensors", "r+b") as f:
                f.truncate(100)
        if breakage == "unknown_arch":
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**config, "model_type": "no_such_arch"}))
    with pytest.raises(CheckpointError, match=message) as info:
        caption.load_llm(folder, device="cpu")
    assert "\n" not in str(info.value) and str(folder) in str(info.value)


# ---------------------------------------------------------------------------------------------------------------------
# OpenAI-compatible backend


@pytest.fixture
def server():
    s = ChatServer().start()
    yield s
    s.stop()


def test_http_backend_sends_an_openai_chat_request(server):
    server.reply("A red fox crosses a snowy field at dawn.")
    backend = caption.OpenAIBackend(server.base_url + "/", "qwen2.5:3b", api_key="k", timeout=10)
    assert caption.upsample("a fox", backend, max_new_tokens=99) == "A red fox crosses a snowy field at dawn."
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer k"
    body = request["body"]
    assert body["model"] == "qwen2.5:3b" and body["max_tokens"] == 99 and body["temperature"] == 0.0
    assert body["messages"] == [{"role": "system", "content": caption.SYSTEM_PROMPT},
                                {"role": "user", "content": "a fox"}]
    caption.upsample("a fox", backend, max_new_tokens=99, do_sample=True, temperature=0.9, seed=5)
    assert server.requests[1]["body"]["temperature"] == 0.9 and server.requests[1]["body"]["seed"] == 5


def test_http_backend_shortens_drops_cut_sentences_and_sends_images(server):
    server.reply("One. Two two. Three three three. Four four four four.")
    server.reply("Short. And then cut", finish_reason="length")
    backend = caption.OpenAIBackend(server.base_url, "m", timeout=10)
    assert caption.upsample("x", backend, token_budget=7, tokenizer=WordCounter()) == "Short."
    assert server.requests[1]["body"]["messages"][2]["role"] == "assistant"

    server.reply("A fox in the snow.")
    caption.upsample("x", backend, image=torch.rand(1, 16, 16, 3))
    content = server.requests[2]["body"]["messages"][1]["content"]
    assert content[0]["type"] == "image_url" and content[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert content[1] == {"type": "text", "text": "x"}
    assert caption.IMAGE_INSTRUCTIONS in server.requests[2]["body"]["messages"][0]["content"]


@pytest.mark.parametrize("answer, message", [
    ((500, b'{"error": "model crashed"}', 0), r"HTTP 500.*model crashed.*server's log"),
    ((404, b"not found", 0), r"HTTP 404.*/v1"),
    ((401, b"", 0), r"HTTP 401.*API key"),
    ((200, b"<html>hello</html>", 0), r"not an OpenAI chat completion"),
    ((200, b'{"choices": []}', 0), r"not an OpenAI chat completion"),
    ((200, b'{"choices": [{"message": {"content": null}}]}', 0), r"not an OpenAI chat completion"),
    ((200, b"{}", 3.0), r"no answer within 0\.3 s.*raise the timeout"),
])
def test_http_errors_name_the_url_and_the_fix(server, answer, message):
    server.raw(answer[1], status=answer[0], delay=answer[2])
    backend = caption.OpenAIBackend(server.base_url, "m", timeout=0.3)
    with pytest.raises(CogVXError, match=message) as info:
        caption.upsample("a fox", backend)
    assert server.base_url + "/chat/completions" in str(info.value) and "\n" not in str(info.value)


def test_timeout_holds_for_the_whole_answer_not_each_byte(server):
    """A server trickling a byte every 0.1 s never trips a 0.5 s per-read timeout; the whole answer must."""
    server.trickle(b'{"choices": [{"message": {"content": "' + b"x" * 200 + b'"}}]}', every=0.1)
    backend = caption.OpenAIBackend(server.base_url, "m", timeout=0.5)
    start = time.monotonic()
    with pytest.raises(CogVXError, match=r"no answer within 0\.5 s"):
        backend.chat([{"role": "user", "content": "hi"}], max_new_tokens=8)
    assert time.monotonic() - start < 1.5


def test_http_connection_refused():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = caption.OpenAIBackend(f"http://127.0.0.1:{port}/v1", "m", timeout=5)
    with pytest.raises(CogVXError, match=rf"127\.0\.0\.1:{port}/v1/chat/completions.*cannot be reached.*start the"):
        caption.upsample("a fox", backend)


@pytest.mark.parametrize("url, model, message", [
    ("127.0.0.1:11434/v1", "m", "not an http"),
    ("http://127.0.0.1:11434/v1", " ", "no model name"),
])
def test_http_backend_refuses_bad_settings(url, model, message):
    with pytest.raises(CogVXError, match=message):
        caption.OpenAIBackend(url, model)
