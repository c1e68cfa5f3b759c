"""The shipped model: small enough, the default of `generate` and `eval`, listed by the loader nodes, and run by the
tiny workflow through the nodes, making videos that follow their prompt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cogvx_core.cli import main
from cogvx_core.models import TINY_MODEL, builtin_models
from cogvx_core.recipes.analysis import judge
from cogvx_core.recipes.tiny import folder_size
from cogvx_core.video_io import read_frames

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not builtin_models(), reason=f"the built-in model is not in this checkout "
                                                               f"({TINY_MODEL}); build it with `recipe tiny`")
PROMPT = "a red circle moves to the left on a black background"


def test_it_is_small_and_says_how_it_was_made():
    assert folder_size(TINY_MODEL) <= 20_000_000
    recipe = json.loads((TINY_MODEL / "cogvx_recipe.json").read_text())
    assert recipe["vae_heldout_psnr"] > 0 and recipe["times"]["total"]["wall_s"] > 0


def test_generate_uses_it_when_no_model_is_given(tmp_path, capsys):
    out = tmp_path / "video"
    assert main(["generate", "--prompt", PROMPT, "--steps", "25", "--seed", "3", "--out", str(out)]) == 0
    frames = read_frames(out)
    assert frames.shape == (9, 64, 64, 3)  # the model's own size, not the 5b defaults
    verdict = judge(frames, PROMPT)
    assert verdict["colour"] and verdict["direction"], verdict["analysis"]


def test_eval_runs_on_it_and_reads_its_prompts(tmp_path, capsys):
    report = tmp_path / "eval.json"
    assert main(["eval", "--prompts", "6", "--steps", "20", "--samplers", "ddim", "--vae-clips", "4",
                 "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    row = data["adherence"][0]
    assert row["n"] == 6 and row["all"] >= 4 / 6, row  # the shipped model follows most held-out prompts
    assert data["vae"]["psnr"] > 25
    assert "| ddim | 20 |" in capsys.readouterr().out


def test_the_loader_nodes_list_it_first():
    from nodes import host
    from nodes.loaders import model_choices, t5_choices, vae_choices

    name = "cogvx-tiny (built in)"
    assert host.list_models("cogvideox")[0] == name
    assert model_choices()[0] == name and f"{name}/vae" in vae_choices() and f"{name}/text_encoder" in t5_choices()
    assert host.model_path("cogvideox", f"{name}/vae") == TINY_MODEL / "vae"
    with pytest.raises(FileNotFoundError):
        host.model_path("cogvideox", f"{name}/../../recipes")
    assert name not in host.list_models("vae")  # other kinds list no built-in folder


def run_api_workflow(prompt: dict, stop: str = "CogVXDecode"):
    """Runs an API-format workflow through the node classes in plain Python up to the `stop` node's output."""
    from nodes import NODE_CLASS_MAPPINGS

    done: dict[str, tuple] = {}

    def value(v):
        return done_node(v[0])[v[1]] if isinstance(v, list) else v

    def done_node(node_id):
        if node_id not in done:
            node = prompt[node_id]
            cls = NODE_CLASS_MAPPINGS[node["class_type"]]
            out = getattr(cls(), cls.FUNCTION)(**{k: value(v) for k, v in node["inputs"].items()})
            done[node_id] = out["result"] if isinstance(out, dict) else out
        return done[node_id]

    target = next(k for k, n in prompt.items() if n["class_type"] == stop)
    return done_node(target)


def test_the_tiny_workflow_runs_with_no_download():
    prompt = json.loads((ROOT / "workflows" / "api" / "cogvx_t2v_tiny.json").read_text())
    text = next(n["inputs"]["text"] for n in prompt.values() if n["_meta"]["title"] == "Prompt")
    with torch.no_grad():
        images = run_api_workflow(prompt)[0]  # IMAGE (T, H, W, 3)
    assert images.shape == (9, 64, 64, 3)
    verdict = judge(images, text)
    assert verdict["colour"] and verdict["direction"], verdict["analysis"]


@pytest.mark.slow
def test_a_lora_trained_by_the_demo_teaches_it_a_colour_it_never_drew(tmp_path):
    """`recipe lora-demo` at full scale (about a minute): the base model never draws a purple shape; after 600 LoRA
    steps it does on caption combinations the LoRA did not train on, and ordinary prompts still work."""
    from cogvx_core.recipes.demos import lora_demo

    result = lora_demo(None, tmp_path, say=lambda m: None)
    before, after = result["before"], result["after"]
    assert result["colour"] == "purple" and before["new"]["colour"] == 0
    assert after["new"]["colour"] >= 0.6 and after["new"]["all"] >= 0.5, after["new"]
    assert after["heldout"]["all"] >= before["heldout"]["all"] - 0.1, (before["heldout"], after["heldout"])
