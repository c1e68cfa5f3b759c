"""The pack inside a real ComfyUI server, driven through its HTTP/websocket API like any client.

Needs a ComfyUI tree and its Python: COMFYUI_PATH=DIR COMFYUI_PYTHON=DIR/.venv/bin/python (build them with
scripts/setup_comfyui_host.sh). The server runs on a free loopback port with --cpu, this pack in custom_nodes and
small random models (named as the workflows name them) in temporary model folders; it is stopped at the end.

Checked: every node id in /object_info (and the core nodes the workflows use, with the inputs the workflows give
them); every API workflow, shrunk for a CPU, runs through POST /prompt to success with progress and live previews;
a missing model is refused at validation; a failing node reports execution_error and the server keeps serving;
Cancel stops a run within a step; a resubmitted prompt is served from the cache; models go through ComfyUI's memory
manager; one workflow runs through comfy-cli's `comfy run`; every template (example_workflows/) is listed with its
thumbnail and loads in the host's own frontend with the zod schema check on, raising no alert.
Hosts it passes on: ComfyUI 0.3.54, 0.20.1 and 0.33.0 (scripts/setup_comfyui_host.sh says which commits).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.host.host_env import require_host

ROOT = Path(__file__).resolve().parents[2]
COMFYUI_PATH, COMFYUI_PYTHON = require_host("run the pack inside a real ComfyUI server")

from builders import randomize_, write_pipeline_folder  # noqa: E402
from cogvx_core.models import builtin_models  # noqa: E402
from tests.llm_fixtures import build_tiny_llm  # noqa: E402
from tests.nodes.model_files import write_single_file_vae  # noqa: E402
from tests.nodes.test_workflows import CORE_WIDGETS  # noqa: E402

NODE_IDS = ["CogVXModelLoader", "CogVXVAELoader", "CogVXT5Loader", "CogVXTextEncode", "CogVXEmptyLatent",
            "CogVXImageToVideo", "CogVXVideoEncode", "CogVXSampler", "CogVXDecode", "CogVXLLMLoader",
            "CogVXCaptionUpsample"]
FOLDERS = {"CogVideoX-2b": "2b", "CogVideoX-5b": "5b", "CogVideoX-5b-I2V": "5b-i2v", "CogVideoX1.5-5B": "1.5-5b",
           "CogVideoX1.5-5B-I2V": "1.5-5b-i2v"}
WORKFLOWS = sorted((ROOT / "workflows" / "api").glob("*.json"))
TEMPLATES = {p.stem: p for p in sorted((ROOT / "example_workflows").glob("*.json"))}  # the UI files, by name
PACK = "cogvx"  # the pack's folder name in custom_nodes (build_base links it so)
CLIENT = Path(__file__).with_name("comfy_client.py")
PREVIEW_EVENTS = {"1", "2", "4"}  # PREVIEW_IMAGE, UNENCODED_PREVIEW_IMAGE, PREVIEW_IMAGE_WITH_METADATA


# ---------------------------------------------------------------------------------------------------------------
# The models and inputs, in a ComfyUI base directory
# ---------------------------------------------------------------------------------------------------------------
def write_t5_single_file(path: Path, d_model: int) -> None:
    """A random T5 v1.1 encoder as one file in ComfyUI's t5xxl layout, with the vocabulary of ComfyUI's bundled
    T5-XXL tokenizer (which the loader uses for single files)."""
    from safetensors.torch import save_file
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(5)
    config = T5Config(vocab_size=32128, d_model=d_model, d_ff=48, d_kv=8, num_heads=4, num_layers=2,
                      feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, dropout_rate=0.0)
    model = randomize_(T5EncoderModel(config).eval(), seed=5, qk_gain=1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().clone().contiguous().half() for k, v in model.state_dict().items()}, path)


def write_inputs(input_dir: Path) -> None:
    from PIL import Image

    from cogvx_core.video_io import write_frames

    input_dir.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 64)[None, :, None] * np.ones((48, 1, 3))
    Image.fromarray(np.clip(ramp + g.normal(0, 20, (48, 64, 3)), 0, 255).astype(np.uint8)).save(
        input_dir / "cogvx_start.png")
    frames = torch.from_numpy(np.stack([np.roll(ramp, 4 * i, axis=1) for i in range(9)])).float() / 255
    write_frames(frames, input_dir / "cogvx_input.mp4", fps=8)


def build_base(base: Path) -> None:
    (base / "custom_nodes").mkdir(parents=True)
    os.symlink(ROOT, base / "custom_nodes" / PACK, target_is_directory=True)
    models = base / "models"
    for name, variant in FOLDERS.items():
        write_pipeline_folder(models / "cogvideox" / name, variant, seed=len(name))
    five = models / "cogvideox" / "CogVideoX-5b"
    (models / "diffusion_models").mkdir(parents=True)
    shutil.copy(five / "transformer" / "diffusion_pytorch_model.safetensors",
                models / "diffusion_models" / "cogvideox_5b_bf16.safetensors")
    write_single_file_vae(five / "vae", models / "vae" / "cogvideox_vae.safetensors")
    width = json.loads((five / "transformer" / "config.json").read_text())["text_embed_dim"]
    write_t5_single_file(models / "text_encoders" / "t5xxl_fp16.safetensors", width)
    build_tiny_llm(models / "LLM" / "Qwen2.5-3B-Instruct")
    write_inputs(base / "input")
    from tests.train.trainkit import write_clip

    for i, n in enumerate((9, 5)):  # the training workflow's dataset folder
        write_clip(models / "training_data" / "my_clips" / f"clip{i}.mp4", n, 48, 64, seed=i,
                   caption=f"a small red fox runs along the river, take {i}")


# ---------------------------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base: Path, home: Path):
        self.base, self.home = base, home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "server.log"
        self.log = open(self.log_path, "w")
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", HOME=str(home))
        env.pop("COGVX_MODELS_DIR", None)
        self.proc = subprocess.Popen(
            [COMFYUI_PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", str(base), "--database-url", "sqlite:///:memory:", "--preview-method", "auto"],
            cwd=COMFYUI_PATH, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.text()[-4000:]}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1)
        raise RuntimeError(f"ComfyUI did not answer within {timeout} s:\n{self.text()[-4000:]}")

    def get(self, path: str, raw: bool = False):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            data = r.read()
        return data if raw else json.loads(data)

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def run(self, prompt: dict, tmp: Path, *, interrupt_after: int = 0, timeout: float = 300) -> dict:
        """Queues the prompt through the websocket client (run by the host's python) and returns its record."""
        prompt_file, out_file = tmp / "prompt.json", tmp / "result.json"
        prompt_file.write_text(json.dumps(prompt))
        subprocess.run([COMFYUI_PYTHON, str(CLIENT), self.url, str(prompt_file), str(out_file),
                        "--interrupt-after-progress", str(interrupt_after), "--timeout", str(timeout)],
                       check=True, timeout=timeout + 60)
        return json.loads(out_file.read_text())

    def text(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_base")
    build_base(base)
    home = tmp_path_factory.mktemp("home")
    srv = Server(base, home)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------------------------
# Workflows shrunk for a CPU
# ---------------------------------------------------------------------------------------------------------------
def shrunk(path: Path, steps: int = 2) -> dict:
    """The API workflow with small sizes and few steps; models and wiring as shipped."""
    prompt = json.loads(path.read_text())
    for node in prompt.values():
        inputs, cls = node["inputs"], node["class_type"]
        if cls == "CogVXEmptyLatent" and inputs["width"] * inputs["height"] > 64 * 64:  # the built-in model's
            inputs.update(frames=9, width=64, height=48)  # 64x64 (its position table's size) stays
        elif cls == "CogVXImageToVideo":
            inputs["frames"] = 9
            if inputs["variant"] == "5b-i2v":  # the small model's learned position table is for 192x128
                inputs.update(width=192, height=128)
        elif cls == "CogVXVideoEncode":
            inputs.update(frames=9, width=64, height=48)
        elif cls == "CogVXSampler":
            inputs["steps"] = steps
        elif cls == "CogVXCaptionUpsample":
            inputs["max_new_tokens"] = 16
        elif cls == "CogVXDataset":
            inputs.update(frames=9, width=64, height=48)
        elif cls == "CogVXTrainLora":
            inputs.update(steps_per_run=steps, total_steps=steps, rank=4, alpha=4.0, warmup_steps=0,
                          validation_every=0)
        elif cls == "CogVXLossPlot":
            inputs.update(width=256, height=128)
    return prompt


def node_of(prompt: dict, class_type: str) -> str:
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)


def events(record: dict) -> list[str]:
    return [kind for kind, _ in record["messages"]]


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------
def test_every_node_is_registered_with_its_inputs(server):
    info = server.get("/object_info")
    assert set(NODE_IDS) <= set(info)
    ours = [k for k, v in info.items() if v.get("python_module", "").endswith(f"custom_nodes.{PACK}")]
    assert set(NODE_IDS) <= set(ours), set(NODE_IDS) - set(ours)
    for node_id in ours:  # every node sits in a folder of the CogVX menu
        category = info[node_id]["category"]
        assert category.startswith("CogVX/") and category.count("/") == 1, (node_id, category)
        assert info[node_id]["display_name"].startswith("CogVX"), node_id
    required = info["CogVXModelLoader"]["input"]["required"]
    builtin = ["cogvx-tiny (built in)"] if builtin_models() else []  # the shipped model comes first
    assert required["model"][0] == builtin + sorted(FOLDERS) + ["cogvideox_5b_bf16.safetensors"]
    assert "cogvideox_vae.safetensors" in info["CogVXVAELoader"]["input"]["required"]["vae"][0]
    assert "t5xxl_fp16.safetensors" in info["CogVXT5Loader"]["input"]["required"]["t5"][0]
    assert "cogvx_rules" in info["CogVXEmptyLatent"]["input"]["required"]["variant"][1]
    for cls, widgets in CORE_WIDGETS.items():  # the core nodes the workflows use, with those inputs
        assert cls in info, cls
        spec = {**info[cls]["input"]["required"], **info[cls]["input"].get("optional", {})}
        assert {w for w in widgets if w != "upload"} <= set(spec), (cls, set(spec))
    scripts = server.get("/extensions")
    assert "/extensions/cogvx/cogvx.js" in scripts
    assert b"# CogVX Sampler" in server.get("/extensions/cogvx/docs/CogVXSampler.md", raw=True)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_api_workflow_runs_to_success(server, path, tmp_path):
    prompt = shrunk(path)
    record = server.run(prompt, tmp_path)
    assert record["status"] == 200 and record["reply"]["node_errors"] == {}, record["reply"]
    assert "execution_success" in events(record), record["messages"][-3:]
    assert record["history"]["status"]["status_str"] == "success"
    if "CogVXTrainLora" in {n["class_type"] for n in prompt.values()}:  # the training workflow
        trainer = node_of(prompt, "CogVXTrainLora")
        steps = [body for kind, body in record["messages"] if kind == "progress" and body.get("node") == trainer]
        assert steps[-1]["value"] == steps[-1]["max"] == 2
        assert list((server.base / "models" / "loras").rglob("*.safetensors"))  # the trained LoRA was saved
        return
    saved = record["history"]["outputs"][node_of(prompt, "SaveVideo")]["images"][0]
    video = server.base / "output" / saved["subfolder"] / saved["filename"]
    assert video.is_file() and video.stat().st_size > 0
    sampler = node_of(prompt, "CogVXSampler")
    steps = [body for kind, body in record["messages"] if kind == "progress" and body.get("node") == sampler]
    denoise = prompt[sampler]["inputs"]["denoise"]
    expected = 2 if denoise == 1 else int(2 * denoise)  # video-to-video runs the last `denoise` part of the steps
    assert steps[-1]["value"] == expected and all(s["max"] == expected for s in steps)
    assert sum(record["binary"].get(k, 0) for k in PREVIEW_EVENTS) >= expected  # a live preview every step
    if "CogVXCaptionUpsample" in {n["class_type"] for n in prompt.values()}:
        text = record["history"]["outputs"][node_of(prompt, "CogVXCaptionUpsample")]["text"][0]
        assert isinstance(text, str) and text


def test_missing_model_is_refused_at_validation(server):
    prompt = shrunk(ROOT / "workflows" / "api" / "cogvx_t2v_2b.json")
    loader = node_of(prompt, "CogVXModelLoader")
    prompt[loader]["inputs"]["model"] = "CogVideoX-9b"
    status, reply = server.post("/prompt", {"prompt": prompt})
    assert status == 400
    errors = reply["node_errors"][loader]["errors"]
    assert errors[0]["type"] == "value_not_in_list" and "CogVideoX-9b" in errors[0]["details"]


def test_failing_node_reports_execution_error_and_the_server_stays_up(server, tmp_path):
    prompt = shrunk(ROOT / "workflows" / "api" / "cogvx_i2v_1.5.json")
    sampler = node_of(prompt, "CogVXSampler")
    del prompt[sampler]["inputs"]["image_cond"]  # an I2V model without its image
    record = server.run(prompt, tmp_path)
    assert record["status"] == 200
    kind, body = record["messages"][-1]
    assert kind == "execution_error" and body["node_id"] == sampler and body["node_type"] == "CogVXSampler"
    assert "image-to-video model: connect CogVXImageToVideo's image_cond" in body["exception_message"]
    assert server.proc.poll() is None and server.get("/system_stats")
    again = server.run(shrunk(ROOT / "workflows" / "api" / "cogvx_t2v_5b.json", steps=1), tmp_path)
    assert "execution_success" in events(again)


def test_cancel_stops_sampling_within_a_step(server, tmp_path):
    prompt = shrunk(ROOT / "workflows" / "api" / "cogvx_t2v_2b.json", steps=200)
    sampler = node_of(prompt, "CogVXSampler")
    record = server.run(prompt, tmp_path, interrupt_after=2)
    assert record.get("interrupt_status") == 200
    assert events(record)[-1] == "execution_interrupted"
    steps = [b["value"] for k, b in record["messages"] if k == "progress" and b.get("node") == sampler]
    assert steps and max(steps) < 20  # stopped right away, not at the end of 200 steps
    assert server.get("/queue")["queue_running"] == []


def test_a_resubmitted_prompt_comes_from_the_cache(server, tmp_path):
    prompt = shrunk(ROOT / "workflows" / "api" / "cogvx_t2v_5b.json", steps=1)
    server.run(prompt, tmp_path)
    record = server.run(prompt, tmp_path)
    cached = next(body["nodes"] for kind, body in record["messages"] if kind == "execution_cached")
    assert set(cached) == set(prompt) - {node_of(prompt, "SaveVideo")} or set(cached) == set(prompt)
    assert "execution_success" in events(record)


def test_models_go_through_comfyui_memory_management(server):
    log = server.text()
    assert "Requested to load CogVXManagedModel" in log
    assert not [line for line in log.splitlines() if "IMPORT FAILED" in line and "cogvx" in line]


def test_comfy_cli_runs_a_workflow_as_a_client(server, tmp_path):
    comfy = Path(COMFYUI_PYTHON).with_name("comfy")
    if not comfy.is_file():
        pytest.skip(f"comfy-cli is not installed beside {COMFYUI_PYTHON} (scripts/setup_comfyui_host.sh installs it)")
    workflow = tmp_path / "cogvx_t2v_5b.json"
    prompt = shrunk(ROOT / "workflows" / "api" / "cogvx_t2v_5b.json", steps=1)
    prompt[node_of(prompt, "CogVXSampler")]["inputs"]["seed"] = 1234  # not served from the earlier tests' cache
    workflow.write_text(json.dumps(prompt))
    home = tmp_path / "home"
    home.mkdir()
    result = subprocess.run([str(comfy), "--skip-prompt", "run", "--workflow", str(workflow), "--host", "127.0.0.1",
                             "--port", str(server.port), "--wait"], capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, HOME=str(home)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    envelope = json.loads(result.stdout[result.stdout.index("{"):])
    assert envelope["ok"] is True and envelope["data"]["status"] == "completed", envelope
    assert node_of(prompt, "CogVXSampler") in envelope["data"]["executed_node_ids"]


def test_ui_workflows_load_in_the_real_frontend(server, tmp_path):
    """Each template, fetched from the server and loaded into the host's own frontend (headless Chromium) with its
    workflow validation on, raises no alert (the zod schema check) and names no unknown node; converted by the
    frontend's graphToPrompt it is its API twin; and web/cogvx.js snaps the widgets in the editor."""
    probe = subprocess.run([COMFYUI_PYTHON, "-c", "import playwright"], capture_output=True)
    if probe.returncode != 0 or not Path("/usr/bin/chromium").is_file():
        pytest.skip("no browser check: needs Debian's chromium and `pip install playwright` in the host's python")
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"pack": PACK, "names": sorted(TEMPLATES)}))
    out = tmp_path / "browser.json"
    subprocess.run([COMFYUI_PYTHON, str(Path(__file__).with_name("browser_check.py")), server.url, str(names),
                    str(out)], check=True, timeout=600, env=dict(os.environ, HOME=str(tmp_path)))
    result = json.loads(out.read_text())
    info = server.get("/object_info")

    def declared(cls, inputs, twin):
        """The inputs the server reads (frontend-only widgets such as LoadVideo's preview are dropped), less an
        optional input that the API twin leaves out and the frontend sends at its declared default (ComfyUI 0.33's
        CreateVideo bit_depth): the server fills that default itself."""
        spec = info[cls]["input"]
        optional = spec.get("optional", {})
        known = {**spec["required"], **optional}

        def default(name):
            return (optional[name] + [{}])[1].get("default") if name in optional else None

        return {k: v for k, v in inputs.items()
                if k in known and not (k in optional and k not in twin and v == default(k))}

    assert result["validation"] in (True, None) and result["hooked"], result  # None: no settings API to ask
    assert any("zod" in a.lower() or "invalid workflow" in a.lower() for a in result["control"]), result["control"]
    for stem, path in TEMPLATES.items():
        assert result["alerts"][stem] == [] and result["missing"][stem] == [], (stem, result["alerts"][stem])
        api_path = ROOT / json.loads(path.read_text())["extra"]["cogvx"]["api"]
        twin = json.loads(api_path.read_text())
        api = {k: {"inputs": declared(v["class_type"], v["inputs"], v["inputs"]), "class_type": v["class_type"]}
               for k, v in twin.items()}
        converted = {k: {"inputs": declared(v["class_type"], v["inputs"], twin.get(k, {}).get("inputs", {})),
                         "class_type": v["class_type"]} for k, v in result["prompts"][stem].items()}
        assert converted == api, stem
    assert result["snap"] == {"frames": 49, "width": 720, "height": 480, "variant": "5b-i2v"}
    assert not [e for e in result["errors"] if "cogvx" in e.lower()], result["errors"]


def test_workflows_are_offered_as_templates(server):
    """GET /workflow_templates lists the UI files of example_workflows/ under the pack's folder name (api/ twins
    are not listed), each served with its .jpg card, which is the thumbnail the template browser asks for."""
    templates = server.get("/workflow_templates")
    assert sorted(templates[PACK]) == sorted(TEMPLATES)
    for stem, path in TEMPLATES.items():
        quoted = urllib.parse.quote(stem)
        assert json.loads(server.get(f"/api/workflow_templates/{PACK}/{quoted}.json", raw=True)) == \
            json.loads(path.read_text())
        assert server.get(f"/api/workflow_templates/{PACK}/{quoted}.jpg", raw=True) == \
            path.with_suffix(".jpg").read_bytes()
