"""The training nodes in plain Python (chunked runs equal one straight run, Cancel, restart, saving, the loss plot),
web/training.js under Node with a stand-in frontend, and the training workflow's UI and API twins."""

import json
import math
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import nodes
from cogvx_core.checkpoints.lora import read_lora
from cogvx_core.errors import CogVXError
from cogvx_core.lora import add_trainable_lora, applied_loras
from cogvx_core.train.plot import running_mean
from cogvx_core.train.trainer import Trainer, TrainSettings
from nodes import host, training
from nodes.training import CogVXDataset, CogVXLossPlot, CogVXSaveLora, CogVXTrainLora
from trainkit import CAPTIONS, load_parts, write_clip

ROOT = Path(__file__).resolve().parents[2]
TRAIN = dict(steps_per_run=3, total_steps=6, rank=4, alpha=2.0, learning_rate=3e-3, seed=5, batch_size=2,
             lr_schedule="cosine", warmup_steps=1)


@pytest.fixture(scope="module")
def handles(model_folder):
    """Stand-ins for the loader nodes' COGVX_MODEL / COGVX_VAE / COGVX_T5 handles (same attributes)."""
    transformer, vae, text = load_parts(model_folder("5b"))
    model = SimpleNamespace(transformer=transformer, variant=transformer.variant, scaling_factor=0.7, schedule=None)
    return model, SimpleNamespace(vae=vae), SimpleNamespace(encoder=text)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "training_data").mkdir()
    mp = pytest.MonkeyPatch()
    mp.setenv("COGVX_MODELS_DIR", str(root))
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def dataset(handles, models_dir):
    folder = models_dir / "training_data" / "clips"
    for i, n in enumerate((9, 5, 9)):
        write_clip(folder / f"c{i}", n, 40, 56, seed=i, caption=CAPTIONS[i])
    write_clip(folder / "img.png", 1, 40, 56, caption=CAPTIONS[4])
    assert "clips" in CogVXDataset.INPUT_TYPES()["required"]["folder"][0]
    out = CogVXDataset().prepare(*handles, "clips", 9, 48, 32)
    assert "4 clips" in out["ui"]["text"][0]
    return out["result"][0]


def _lora_tensors(lora):
    return {n: (l.down.clone(), l.up.clone()) for n, l in lora.layers.items()}


def _forward(transformer):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 4, 6, generator=g)
    ctx = torch.randn(1, 12, 32, generator=g)
    with torch.no_grad():
        return transformer(x, torch.tensor([500]), ctx)


def test_dataset_node_errors(handles, models_dir, tmp_path):
    with pytest.raises(CogVXError, match="choose a dataset folder"):
        CogVXDataset().prepare(*handles, "  ", 9, 48, 32)
    with pytest.raises(CogVXError, match="not in the training_data model folder"):
        CogVXDataset().prepare(*handles, str(tmp_path), 9, 48, 32)  # an arbitrary path is refused
    with pytest.raises(CogVXError, match="not in the training_data model folder"):
        CogVXDataset().prepare(*handles, "../../etc", 9, 48, 32)
    bad = models_dir / "training_data" / "bad"
    write_clip(bad / "x.mp4", 9)
    with pytest.raises(CogVXError, match=r"x\.mp4: no caption"):
        CogVXDataset().prepare(*handles, "bad", 9, 48, 32)
    assert CogVXDataset.IS_CHANGED("bad") != CogVXDataset.IS_CHANGED("bad", frames=17)


def test_chunked_runs_equal_one_straight_run_and_leave_the_model_alone(handles, dataset):
    model = handles[0]
    base = _forward(model.transformer)
    node = CogVXTrainLora()
    with torch.inference_mode():  # as ComfyUI runs nodes
        first = node.train(model, dataset, **TRAIN, unique_id="chunks")
    assert first["result"][2] == 3 and len(first["result"][1]["loss"]) == 3
    assert torch.equal(_forward(model.transformer), base)  # between runs the shared model is the base model
    with torch.inference_mode():
        second = node.train(model, dataset, **TRAIN, unique_id="chunks")
    lora, loss_map, steps = second["result"]
    assert steps == 6 and loss_map["steps"] == list(range(1, 7))
    ui = second["ui"]
    assert [p[0] for p in ui["cogvx_loss"]] == list(range(1, 7)) and ui["cogvx_total"] == [6]
    assert "step 6/6" in ui["text"][0] and "(done)" in ui["text"][0]
    assert node.train(model, dataset, **TRAIN, unique_id="chunks")["result"][2] == 6  # done: no more steps
    training.drop_session("chunks")
    assert torch.equal(_forward(model.transformer), base)

    settings = TrainSettings(steps=6, rank=4, alpha=2.0, learning_rate=3e-3, seed=5, batch_size=2, mixed_precision="no",
                             lr_schedule="cosine", warmup_steps=1)
    straight = Trainer(model.transformer, dataset, settings, scaling_factor=0.7)
    straight.run()
    expected = _lora_tensors(straight.lora())
    from cogvx_core.lora import remove_loras

    remove_loras(model.transformer)
    got = _lora_tensors(lora)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k][0], expected[k][0]) and torch.equal(got[k][1], expected[k][1]) for k in got)
    assert loss_map["loss"] == straight.losses


def test_cancel_keeps_the_state_and_the_next_run_continues(handles, dataset, tmp_path, monkeypatch):
    model = handles[0]
    pressed = {"cancel": True}

    def interrupt():  # Cancel pressed during step 2 (the check may run more than once per step)
        session = training._SESSIONS.get("cancel")
        if pressed["cancel"] and session is not None and session.trainer.step >= 2:
            pressed["cancel"] = False
            raise KeyboardInterrupt("cancelled")  # ComfyUI's interrupt exception is of its own type

    monkeypatch.setattr(host, "throw_if_interrupted", interrupt)
    node = CogVXTrainLora()
    monkeypatch.setenv("COGVX_MODELS_DIR", str(tmp_path))
    ckpt = tmp_path / "training_checkpoints" / "run1"  # checkpoint_dir is a name inside that registered folder
    with pytest.raises(CogVXError, match="not a sub-folder name"):
        node.train(model, dataset, **TRAIN, checkpoint_dir=str(tmp_path / "elsewhere"), unique_id="cancel")
    with pytest.raises(KeyboardInterrupt):
        node.train(model, dataset, **TRAIN, checkpoint_dir="run1", unique_id="cancel")
    session = training._SESSIONS["cancel"]
    assert session.trainer.step == 2 and (ckpt / "step-00000002").is_dir()  # saved on Cancel
    out = node.train(model, dataset, **TRAIN, checkpoint_dir="run1", unique_id="cancel")
    assert out["result"][2] == 5  # 3 more steps
    training.drop_session("cancel")
    # a new session (a restarted ComfyUI) resumes from the checkpoint written at the end of the last run
    resumed = node.train(model, dataset, **{**TRAIN, "steps_per_run": 1}, checkpoint_dir="run1", unique_id="new")
    assert resumed["result"][2] == 6
    restarted = node.train(model, dataset, **{**TRAIN, "steps_per_run": 1}, checkpoint_dir="run1", restart=True,
                           unique_id="new")
    assert restarted["result"][2] == 1
    # the old run's checkpoints went with the restart (the run's lock file stays)
    assert sorted(p.name for p in ckpt.iterdir()) == [".cogvx.lock", "step-00000001"]
    # a second train node on the same model takes it over (one trainer per model)
    other = node.train(model, dataset, **{**TRAIN, "steps_per_run": 1}, unique_id="other")
    assert other["result"][2] == 1 and "new" not in training._SESSIONS
    training.drop_session("other")


def test_save_and_plot_nodes(handles, dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("COGVX_MODELS_DIR", str(tmp_path / "models"))
    out = CogVXTrainLora().train(handles[0], dataset, **{**TRAIN, "steps_per_run": 2}, validation_every=1,
                                 unique_id="save")
    training.drop_session("save")
    lora, loss_map, _ = out["result"]
    saved = CogVXSaveLora().save(lora, "styles/fox")
    again = CogVXSaveLora().save(lora, "styles/fox")
    assert saved["ui"]["text"] == ["saved loras/styles/fox_2steps_00001.safetensors"]
    assert again["ui"]["text"] == ["saved loras/styles/fox_2steps_00002.safetensors"]
    back = read_lora(tmp_path / "models" / "loras" / "styles" / "fox_2steps_00001.safetensors")
    assert back.metadata["cogvx.rank"] == "4" and back.metadata["cogvx.alpha"] == "2"
    assert back.metadata["cogvx.base_variant"] == "5b" and back.metadata["cogvx.steps"] == "2"
    assert all(torch.equal(back.layers[n].up, lora.layers[n].up) for n in lora.layers)
    with pytest.raises(CogVXError, match="stay inside"):
        CogVXSaveLora().save(lora, "../outside")

    assert len(loss_map["validation"]) == 2
    (image,) = CogVXLossPlot().plot(loss_map, 0.9, 512, 256)
    assert image.shape == (1, 256, 512, 3) and 0 <= float(image.min()) and float(image.max()) <= 1
    assert float(image.std()) > 0.01  # something is drawn
    (empty,) = CogVXLossPlot().plot({"loss": [float("nan")]}, 0.9, 256, 128)
    assert empty.shape == (1, 128, 256, 3)


def test_a_failed_run_leaves_the_next_one_working(handles, dataset, monkeypatch):
    model = handles[0]
    real, failures = training.estimate, []

    def fails_once(trainer, **kwargs):  # any failure after the trainer put its LoRA on the model
        if not failures:
            failures.append(trainer)
            raise CogVXError("estimate failed")
        return real(trainer, **kwargs)

    monkeypatch.setattr(training, "estimate", fails_once)
    with pytest.raises(CogVXError, match="estimate failed"):
        CogVXTrainLora().train(model, dataset, **TRAIN, unique_id="failed")
    assert applied_loras(model.transformer) == []  # the failed session's LoRA came off
    # a LoRA left by a trainer that died half-built does not block the next run either
    add_trainable_lora(model.transformer, 2, None, ("to_q",))
    out = CogVXTrainLora().train(model, dataset, **TRAIN, unique_id="failed")
    assert out["result"][2] == 3
    training.drop_session("failed")
    assert applied_loras(model.transformer) == []


def test_the_node_shows_one_loss_display_and_its_estimate(handles, dataset, monkeypatch):
    previews, sent = [], []
    monkeypatch.setattr(host.Progress, "update", lambda self, done, preview=None: previews.append(preview))
    monkeypatch.setattr(host, "send", lambda event, data: sent.append(data))
    out = CogVXTrainLora().train(handles[0], dataset, **TRAIN, unique_id="ui")
    trainer = training._SESSIONS["ui"].trainer
    training.drop_session("ui")
    assert len(previews) == 3 and previews == [None] * 3  # no progress-bar chart beside the node's own
    ui = out["ui"]
    mean = running_mean(trainer.losses)[-1]
    assert ui["cogvx_mean"] == [pytest.approx(mean)] and sent[-1]["mean"] == pytest.approx(mean)
    assert ui["text"][0] == f"step 3/6, loss {mean:.4f} (running mean)"  # the number the chart's label shows
    assert ui["text"][1].startswith("estimate: peak memory") and "trainable parameters" in ui["text"][1]


def test_nodes_are_registered():
    for name in ("CogVXDataset", "CogVXTrainLora", "CogVXSaveLora", "CogVXLossPlot"):
        assert name in nodes.NODE_CLASS_MAPPINGS and name in nodes.NODE_DISPLAY_NAME_MAPPINGS
    assert math.isnan(CogVXTrainLora.IS_CHANGED())  # never cached: every queue run trains on


# ---------------------------------------------------------------------------------------------------------------------
# web/training.js under Node

HARNESS = r"""
const logs = [];
console.warn = (...a) => logs.push(a.map(String).join(" "));
const extensions = [];
const listeners = {};
const graphNodes = {};
globalThis.window = { comfyAPI: {
  app: { app: { registerExtension: (e) => extensions.push(e), graph: { getNodeById: (id) => graphNodes[id] } } },
  api: { api: { addEventListener: (name, fn) => { listeners[name] = fn; } } },
} };
const mod = await import(process.argv[2]);
const ext = extensions[0];
await ext.setup();
function NodeType() { this.widgets = []; this.size = [300, 100]; this.type = "CogVXTrainLora"; this.dirty = 0; }
NodeType.prototype.addCustomWidget = function (w) { this.widgets.push(w); return w; };
NodeType.prototype.computeSize = function () { return [320, 300]; };
NodeType.prototype.setSize = function (s) { this.size = s; };
NodeType.prototype.setDirtyCanvas = function () { this.dirty += 1; };
let chained = 0;
NodeType.prototype.onExecuted = function () { chained += 1; };
await ext.beforeRegisterNodeDef(NodeType, { name: "CogVXTrainLora" });
const Other = function () {};
await ext.beforeRegisterNodeDef(Other, { name: "KSampler" });
const node = new NodeType();
node.onNodeCreated();
graphNodes[7] = node;
listeners["cogvx.train.progress"]({ detail: { node: "7", step: 1, loss: 0.5, total: 10 } });
listeners["cogvx.train.progress"]({ detail: { node: "7", step: 2, loss: null, total: 10 } });
const live = JSON.parse(JSON.stringify(node.cogvxChart));
listeners["cogvx.train.progress"]({ detail: { node: "7", step: 3, loss: 0.2, mean: 0.35, total: 10 } });
const liveMean = node.cogvxChart.mean;
node.onExecuted({ cogvx_loss: [[1, 0.5], [2, null], [3, 0.25]], cogvx_validation: [[3, 0.3]], cogvx_total: [10],
                  cogvx_mean: [0.31234] });
const calls = [];
const texts = [];
const ctx = new Proxy({}, { get: (t, k) => (k in t ? t[k] : (...a) => { calls.push(k); if (k === "fillText") texts.push(a); }),
                            set: (t, k, v) => { t[k] = v; return true; } });
const widget = node.widgets.find((w) => w.name === "cogvx_loss_chart");
widget.draw(ctx, node, 320, 40);
const s = mod.scales(node.cogvxChart, { x: 0, y: 0, w: 100, h: 50 });
console.log(JSON.stringify({
  names: extensions.map((e) => e.name), logs, live, chart: node.cogvxChart, chained,
  serialize: [widget.serialize, widget.options.serialize], size: node.size, otherPatched: "onExecuted" in Other.prototype,
  strokes: calls.filter((c) => c === "stroke").length, arcs: calls.filter((c) => c === "arc").length,
  mean: mod.runningMean([1, null, 3, 2], 0.5), yTop: s.y(0.5), yBottom: s.y(0.25), xLast: s.x(10), liveMean, texts,
  clipped: calls.indexOf("clip") >= 0 && calls.indexOf("clip") < calls.indexOf("fillRect"),
}));
"""


def test_web_chart(tmp_path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed, so web/training.js cannot be run")
    harness = tmp_path / "harness.mjs"
    harness.write_text(HARNESS)
    run = subprocess.run([node, str(harness), (ROOT / "web" / "training.js").as_uri()], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    r = json.loads(run.stdout)
    assert r["names"] == ["CogVX.Training"] and r["logs"] == []
    assert r["live"] == {"points": [[1, 0.5], [2, None]], "validation": [], "total": 10, "mean": None}
    assert r["liveMean"] == 0.35  # live: the server's running mean
    assert r["chart"] == {"points": [[1, 0.5], [2, None], [3, 0.25]], "validation": [[3, 0.3]], "total": 10,
                          "mean": 0.31234}
    label = r["texts"][-1]
    assert "loss 0.3123" in label[0] and "val 0.3000" in label[0]  # the node's text formats it the same: .4f
    assert r["clipped"]  # everything drawn is clipped to the chart's rectangle, inside the node
    assert r["chained"] == 1 and r["otherPatched"] is False
    assert r["serialize"] == [False, False] and r["size"] == [320, 300]
    assert r["strokes"] == 2 and r["arcs"] == 1  # raw line, running mean, one validation dot
    assert r["mean"] == pytest.approx([x if x is None else x for x in running_mean([1, float("nan"), 3, 2], 0.5)])
    assert r["yTop"] == pytest.approx(0) and r["yBottom"] == pytest.approx(50) and r["xLast"] == pytest.approx(100)


# ---------------------------------------------------------------------------------------------------------------------
# the training workflow

WIDGETS = ("INT", "FLOAT", "STRING", "BOOLEAN")
MODEL_CHOICES = {("CogVXModelLoader", "model"), ("CogVXVAELoader", "vae"), ("CogVXT5Loader", "t5"),
                 ("CogVXDataset", "folder")}  # the installed
LOADERS = {"CogVXModelLoader": ["model", "dtype", "weight_storage", "attention"], "CogVXVAELoader": ["vae", "dtype"],
           "CogVXT5Loader": ["t5", "dtype"], "PreviewImage": []}


def _widgets(cls):
    if cls in LOADERS and cls not in nodes.NODE_CLASS_MAPPINGS:
        return LOADERS[cls]
    if cls == "PreviewImage":
        return []
    s = nodes.NODE_CLASS_MAPPINGS[cls].INPUT_TYPES()
    names = []
    for name, v in {**s["required"], **s.get("optional", {})}.items():
        if isinstance(v[0], list) or v[0] in WIDGETS:
            names += [name, "control_after_generate"] if name == "seed" else [name]
    return names


def test_training_workflow_ui_and_api_describe_one_valid_graph():
    api = json.loads((ROOT / "workflows" / "api" / "train_lora.json").read_text())
    ui = next(u for u in map(json.loads, map(Path.read_text, (ROOT / "example_workflows").glob("*.json")))
              if u["extra"]["cogvx"]["name"] == "train_lora")  # the UI template of the same workflow
    assert ui["version"] == 0.4 and ui["last_node_id"] == len(ui["nodes"]) and ui["last_link_id"] == len(ui["links"])
    links = {link[0]: link for link in ui["links"]}
    converted = {}
    for node in ui["nodes"]:
        names = _widgets(node["type"])
        assert len(names) == len(node["widgets_values"]), node["type"]
        inputs = {n: v for n, v in zip(names, node["widgets_values"]) if n != "control_after_generate"}
        for entry in node["inputs"]:
            if entry["link"] is not None:
                link = links[entry["link"]]
                inputs[entry["name"]] = [str(link[1]), link[2]]
                src = next(n for n in ui["nodes"] if n["id"] == link[1])
                assert src["outputs"][link[2]]["type"] == entry["type"] == link[5]
        converted[str(node["id"])] = {"inputs": inputs, "class_type": node["type"]}
    assert converted == {k: {"inputs": v["inputs"], "class_type": v["class_type"]} for k, v in api.items()}
    for node_id, node in api.items():
        cls = node["class_type"]
        if cls not in nodes.NODE_CLASS_MAPPINGS:
            continue  # the loaders live in nodes/loaders.py (checked above against their widget names)
        s = nodes.NODE_CLASS_MAPPINGS[cls].INPUT_TYPES()
        spec = {**s["required"], **s.get("optional", {})}
        assert set(s["required"]) <= set(node["inputs"]) <= set(spec), node_id
        for name, value in node["inputs"].items():
            kind, opts = (spec[name] + ({},))[:2]
            if isinstance(value, list):
                src = api[value[0]]["class_type"]
                if src in nodes.NODE_CLASS_MAPPINGS:
                    assert nodes.NODE_CLASS_MAPPINGS[src].RETURN_TYPES[value[1]] == kind
            elif isinstance(kind, list) and (cls, name) not in MODEL_CHOICES:
                assert value in kind
            elif kind in ("INT", "FLOAT"):
                assert opts.get("min", value) <= value <= opts.get("max", value), (node_id, name)
