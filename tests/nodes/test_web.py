"""web/cogvx.js under Node with a stand-in frontend: widgets snap to the chosen variant's rules (which come from the
node definition), notes show after a run, other nodes are untouched, and an old frontend gets one warning."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from cogvx_core.variants import VARIANTS, snap_frames, snap_request
from nodes import NODE_CLASS_MAPPINGS as N

ROOT = Path(__file__).resolve().parents[2]

HARNESS = r"""
const logs = [];
console.warn = (...a) => logs.push(a.map(String).join(" "));
const extensions = [];
const [file, frontend, defsJson, casesJson] = process.argv.slice(2);
if (frontend === "modern") {
  globalThis.window = { comfyAPI: {
    app: { app: { registerExtension: (e) => extensions.push(e) } },
    widgets: { ComfyWidgets: { STRING: (node, name) => {
      const widget = { name, value: "", options: {}, inputEl: { style: {} } };
      node.widgets.push(widget);
      return { widget };
    } } },
  } };
} else {
  globalThis.window = {};
}
const mod = await import(file);
const result = { extensions: extensions.map((e) => e.name), logs };
const cases = JSON.parse(casesJson);
result.frames = cases.frames.map(mod.snapFrames);
result.sizes = cases.sizes.map(([rule, w, h]) => mod.snapSize(rule, w, h, false));

if (extensions.length) {
  const defs = JSON.parse(defsJson);
  const makeType = (def) => {
    function T() {
      this.size = [300, 200];
      this.widgets = [];
      for (const section of ["required", "optional"]) {
        for (const [name, spec] of Object.entries(def.input[section] ?? {})) {
          if (Array.isArray(spec[0]) || ["INT", "FLOAT", "STRING", "BOOLEAN"].includes(spec[0])) {
            const value = spec[1]?.default ?? (Array.isArray(spec[0]) ? spec[0][0] : 0);
            this.widgets.push({ name, value, options: { ...spec[1] }, callback: null });
          }
        }
      }
    }
    T.prototype.onNodeCreated = function () { this.created = true; };
    T.prototype.computeSize = function () { return [320, 260]; };
    T.prototype.setSize = function (s) { this.size = s; };
    return T;
  };
  const set = (node, name, value) => {
    const w = node.widgets.find((x) => x.name === name);
    w.value = value;
    w.callback?.(value);
  };
  const get = (node) => Object.fromEntries(node.widgets.filter((w) => ["variant", "frames", "width", "height"]
    .includes(w.name)).map((w) => [w.name, w.value]));

  const types = {};
  for (const def of defs) {
    types[def.name] = makeType(def);
    await extensions[0].beforeRegisterNodeDef(types[def.name], def);
  }
  const Other = function () {};
  await extensions[0].beforeRegisterNodeDef(Other, { name: "KSampler", input: { required: {} } });
  result.otherPatched = "onNodeCreated" in Other.prototype || "onExecuted" in Other.prototype;

  const empty = new types.CogVXEmptyLatent();
  empty.onNodeCreated();
  result.chained = empty.created === true;
  const steps = [];
  set(empty, "frames", 50); steps.push(get(empty));
  set(empty, "width", 700); steps.push(get(empty));
  set(empty, "variant", "1.5-5b"); steps.push(get(empty));   // defaults follow the variant
  set(empty, "variant", "5b-i2v"); steps.push(get(empty));   // fixed 720x480
  set(empty, "height", 999); steps.push(get(empty));         // stays 720x480
  set(empty, "variant", "1.5-5b-i2v"); steps.push(get(empty));
  result.empty = steps;

  const i2v = new types.CogVXImageToVideo();
  i2v.onNodeCreated();
  set(i2v, "variant", "1.5-5b-i2v");
  result.i2vZero = get(i2v);                                 // 0 = the image's own size, kept

  empty.onExecuted({ text: ["frames 50 -> 49: the VAE needs 4k+1 frames"] });
  empty.onExecuted({ text: [] });
  const box = empty.widgets.find((w) => w.name === "cogvx_notes");
  result.notes = { value: box.value, serialize: box.serialize, optionSerialize: box.options.serialize,
                   readOnly: box.inputEl.readOnly };
  const withNotes = new types.CogVXEmptyLatent();
  withNotes.onNodeCreated();
  withNotes.onExecuted({ text: ["a", "b"] });
  result.twoLines = withNotes.widgets.find((w) => w.name === "cogvx_notes").value;
}
console.log(JSON.stringify(result));
"""


def node_defs(models_root, monkeypatch):
    """The two node definitions as /object_info serves them (the parts the extension reads)."""
    monkeypatch.setenv("COGVX_MODELS_DIR", str(models_root))
    return [{"name": name, "input": N[name].INPUT_TYPES()} for name in ("CogVXEmptyLatent", "CogVXImageToVideo")]


def run_js(tmp_path, frontend, defs, cases):
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed, so web/cogvx.js cannot be run")
    harness = tmp_path / "harness.mjs"
    harness.write_text(HARNESS)
    result = subprocess.run([node, str(harness), (ROOT / "web" / "cogvx.js").as_uri(), frontend, json.dumps(defs),
                             json.dumps(cases)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def rule(name):
    return N["CogVXEmptyLatent"].INPUT_TYPES()["required"]["variant"][1]["cogvx_rules"][name]


def test_js_rules_agree_with_the_python_rules(tmp_path, models_root, monkeypatch):
    frames = [1, 2, 3, 4, 47, 48, 49, 50, 51, 80, 83]
    sizes = [(name, w, h) for name in VARIANTS for w, h in [(720, 480), (700, 470), (1920, 1080), (480, 832),
                                                             (100, 37), (1360, 768)]]
    result = run_js(tmp_path, "modern", node_defs(models_root, monkeypatch),
                    {"frames": frames, "sizes": [[rule(n), w, h] for n, w, h in sizes]})
    assert result["frames"] == [snap_frames(f) for f in frames]
    expected = []
    for name, w, h in sizes:
        _, sh, sw, _ = snap_request(VARIANTS[name], 49, h, w, has_image=VARIANTS[name].i2v)
        expected.append([sw, sh])
    assert result["sizes"] == expected


def test_widgets_snap_and_follow_the_variant(tmp_path, models_root, monkeypatch):
    result = run_js(tmp_path, "modern", node_defs(models_root, monkeypatch), {"frames": [], "sizes": []})
    assert result["extensions"] == ["CogVX.Nodes"] and result["logs"] == []
    assert result["otherPatched"] is False and result["chained"] is True
    assert result["empty"] == [
        {"variant": "5b", "frames": 49, "width": 720, "height": 480},
        {"variant": "5b", "frames": 49, "width": 704, "height": 480},
        {"variant": "1.5-5b", "frames": 81, "width": 704, "height": 480},  # default frames follow, edited size stays
        {"variant": "5b-i2v", "frames": 49, "width": 720, "height": 480},  # 5b-I2V: 720x480 only
        {"variant": "5b-i2v", "frames": 49, "width": 720, "height": 480},
        {"variant": "1.5-5b-i2v", "frames": 81, "width": 1360, "height": 768},
    ]
    assert result["i2vZero"] == {"variant": "1.5-5b-i2v", "frames": 81, "width": 0, "height": 0}
    assert result["notes"] == {"value": "", "serialize": False, "optionSerialize": False, "readOnly": True}
    assert result["twoLines"] == "a\nb"


def test_old_frontends_get_one_warning_and_nothing_else(tmp_path, models_root, monkeypatch):
    result = run_js(tmp_path, "legacy", node_defs(models_root, monkeypatch), {"frames": [5], "sizes": []})
    assert result["extensions"] == [] and len(result["logs"]) == 1 and "[CogVX]" in result["logs"][0]
    assert result["frames"] == [5]


def test_every_node_has_a_help_page():
    for name in ("CogVXModelLoader", "CogVXVAELoader", "CogVXT5Loader", "CogVXTextEncode", "CogVXEmptyLatent",
                 "CogVXImageToVideo", "CogVXVideoEncode", "CogVXSampler", "CogVXDecode"):
        page = ROOT / "web" / "docs" / f"{name}.md"
        assert page.is_file(), page
        text = page.read_text()
        assert text.startswith(f"# {N[name].__name__}") or text.startswith("# ")
        for section in ("required", "optional"):
            for input_name in N[name].INPUT_TYPES().get(section, {}):
                assert f"`{input_name}`" in text, (name, input_name)


LOAD_ALL = r"""
const logs = [];
console.warn = (...a) => logs.push(a.map(String).join(" "));
const extensions = [];
globalThis.window = { comfyAPI: {
  app: { app: { registerExtension: (e) => extensions.push(e.name) } },
  api: { api: { addEventListener: () => {} } },
  widgets: { ComfyWidgets: {} },
} };
const registered = [];
for (const file of process.argv.slice(2)) {  // as ComfyUI does: every .js of WEB_DIRECTORY, each its own module
  const before = extensions.length;
  await import(file);
  registered.push([file.split("/").pop(), extensions.slice(before)]);
}
console.log(JSON.stringify({ registered, logs }));
"""


def test_every_web_file_loads_on_its_own_as_comfyui_loads_it(tmp_path):
    """ComfyUI imports each .js file in web/ as a module: the shared helpers (common.js) register nothing, and each
    extension registers once, with no warning."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed, so the web/ files cannot be run")
    harness = tmp_path / "load_all.mjs"
    harness.write_text(LOAD_ALL)
    files = sorted((ROOT / "web").glob("*.js"))
    result = subprocess.run([node, str(harness), *(f.as_uri() for f in files)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["logs"] == []
    assert dict(out["registered"]) == {"caption.js": ["CogVX.CaptionUpsample"], "cogvx.js": ["CogVX.Nodes"],
                                       "common.js": [], "training.js": ["CogVX.Training"]}
