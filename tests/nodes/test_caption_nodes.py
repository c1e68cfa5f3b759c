"""CogVXLLMLoader and CogVXCaptionUpsample as plain Python classes (the V1 contract ComfyUI reads), and
web/caption.js run under Node with a stand-in frontend."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import nodes
from cogvx_core import caption
from cogvx_core.errors import CogVXError
from nodes.caption import OPENAI_CHOICE, CogVXCaptionUpsample, CogVXLLMLoader
from tests.llm_fixtures import ChatServer, build_tiny_llm

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    build_tiny_llm(root / "LLM" / "tiny-chat")
    (root / "LLM" / "stray.txt").write_text("not a model")
    return root


@pytest.fixture
def env(models_dir, monkeypatch):
    monkeypatch.setenv("COGVX_MODELS_DIR", str(models_dir))
    return models_dir


def _inputs(**over):
    values = dict(prompt="a cat sits on a chair", max_new_tokens=20, seed=0, sample=False, temperature=0.7,
                  token_budget=226)
    values.update(over)
    return values


def test_registered_with_the_v1_contract():
    assert nodes.NODE_CLASS_MAPPINGS["CogVXLLMLoader"] is CogVXLLMLoader
    assert nodes.NODE_CLASS_MAPPINGS["CogVXCaptionUpsample"] is CogVXCaptionUpsample
    assert set(nodes.NODE_DISPLAY_NAME_MAPPINGS) >= {"CogVXLLMLoader", "CogVXCaptionUpsample"}
    for cls in (CogVXLLMLoader, CogVXCaptionUpsample):
        assert callable(getattr(cls(), cls.FUNCTION)) and cls.CATEGORY.startswith("CogVX")
    assert CogVXLLMLoader.RETURN_TYPES == ("COGVX_LLM",)
    assert CogVXCaptionUpsample.RETURN_TYPES == ("STRING",)
    spec = CogVXCaptionUpsample.INPUT_TYPES()
    assert spec["required"]["llm"] == ("COGVX_LLM",)
    assert spec["required"]["prompt"][0] == "STRING" and spec["required"]["prompt"][1]["multiline"]
    assert spec["required"]["sample"][1]["default"] is False  # greedy by default
    assert spec["optional"]["image"][0] == "IMAGE"


def test_loader_lists_model_folders_and_the_server_choice(env):
    choices = CogVXLLMLoader.INPUT_TYPES()["required"]["llm"][0]
    assert choices == ["tiny-chat", OPENAI_CHOICE]  # sub-folders only, the server last


def test_upsample_node_returns_and_shows_the_core_caption(env):
    (llm,) = CogVXLLMLoader().load("tiny-chat", precision="fp32")
    assert isinstance(llm, caption.TransformersBackend) and llm.dtype == torch.float32
    out = CogVXCaptionUpsample().upsample(llm, **_inputs())
    text = out["result"][0]
    assert out == {"ui": {"text": [text]}, "result": (text,)}
    caption.clear_cache()
    assert text == caption.upsample("a cat sits on a chair", llm, max_new_tokens=20, token_budget=226)


def test_identical_inputs_do_not_generate_again(env):
    (llm,) = CogVXLLMLoader().load("tiny-chat")
    calls = []
    chat = llm.chat
    llm.chat = lambda *a, **k: (calls.append(k), chat(*a, **k))[1]
    node = CogVXCaptionUpsample()
    first = node.upsample(llm, **_inputs())
    assert node.upsample(llm, **_inputs()) == first
    assert node.upsample(llm, **_inputs(seed=123)) == first  # greedy: a new seed is the same caption
    # A re-executed loader (new backend object, same folder) still hits the cache.
    (again,) = CogVXLLMLoader().load("tiny-chat")
    assert CogVXCaptionUpsample().upsample(again, **_inputs()) == first
    assert len(calls) == 1
    node.upsample(llm, **_inputs(sample=True, seed=1, temperature=1.0))
    assert len(calls) == 2


def test_loader_fingerprint_follows_the_folder(env):
    before = CogVXLLMLoader.IS_CHANGED("tiny-chat")
    assert CogVXLLMLoader.IS_CHANGED("tiny-chat") == before
    extra = env / "LLM" / "tiny-chat" / "notes.txt"
    extra.write_text("changed")
    try:
        assert CogVXLLMLoader.IS_CHANGED("tiny-chat") != before
    finally:
        extra.unlink()


def test_loader_errors_name_the_model(env):
    with pytest.raises(CogVXError, match="'gone' is not in the LLM model folder.*models/LLM"):
        CogVXLLMLoader().load("gone")
    with pytest.raises(CogVXError, match="escape.*not in the LLM model folder"):
        CogVXLLMLoader().load("../escape")


def test_text_model_with_an_image_says_what_to_use(env):
    (llm,) = CogVXLLMLoader().load("tiny-chat")
    with pytest.raises(CogVXError, match="image-text-to-text"):
        CogVXCaptionUpsample().upsample(llm, **_inputs(), image=torch.rand(1, 16, 16, 3))


def test_openai_compatible_choice(env):
    server = ChatServer().start()
    try:
        server.reply("A red fox crosses a snowy field at dawn.")
        (llm,) = CogVXLLMLoader().load(OPENAI_CHOICE, base_url=server.base_url, model="qwen2.5", timeout_s=5)
        out = CogVXCaptionUpsample().upsample(llm, **_inputs(prompt="a fox"))
    finally:
        server.stop()
    assert out["result"] == ("A red fox crosses a snowy field at dawn.",)
    assert server.requests[0]["body"]["model"] == "qwen2.5"
    with pytest.raises(CogVXError, match="no model name"):
        CogVXLLMLoader().load(OPENAI_CHOICE, base_url=server.base_url, model="")


# ---------------------------------------------------------------------------------------------------------------------
# web/caption.js under Node, with a stand-in for the ComfyUI frontend

HARNESS = r"""
const logs = [];
console.warn = (...a) => logs.push(a.map(String).join(" "));
const extensions = [];
if (process.argv[3] === "modern") {
  globalThis.window = { comfyAPI: {
    app: { app: { registerExtension: (e) => extensions.push(e) } },
    widgets: { ComfyWidgets: { STRING: (node, name, spec) => {
      const widget = { name, value: "", options: {}, inputEl: { style: {} } };
      node.widgets.push(widget);
      return { widget };
    } } },
  } };
} else {
  globalThis.window = {};  // an old or foreign frontend: no comfyAPI, and no /scripts/app.js beside the file
}
await import(process.argv[2]);
const result = { extensions: extensions.map((e) => e.name), logs };
if (extensions.length) {
  const calls = [];
  function NodeType() { this.widgets = [{ name: "prompt", value: "a cat" }]; this.size = [300, 200]; }
  NodeType.prototype.onExecuted = function (m) { calls.push(m); };
  NodeType.prototype.computeSize = function () { return [320, 260]; };
  NodeType.prototype.setSize = function (s) { this.size = s; };
  const Other = function () {};
  await extensions[0].beforeRegisterNodeDef(Other, { name: "KSampler" });
  await extensions[0].beforeRegisterNodeDef(NodeType, { name: "CogVXCaptionUpsample" });
  const node = new NodeType();
  node.onExecuted({ text: ["first caption"] });
  node.onExecuted({ text: ["second caption"] });
  node.onExecuted({ images: [] });
  const shown = node.widgets.filter((w) => w.name === "upsampled");
  Object.assign(result, { otherPatched: "onExecuted" in Other.prototype, chained: calls.length,
    shown: shown.map((w) => ({ value: w.value, serialize: w.serialize, optionSerialize: w.options.serialize,
                               readOnly: w.inputEl.readOnly })),
    size: node.size });
}
console.log(JSON.stringify(result));
"""


def _run_js(tmp_path, frontend):
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed, so web/caption.js cannot be run")
    harness = tmp_path / "harness.mjs"
    harness.write_text(HARNESS)
    result = subprocess.run([node, str(harness), (ROOT / "web" / "caption.js").as_uri(), frontend],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_web_extension_shows_the_text_once_and_keeps_it_out_of_the_workflow(tmp_path):
    result = _run_js(tmp_path, "modern")
    assert result["extensions"] == ["CogVX.CaptionUpsample"] and result["logs"] == []
    assert result["otherPatched"] is False  # other node types are left alone
    assert result["chained"] == 3  # the original onExecuted still runs
    assert result["shown"] == [{"value": "second caption", "serialize": False, "optionSerialize": False,
                                "readOnly": True}]
    assert result["size"] == [320, 260]


def test_web_extension_does_nothing_on_a_frontend_without_the_api(tmp_path):
    result = _run_js(tmp_path, "legacy")
    assert result["extensions"] == [] and len(result["logs"]) == 1 and "[CogVX]" in result["logs"][0]
