"""The shipped workflows: up to date with their generator, valid against the nodes' inputs, UI and API twins
describing the same graph, and every model they name listed in the README's table."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from nodes import NODE_CLASS_MAPPINGS as N

ROOT = Path(__file__).resolve().parents[2]
API = sorted((ROOT / "workflows" / "api").glob("*.json"))
TEMPLATES = ROOT / "example_workflows"  # the UI files, where ComfyUI finds a pack's templates
EXPECTED = {"cogvx_t2v_2b", "cogvx_t2v_5b", "cogvx_t2v_1.5", "cogvx_i2v_5b", "cogvx_i2v_1.5", "cogvx_v2v_5b",
            "cogvx_t2v_5b_caption", "train_lora", "cogvx_t2v_tiny"}
# Core nodes: widget names in the order the frontend saves them ("upload" is LoadImage/LoadVideo's button), and
# output types. The host test checks these against a real ComfyUI's /object_info.
CORE_WIDGETS = {"LoadImage": ["image", "upload"], "LoadVideo": ["file", "upload"], "GetVideoComponents": [],
                "CreateVideo": ["fps"], "SaveVideo": ["filename_prefix", "format", "codec"], "PreviewImage": []}
CORE_OUTPUTS = {"LoadImage": ["IMAGE", "MASK"], "LoadVideo": ["VIDEO"], "GetVideoComponents": ["IMAGE", "AUDIO", "FLOAT"],
                "CreateVideo": ["VIDEO"], "SaveVideo": [], "PreviewImage": []}
MODEL_INPUTS = {("CogVXModelLoader", "model"), ("CogVXVAELoader", "vae"), ("CogVXT5Loader", "t5"),
                ("CogVXLLMLoader", "llm"), ("LoadImage", "image"), ("LoadVideo", "file"), ("CogVXDataset", "folder")}
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, "cogvx.workflows")  # scripts/make_workflows.py's


def spec(class_type):
    s = N[class_type].INPUT_TYPES()
    return {**s.get("required", {}), **s.get("optional", {})}, set(s.get("required", {}))


def output_types(class_type):
    return CORE_OUTPUTS[class_type] if class_type in CORE_OUTPUTS else list(N[class_type].RETURN_TYPES)


def ui_files() -> dict[str, Path]:
    """The UI template of each workflow, by the name of its API twin (extra.cogvx.name)."""
    return {json.loads(p.read_text())["extra"]["cogvx"]["name"]: p for p in sorted(TEMPLATES.glob("*.json"))}


def test_the_workflow_set_is_complete_and_up_to_date():
    assert {p.stem for p in API} == EXPECTED
    assert set(ui_files()) == EXPECTED and len(list(TEMPLATES.glob("*.json"))) == len(EXPECTED)
    assert not list((ROOT / "workflows").glob("*.json"))  # the UI files live in example_workflows only
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_workflows.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", API, ids=lambda p: p.stem)
def test_api_workflow_fits_the_nodes(path):
    prompt = json.loads(path.read_text())
    outputs = 0
    for node_id, node in prompt.items():
        cls = node["class_type"]
        assert cls in N or cls in CORE_WIDGETS, cls
        outputs += cls in ("SaveVideo", "CogVXSaveLora")  # a video, or the trained LoRA
        for name, value in node["inputs"].items():
            if isinstance(value, list):  # a link [node id, output index]
                src = prompt[value[0]]["class_type"]
                out_type = output_types(src)[value[1]]
                if cls in N:
                    kind = spec(cls)[0][name][0]
                    assert out_type == kind or (kind == "STRING" and out_type == "STRING"), (node_id, name)
        if cls not in N:
            continue
        inputs, required = spec(cls)
        assert set(node["inputs"]) <= set(inputs), (node_id, set(node["inputs"]) - set(inputs))
        assert required <= set(node["inputs"]), (node_id, required - set(node["inputs"]))
        for name, value in node["inputs"].items():
            kind, opts = (inputs[name] + ({},))[:2]
            if isinstance(value, list) or (cls, name) in MODEL_INPUTS:
                continue
            if isinstance(kind, list):
                assert value in kind, (node_id, name, value)
            elif kind in ("INT", "FLOAT"):
                assert opts.get("min", value) <= value <= opts.get("max", value), (node_id, name, value)
    assert outputs == 1


def ui_to_api(ui: dict) -> dict:
    """Converts a UI workflow the way the frontend's graphToPrompt does, from the widget order of the nodes."""
    links = {link[0]: link for link in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        cls = node["type"]
        if cls in CORE_WIDGETS:
            names = CORE_WIDGETS[cls]
        else:
            names = []
            for name, value in spec(cls)[0].items():
                if isinstance(value[0], list) or value[0] in WIDGET_TYPES:
                    names.append(name)
                    if name == "seed":
                        names.append("control_after_generate")
        assert len(names) == len(node["widgets_values"]), (cls, names, node["widgets_values"])
        inputs = {n: v for n, v in zip(names, node["widgets_values"]) if n not in ("upload", "control_after_generate")}
        if cls == "SaveVideo":  # ComfyUI 0.33's frontend sends the codec as the format's sub-input too
            inputs = {"filename_prefix": inputs["filename_prefix"], "format": inputs["format"],
                      "format.codec": inputs["codec"], "codec": inputs["codec"]}
        for entry in node["inputs"]:
            if entry["link"] is not None:
                link = links[entry["link"]]
                assert link[3] == node["id"]
                inputs[entry["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": cls}
    return prompt


def test_templates_are_titled_ordered_and_have_thumbnails():
    """The template browser shows a template's file name as its title and sorts by it: "CogVX <n> - <title>",
    numbered 1..N, the built-in model's workflow (the one that runs with no download) first; each has a .jpg card;
    graph ids are distinct UUIDs derived from the names (the frontend's schema check asks for a UUID)."""
    files = ui_files()
    stems = sorted(p.stem for p in files.values())
    assert [s.split(" - ")[0] for s in stems] == [f"CogVX {i + 1}" for i in range(len(stems))]
    assert files["cogvx_t2v_tiny"].stem.startswith("CogVX 1 - ") and "no download" in files["cogvx_t2v_tiny"].stem
    ids = set()
    for name, path in files.items():
        ui = json.loads(path.read_text())
        assert str(uuid.UUID(ui["id"])) == ui["id"] and ui["id"] == str(uuid.uuid5(NAMESPACE, name))
        ids.add(ui["id"])
        cogvx = ui["extra"]["cogvx"]
        assert cogvx["api"] == f"workflows/api/{name}.json" and (ROOT / cogvx["api"]).is_file()
        assert cogvx["no_download"] == (name == "cogvx_t2v_tiny")
        thumb = path.with_suffix(".jpg")
        assert thumb.is_file() and thumb.read_bytes()[:3] == b"\xff\xd8\xff", thumb  # a JPEG
        for node in ui["nodes"]:
            for model in node["properties"].get("models", []):  # download links the frontend offers
                assert set(model) == {"name", "url", "directory"} and model["url"].startswith("https://")
    assert len(ids) == len(files)


@pytest.mark.parametrize("path", API, ids=lambda p: p.stem)
def test_ui_workflow_is_the_same_graph_as_its_api_twin(path):
    ui = json.loads(ui_files()[path.stem].read_text())
    assert ui["version"] == 0.4 and ui["last_node_id"] == len(ui["nodes"]) and ui["last_link_id"] == len(ui["links"])
    api = {k: {"inputs": v["inputs"], "class_type": v["class_type"]} for k, v in json.loads(path.read_text()).items()}
    assert ui_to_api(ui) == api
    for link_id, src, slot, dst, dst_slot, kind in ui["links"]:  # both ends of every link agree
        src_node = next(n for n in ui["nodes"] if n["id"] == src)
        dst_node = next(n for n in ui["nodes"] if n["id"] == dst)
        assert link_id in src_node["outputs"][slot]["links"] and src_node["outputs"][slot]["type"] == kind
        assert dst_node["inputs"][dst_slot]["link"] == link_id


def test_readme_says_where_every_model_goes():
    readme = (ROOT / "README.md").read_text()
    for path in API:
        for node in json.loads(path.read_text()).values():
            for name, value in node["inputs"].items():
                if (node["class_type"], name) in MODEL_INPUTS:
                    assert f"`{value.split('/')[0]}`" in readme, (path.stem, value)
