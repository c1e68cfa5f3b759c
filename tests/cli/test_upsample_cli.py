"""`python -m cogvx_core upsample`: prints the caption; a missing or broken model is one clear line and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cogvx_core import caption
from cogvx_core.cli import main
from tests.llm_fixtures import ChatServer, build_tiny_llm

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return build_tiny_llm(tmp_path_factory.mktemp("llm"))


def _run(capsys, *argv):
    code = main(["upsample", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_prints_the_same_caption_as_the_core(llm, capsys):
    code, out, err = _run(capsys, "--llm", llm, "--prompt", "a cat sits", "--max-new-tokens", 20, "--device", "cpu")
    assert code == 0 and err == ""
    caption.clear_cache()
    expected = caption.upsample("a cat sits", caption.load_llm(llm, device="cpu"), max_new_tokens=20)
    assert out == expected + "\n"


def test_seed_matters_only_when_sampling(llm, capsys):
    def once(*extra):
        caption.clear_cache()
        code, out, _ = _run(capsys, "--llm", llm, "--prompt", "a cat", "--max-new-tokens", 24, "--device", "cpu",
                            *extra)
        assert code == 0
        return out

    assert once("--seed", 1) == once("--seed", 2)
    assert once("--sample", "--seed", 1, "--temperature", 1.0) == once("--sample", "--seed", 1, "--temperature", 1.0)
    assert once("--sample", "--seed", 1, "--temperature", 1.0) != once("--sample", "--seed", 2, "--temperature", 1.0)


def test_token_budget_is_applied(llm, capsys):
    code, out, _ = _run(capsys, "--llm", llm, "--prompt", "a cat", "--max-new-tokens", 40, "--token-budget", 10,
                        "--device", "cpu")
    assert code == 0 and 2 <= caption.estimate_t5_tokens(out.strip()) <= 10


def test_openai_compatible_server(capsys):
    server = ChatServer().start()
    try:
        server.reply("A red fox crosses a snowy field at dawn.")
        code, out, err = _run(capsys, "--base-url", server.base_url, "--model", "qwen", "--prompt", "a fox",
                              "--max-new-tokens", 77)
    finally:
        server.stop()
    assert (code, out, err) == (0, "A red fox crosses a snowy field at dawn.\n", "")
    assert server.requests[0]["body"]["max_tokens"] == 77 and server.requests[0]["body"]["model"] == "qwen"


def _broken(tmp_path, llm, kind):
    folder = tmp_path / kind
    if kind == "no_template":
        return build_tiny_llm(folder, chat_template=None)
    folder.mkdir()
    for f in llm.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    if kind == "bad_config":
        (folder / "config.json").write_text("{")
    if kind == "truncated":
        with open(folder / "model.safetensors", "r+b") as f:
            f.truncate(64)
    return folder


@pytest.mark.parametrize("kind, message", [
    ("bad_config", "config.json is not valid JSON"),
    ("truncated", "the model could not be loaded"),
    ("no_template", "no chat template"),
])
def test_broken_model_folder_is_one_line_and_exit_2(llm, tmp_path, capsys, kind, message):
    folder = _broken(tmp_path, llm, kind)
    capsys.readouterr()  # building the folder may print save progress
    code, out, err = _run(capsys, "--llm", folder, "--prompt", "a cat", "--device", "cpu")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and str(folder) in err and message in err


@pytest.mark.parametrize("argv, message", [
    (["--base-url", "http://127.0.0.1:9/v1", "--prompt", "x"], "--base-url needs --model"),
    (["--llm", "{llm}", "--model", "m", "--prompt", "x"], "Drop --model"),
    (["--llm", "{llm}", "--prompt", "x", "--image", "{llm}/config.json"], "could not be read"),
    (["--llm", "{llm}", "--prompt", "x", "--t5-tokenizer", "/no/such/tokenizer"], "T5 tokenizer folder"),
])
def test_bad_arguments_are_one_line_and_exit_2(llm, capsys, argv, message):
    code, out, err = _run(capsys, *[a.format(llm=llm) for a in argv], "--device", "cpu")
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err


@pytest.mark.slow
def test_missing_folder_in_a_real_process_has_no_traceback(tmp_path):
    missing = tmp_path / "models" / "LLM" / "nope"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "cogvx_core", "upsample", "--llm", str(missing), "--prompt", "x"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"error: LLM folder {missing} does not exist; pass a chat model folder (config.json, "
                             "tokenizer files and *.safetensors weights), for example "
                             "models/LLM/Qwen2.5-3B-Instruct.\n")
