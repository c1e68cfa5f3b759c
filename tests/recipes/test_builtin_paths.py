"""The built-in model behaves like a released one in every path: LoRA training with the defaults (CLI and nodes),
messages that name it, notes on words it never saw, and a recipe that never overwrites it unasked."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cogvx_core.checkpoints.lora import read_lora
from cogvx_core.checkpoints.transformer import load_transformer
from cogvx_core.checkpoints.vae import load_vae
from cogvx_core.cli import build_parser, main
from cogvx_core.errors import CogVXError
from cogvx_core.models import TINY_MODEL, builtin_models
from cogvx_core.pipeline import load_pipeline
from cogvx_core.text import EXCERPT_CHARS, load_text_encoder
from nodes.conditioning import CogVXTextEncode
from nodes.training import CogVXDataset, CogVXTrainLora, drop_session

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not builtin_models(), reason=f"the built-in model is not in this checkout "
                                                               f"({TINY_MODEL}); build it with `recipe tiny`")
PROMPT = "a red circle moves to the left on a black background"


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Three synthetic clips of the model's own kind, in a training_data folder (COGVX_MODELS_DIR points there)."""
    root = tmp_path_factory.mktemp("models")
    assert main(["synth", "--out", str(root / "training_data" / "shapes"), "--n", "3", "--seed", "1"]) == 0
    mp = pytest.MonkeyPatch()
    mp.setenv("COGVX_MODELS_DIR", str(root))
    yield root / "training_data" / "shapes"
    mp.undo()


@pytest.fixture(scope="module")
def text_encoder():
    return load_text_encoder(TINY_MODEL, max_length=16)


def test_train_cli_with_the_defaults(clips, tmp_path, capsys):
    out = tmp_path / "lora.safetensors"
    assert main(["train", "--model", str(TINY_MODEL), "--data", str(clips), "--out", str(out), "--steps", "2",
                 "--rank", "4", "--cache-dir", str(tmp_path / "cache")]) == 0
    err = capsys.readouterr().err
    assert "sizes 64x64; frames 1, 9" in err  # the model's own size and frames, not 720x480x49
    assert "estimate: peak memory" in err
    assert read_lora(out).metadata["cogvx.steps"] == "2"


def _handles(text_encoder):
    transformer = load_transformer(TINY_MODEL / "transformer")
    vae = load_vae(TINY_MODEL / "vae")
    model = SimpleNamespace(transformer=transformer, variant=transformer.variant, scaling_factor=vae.scaling_factor,
                            schedule=None)
    return model, SimpleNamespace(vae=vae), SimpleNamespace(encoder=text_encoder)


def test_train_nodes_with_the_defaults(clips, text_encoder):
    model, vae, t5 = _handles(text_encoder)
    required = CogVXDataset.INPUT_TYPES()["required"]
    defaults = {k: required[k][1]["default"] for k in ("frames", "width", "height")}
    out = CogVXDataset().prepare(model, vae, t5, clips.name, **defaults)
    assert "sizes 64x64" in out["ui"]["text"][0]
    try:
        ui = CogVXTrainLora().train(model, out["result"][0], steps_per_run=2, total_steps=2, rank=4, alpha=4.0,
                                    learning_rate=1e-3, seed=0, unique_id="builtin")["ui"]
        assert ui["text"][0].startswith("step 2/2") and ui["text"][1].startswith("estimate: peak memory")
    finally:
        drop_session("builtin")
    with pytest.raises(CogVXError, match=r"cogvx-tiny has learned positions for 64x64 only"):
        CogVXDataset().prepare(model, vae, t5, clips.name, 9, 128, 64)


def test_messages_name_the_model_and_sizes_default_to_its_own():
    pipe = load_pipeline(TINY_MODEL)
    assert pipe.transformer.name == "cogvx-tiny"
    with pytest.raises(CogVXError) as refused:
        pipe.generate(PROMPT, image=torch.zeros(1, 3, 64, 64), steps=1)
    assert "cogvx-tiny is a text-to-video model" in str(refused.value)
    assert "CogVideoX-5b" not in str(refused.value)
    result = pipe.generate(PROMPT, steps=1)
    assert (result.frames_count, result.height, result.width) == (9, 64, 64)  # not the 5b's 49 x 720x480


def test_unknown_words_and_long_prompts_get_short_notes(text_encoder, caplog):
    _, info = text_encoder.encode_with_info([PROMPT, "a red zorblax moves to the left on a black background"])
    assert info[0].unknown == () and info[0].notes == ()
    assert info[1].unknown == ("zorblax",)
    assert len(info[1].notes) == 1 and "'zorblax'" in info[1].notes[0]

    long_prompt = " ".join([PROMPT] * 12)
    with caplog.at_level(logging.WARNING, logger="cogvx_core.text"):
        text_encoder.encode([long_prompt])
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "were dropped" in notes[0]  # once, however long the prompt
    quoted = notes[0].split("(", 2)[2].split(")")[0]  # the excerpt of what was dropped
    assert len(quoted) <= EXCERPT_CHARS + 8 and quoted.endswith("...'")


def test_text_encode_node_shows_the_unknown_words(text_encoder):
    t5 = SimpleNamespace(encoder=text_encoder, managed=SimpleNamespace(load=lambda: torch.device("cpu")))
    out = CogVXTextEncode().encode(t5, "a purple zorblax moves up on a gray background")
    assert len(out["ui"]["text"]) == 1 and "'zorblax'" in out["ui"]["text"][0]
    assert CogVXTextEncode().encode(t5, PROMPT)["ui"]["text"] == []


@pytest.mark.slow
def test_generate_prints_each_note_once(tmp_path):
    run = subprocess.run([sys.executable, "-m", "cogvx_core", "generate", "--prompt", PROMPT + " zorblax",
                          "--frames", "10", "--steps", "1", "--out", str(tmp_path / "v.gif")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("frames 10 -> 9") == 1
    assert run.stderr.count("'zorblax'") == 1


def test_recipe_never_overwrites_the_shipped_model_unasked(tmp_path, capsys):
    work = tmp_path / "work"
    assert main(["recipe", "tiny", "--smoke", "--out", str(TINY_MODEL), "--work", str(work)]) == 2
    assert "--replace-builtin" in capsys.readouterr().err
    assert not work.exists()  # refused before any work
    args = build_parser("recipe").parse_args(["recipe", "tiny"])
    assert Path(args.out).resolve() != TINY_MODEL.resolve() and not args.replace_builtin


def test_a_graph_with_the_built_in_model_snaps_sizes_to_its_own(text_encoder):
    """The empty-latent node's widgets default to the 5b's 720x480; with cogvx-tiny connected they snap to the size
    its learned positions fix, and say so (the sampler would refuse 720x480); the pipeline does the same."""
    from nodes.conditioning import CogVXEmptyLatent

    model, _, _ = _handles(text_encoder)
    out = CogVXEmptyLatent().make("5b", 49, 720, 480, 1, model=model)
    assert out["result"][0]["samples"].shape == (1, 16, 13, 8, 8)  # 64x64
    assert any("720x480 -> 64x64" in n and "cogvx-tiny" in n for n in out["ui"]["text"])
    result = load_pipeline(TINY_MODEL).generate(PROMPT, height=480, width=720, steps=1, decode_frames=False)
    assert (result.height, result.width) == (64, 64) and "720x480 -> 64x64" in " ".join(result.notes)
