"""Writes the example workflows from one description per workflow below:

- example_workflows/<template>.json: UI format, to drag into ComfyUI. This is the folder ComfyUI offers a pack's
  templates from (Workflow > Browse Templates, under the pack's folder name). The frontend shows a template's file
  name as its title and sorts by it, so <template> is "CogVX <n> - <title>"; beside it <template>.jpg, the card's
  thumbnail. The graph id is a UUID (the frontend's schema check asks for one) derived from the workflow's name.
- workflows/api/<name>.json: API format, for POST /prompt and `comfy run`.

    python scripts/make_workflows.py               # rewrite them
    python scripts/make_workflows.py --thumbnails  # also redraw the .jpg cards (cogvx-tiny's shows its own frames)
    python scripts/make_workflows.py --check       # exit 1 if a file differs from what this script writes

train_lora's UI file is written by hand (the training nodes' owner keeps it); this script only sets its id and
extra.cogvx and keeps the rest.

The UI files follow what the frontend saves (nodes with positional widgets_values, a links table, "fixed" after
each seed widget, the upload button's value after LoadImage/LoadVideo's file); our nodes' widget order is read from
their INPUT_TYPES, the core nodes' from CORE below (the same in ComfyUI 0.3.54 and 0.20.1).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nodes import NODE_CLASS_MAPPINGS  # noqa: E402

NEGATIVE = ""
PROMPT = ("A golden retriever runs along a sunlit beach at sunset, waves rolling in behind it, sand kicking up from its "
          "paws, the camera tracking alongside at a low angle, warm light and long shadows, cinematic, detailed.")
I2V_PROMPT = ("The scene comes to life: gentle wind moves through the scene, light shifts slowly, the camera pushes "
              "in a little, natural motion, detailed and cinematic.")
V2V_PROMPT = ("A watercolor painting in motion, soft washes of colour, visible paper texture, the same movement as "
              "the input video.")
TINY_PROMPT = "a red circle moves to the left on a black background"
TINY = "cogvx-tiny (built in)"  # the model folder that ships in cogvx_core/models (nodes/host.py lists it)
T5_URL = "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors"
TEMPLATES = ROOT / "example_workflows"
API = ROOT / "workflows" / "api"
# The graph ids: uuid5 of the workflow's name in this namespace, so every run writes the same files.
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, "cogvx.workflows")

# Core nodes the workflows use: (inputs in order as (name, type) with type "WIDGET" for widgets, outputs,
# an extra widget value the frontend saves after a widget).
CORE = {
    "LoadImage": ([("image", "WIDGET")], [("IMAGE", "IMAGE"), ("MASK", "MASK")], {"image": "image"}),
    "LoadVideo": ([("file", "WIDGET")], [("VIDEO", "VIDEO")], {"file": "image"}),
    "GetVideoComponents": ([("video", "VIDEO")], [("images", "IMAGE"), ("audio", "AUDIO"), ("fps", "FLOAT")], {}),
    "CreateVideo": ([("images", "IMAGE"), ("fps", "WIDGET"), ("audio", "AUDIO?")], [("VIDEO", "VIDEO")], {}),
    "SaveVideo": ([("video", "VIDEO"), ("filename_prefix", "WIDGET"), ("format", "WIDGET"), ("codec", "WIDGET")],
                  [], {}),
}
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def node_spec(class_type: str):
    """(inputs [(name, type, optional)], outputs [(name, type)], extra widget values {name: value})."""
    if class_type in CORE:
        inputs, outputs, extra = CORE[class_type]
        return [(n, t.rstrip("?"), t.endswith("?")) for n, t in inputs], outputs, extra
    cls = NODE_CLASS_MAPPINGS[class_type]
    spec = cls.INPUT_TYPES()
    inputs = []
    extra = {}
    for section in ("required", "optional"):
        for name, value in spec.get(section, {}).items():
            kind = value[0]
            widget = isinstance(kind, list) or kind in WIDGET_TYPES
            inputs.append((name, "WIDGET" if widget else kind, section == "optional"))
            if name in ("seed", "noise_seed") and kind == "INT":
                extra[name] = "fixed"  # the control_after_generate widget's value
    names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
    return inputs, list(zip(names, cls.RETURN_TYPES)), extra


class Workflow:
    """Nodes added in order; link(...) values in `inputs` connect to an earlier node's output."""

    def __init__(self, name: str, title: str):
        self.name, self.title = name, title
        self.nodes: list[dict] = []
        self.template = ""  # the UI file's name (the template's title), set by workflows()
        self.needs = ""  # what to download first, for the thumbnail; "" = runs with no download

    @property
    def graph_id(self) -> str:
        return graph_id(self.name)

    def add(self, class_type: str, inputs: dict, *, title: str | None = None, models: list | None = None) -> int:
        node_id = len(self.nodes) + 1
        self.nodes.append(dict(id=node_id, class_type=class_type, inputs=inputs, title=title, models=models))
        return node_id

    # -- API format ------------------------------------------------------------------------------------------
    def api(self) -> dict:
        out = {}
        for n in self.nodes:
            inputs = {k: ([str(v[0]), v[1]] if isinstance(v, tuple) else v) for k, v in n["inputs"].items()}
            out[str(n["id"])] = {"inputs": inputs, "class_type": n["class_type"],
                                 "_meta": {"title": n["title"] or n["class_type"]}}
        return out

    # -- UI format -------------------------------------------------------------------------------------------
    def ui(self) -> dict:
        links, ui_nodes = [], []
        out_links: dict[tuple[int, int], list[int]] = {}
        for n in self.nodes:
            inputs, _, _ = node_spec(n["class_type"])
            types = {name: t for name, t, _ in inputs}
            for slot, (name, kind, _) in enumerate([i for i in inputs if i[1] != "WIDGET" or
                                                    isinstance(n["inputs"].get(i[0]), tuple)]):
                value = n["inputs"].get(name)
                if isinstance(value, tuple):
                    link_id = len(links) + 1
                    src = self.nodes[value[0] - 1]
                    src_type = node_spec(src["class_type"])[1][value[1]][1]
                    links.append([link_id, value[0], value[1], n["id"], slot, src_type])
                    out_links.setdefault((value[0], value[1]), []).append(link_id)
        column: dict[int, int] = {}
        for n in self.nodes:
            inputs, outputs, extra = node_spec(n["class_type"])
            depth = max([column[v[0]] + 1 for v in n["inputs"].values() if isinstance(v, tuple)], default=0)
            column[n["id"]] = depth
            row = sum(1 for m in self.nodes[: n["id"] - 1] if column[m["id"]] == depth)
            ui_inputs, widgets = [], []
            for name, kind, optional in inputs:
                value = n["inputs"].get(name)
                linked = isinstance(value, tuple)
                if kind == "WIDGET":
                    if name in n["inputs"]:
                        widgets.append(value if not linked else _widget_default(n["class_type"], name))
                        if name in extra:
                            widgets.append(extra[name])
                    if linked:
                        ui_inputs.append({"name": name, "type": _widget_type(n["class_type"], name),
                                          "widget": {"name": name}, "link": _link_to(links, n["id"], name, self)})
                    continue
                entry = {"name": name, "type": kind, "link": _link_to(links, n["id"], name, self) if linked else None}
                if optional:
                    entry["shape"] = 7
                ui_inputs.append(entry)
            ui_outputs = [{"name": oname, "type": otype, "links": out_links.get((n["id"], slot)), "slot_index": slot}
                          for slot, (oname, otype) in enumerate(outputs)]
            properties = {"Node name for S&R": n["class_type"]}
            if n["models"]:
                properties["models"] = n["models"]
            node = {"id": n["id"], "type": n["class_type"], "pos": [40 + 380 * depth, 40 + 260 * row],
                    "size": [340, 200], "flags": {}, "order": n["id"] - 1, "mode": 0, "inputs": ui_inputs,
                    "outputs": ui_outputs, "properties": properties, "widgets_values": widgets}
            if n["title"]:
                node["title"] = n["title"]
            ui_nodes.append(node)
        return {"id": self.graph_id, "revision": 0, "last_node_id": len(self.nodes),
                "last_link_id": len(links), "nodes": ui_nodes, "links": links, "groups": [], "config": {},
                "extra": {"cogvx": extra_cogvx(self.name, self.title, self.needs)}, "version": 0.4}


def graph_id(name: str) -> str:
    return str(uuid.uuid5(NAMESPACE, name))


def extra_cogvx(name: str, title: str, needs: str) -> dict:
    """What the UI file says about itself: its API twin, its title, and whether it runs with no download."""
    return {"name": name, "api": f"workflows/api/{name}.json", "title": title, "no_download": not needs}


def _link_to(links, node_id: int, name: str, wf: Workflow) -> int:
    """The id of the link into input `name` of node `node_id`."""
    node = wf.nodes[node_id - 1]
    inputs, _, _ = node_spec(node["class_type"])
    socket_names = [i[0] for i in inputs if i[1] != "WIDGET" or isinstance(node["inputs"].get(i[0]), tuple)]
    slot = socket_names.index(name)
    return next(link[0] for link in links if link[3] == node_id and link[4] == slot)


def _widget_spec(class_type: str, name: str):
    spec = NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()
    return {**spec.get("required", {}), **spec.get("optional", {})}[name]


def _widget_type(class_type: str, name: str) -> str:
    kind = _widget_spec(class_type, name)[0]
    return "COMBO" if isinstance(kind, list) else kind


def _widget_default(class_type: str, name: str):
    kind, opts = (_widget_spec(class_type, name) + ({},))[:2]
    return opts.get("default", kind[0] if isinstance(kind, list) else "")


# ---------------------------------------------------------------------------------------------------------------
# The workflows
# ---------------------------------------------------------------------------------------------------------------
def _loaders(wf: Workflow, model: str, vae: str, t5: str) -> tuple[int, int, int]:
    t5_models = [{"name": t5, "url": T5_URL, "directory": "text_encoders"}] if t5 == "t5xxl_fp16.safetensors" else None
    m = wf.add("CogVXModelLoader", {"model": model, "dtype": "auto", "weight_storage": "default",
                                    "attention": "sdpa"})
    v = wf.add("CogVXVAELoader", {"vae": vae, "dtype": "auto"})
    t = wf.add("CogVXT5Loader", {"t5": t5, "dtype": "auto"}, models=t5_models)
    return m, v, t


def _prompts(wf: Workflow, t5: int, prompt) -> tuple[int, int]:
    pos = wf.add("CogVXTextEncode", {"t5": (t5, 0), "text": prompt}, title="Prompt")
    neg = wf.add("CogVXTextEncode", {"t5": (t5, 0), "text": NEGATIVE}, title="Negative prompt")
    return pos, neg


def _sample_and_save(wf: Workflow, m, v, pos, neg, latent, *, sampler, dynamic, fps, prefix, image_cond=None,
                     denoise=1.0, steps=50):
    inputs = {"model": (m, 0), "positive": (pos, 0), "negative": (neg, 0), "latent": latent, "seed": 42,
              "steps": steps, "cfg": 6.0, "sampler": sampler, "dynamic_cfg": dynamic, "denoise": denoise}
    if image_cond is not None:
        inputs["image_cond"] = image_cond
    s = wf.add("CogVXSampler", inputs)
    d = wf.add("CogVXDecode", {"vae": (v, 0), "samples": (s, 0), "tiling": "auto", "tile_height": 240,
                               "tile_width": 360, "overlap": 0.2})
    c = wf.add("CreateVideo", {"images": (d, 0), "fps": float(fps)})
    # ComfyUI 0.33 made SaveVideo's codec a sub-input of its format ("format.codec", what its frontend sends beside
    # the older "codec"); earlier hosts ignore the key. The UI file keeps the widget values every frontend reads.
    wf.add("SaveVideo", {"video": (c, 0), "filename_prefix": f"cogvx/{prefix}", "format": "auto",
                         "format.codec": "auto", "codec": "auto"})


def t2v(name, title, model, vae, t5, variant, frames, width, height, *, sampler, dynamic, fps, caption=False,
        prompt=PROMPT, steps=50):
    wf = Workflow(name, title)
    m, v, t = _loaders(wf, model, vae, t5)
    if caption:
        llm = wf.add("CogVXLLMLoader", {"llm": "Qwen2.5-3B-Instruct", "precision": "auto",
                                        "base_url": "http://127.0.0.1:11434/v1", "model": "", "timeout_s": 120})
        up = wf.add("CogVXCaptionUpsample", {"llm": (llm, 0), "prompt": "a dog runs on a beach at sunset",
                                             "max_new_tokens": 256, "seed": 0, "sample": False, "temperature": 0.7,
                                             "token_budget": 226})
        prompt = (up, 0)
    pos, neg = _prompts(wf, t, prompt)
    lat = wf.add("CogVXEmptyLatent", {"variant": variant, "frames": frames, "width": width, "height": height,
                                      "batch_size": 1, "model": (m, 0), "vae": (v, 0)})  # vae: preview colours
    _sample_and_save(wf, m, v, pos, neg, (lat, 0), sampler=sampler, dynamic=dynamic, fps=fps, prefix=name,
                     steps=steps)
    return wf


def i2v(name, title, model, vae, t5, variant, frames, width, height, *, sampler, dynamic, fps):
    wf = Workflow(name, title)
    m, v, t = _loaders(wf, model, vae, t5)
    pos, neg = _prompts(wf, t, I2V_PROMPT)
    img = wf.add("LoadImage", {"image": "cogvx_start.png"}, title="Start image (put it in ComfyUI/input)")
    enc = wf.add("CogVXImageToVideo", {"vae": (v, 0), "start_image": (img, 0), "variant": variant, "frames": frames,
                                       "width": width, "height": height, "batch_size": 1, "model": (m, 0)})
    _sample_and_save(wf, m, v, pos, neg, (enc, 0), image_cond=(enc, 1), sampler=sampler, dynamic=dynamic, fps=fps,
                     prefix=name)
    return wf


def v2v(name, title, model, vae, t5, frames, width, height, *, fps):
    wf = Workflow(name, title)
    m, v, t = _loaders(wf, model, vae, t5)
    pos, neg = _prompts(wf, t, V2V_PROMPT)
    vid = wf.add("LoadVideo", {"file": "cogvx_input.mp4"}, title="Input video (put it in ComfyUI/input)")
    parts = wf.add("GetVideoComponents", {"video": (vid, 0)})
    enc = wf.add("CogVXVideoEncode", {"vae": (v, 0), "images": (parts, 0), "frames": frames, "width": width,
                                      "height": height})
    _sample_and_save(wf, m, v, pos, neg, (enc, 0), sampler="dpm", dynamic=True, fps=fps, prefix=name, denoise=0.8)
    return wf


def workflows() -> list[Workflow]:
    wfs = [
        t2v("cogvx_t2v_2b", "CogVideoX-2b text to video (model folder)", "CogVideoX-2b", "CogVideoX-2b/vae",
            "CogVideoX-2b/text_encoder", "2b", 49, 720, 480, sampler="ddim", dynamic=False, fps=8),
        t2v("cogvx_t2v_5b", "CogVideoX-5b text to video (single files)", "cogvideox_5b_bf16.safetensors",
            "cogvideox_vae.safetensors", "t5xxl_fp16.safetensors", "5b", 49, 720, 480, sampler="dpm", dynamic=True,
            fps=8),
        t2v("cogvx_t2v_1.5", "CogVideoX1.5-5B text to video", "CogVideoX1.5-5B", "CogVideoX1.5-5B/vae",
            "t5xxl_fp16.safetensors", "1.5-5b", 81, 1360, 768, sampler="dpm", dynamic=True, fps=16),
        i2v("cogvx_i2v_5b", "CogVideoX-5b-I2V image to video", "CogVideoX-5b-I2V", "CogVideoX-5b-I2V/vae",
            "CogVideoX-5b-I2V/text_encoder", "5b-i2v", 49, 720, 480, sampler="dpm", dynamic=True, fps=8),
        i2v("cogvx_i2v_1.5", "CogVideoX1.5-5B-I2V image to video (size from the image)", "CogVideoX1.5-5B-I2V",
            "CogVideoX1.5-5B-I2V/vae", "t5xxl_fp16.safetensors", "1.5-5b-i2v", 81, 0, 0, sampler="dpm",
            dynamic=True, fps=16),
        v2v("cogvx_v2v_5b", "CogVideoX-5b video to video", "CogVideoX-5b", "CogVideoX-5b/vae",
            "CogVideoX-5b/text_encoder", 49, 720, 480, fps=8),
        t2v("cogvx_t2v_5b_caption", "CogVideoX-5b text to video with an LLM-upsampled prompt", "CogVideoX-5b",
            "CogVideoX-5b/vae", "CogVideoX-5b/text_encoder", "5b", 49, 720, 480, sampler="dpm", dynamic=True, fps=8,
            caption=True),
        t2v("cogvx_t2v_tiny", "cogvx-tiny text to video (built in: runs with no download, synthetic shapes only)",
            TINY, f"{TINY}/vae", f"{TINY}/text_encoder", "5b", 9, 64, 64, sampler="ddim", dynamic=False, fps=8,
            prompt=TINY_PROMPT, steps=25),
    ]
    for wf in wfs:
        wf.template = template_name(wf.name)
        wf.needs = next(needs for name, _, needs in ORDER if name == wf.name)
    return wfs


# The templates in the order the template browser shows them (by file name): its title, what it needs first.
ORDER = [
    ("cogvx_t2v_tiny", "cogvx-tiny text to video (no download)", ""),
    ("cogvx_t2v_2b", "CogVideoX-2b text to video", "CogVideoX-2b in models/cogvideox"),
    ("cogvx_t2v_5b", "CogVideoX-5b text to video (single files)",
     "a CogVideoX-5b transformer, its VAE and t5xxl_fp16 (models/diffusion_models, vae, text_encoders)"),
    ("cogvx_t2v_5b_caption", "CogVideoX-5b text to video, LLM-written prompt",
     "CogVideoX-5b in models/cogvideox, an instruction LLM in models/LLM (or a server)"),
    ("cogvx_i2v_5b", "CogVideoX-5b-I2V image to video", "CogVideoX-5b-I2V in models/cogvideox, a start image"),
    ("cogvx_v2v_5b", "CogVideoX-5b video to video", "CogVideoX-5b in models/cogvideox, an input video"),
    ("cogvx_t2v_1.5", "CogVideoX1.5-5B text to video", "CogVideoX1.5-5B in models/cogvideox, t5xxl_fp16"),
    ("cogvx_i2v_1.5", "CogVideoX1.5-5B-I2V image to video",
     "CogVideoX1.5-5B-I2V in models/cogvideox, t5xxl_fp16, a start image"),
    ("train_lora", "train a LoRA on your clips",
     "CogVideoX-5b in models/cogvideox, captioned clips in models/training_data"),
]
HANDWRITTEN = {"train_lora": "CogVideoX-5b LoRA training"}  # name: title of the UI files kept by hand


def template_name(name: str) -> str:
    index = [n for n, _, _ in ORDER].index(name)
    return f"CogVX {index + 1} - {ORDER[index][1]}"


def handwritten_ui(name: str, title: str) -> str:
    """The hand-kept UI file, with the id and extra.cogvx this script gives every template."""
    path = TEMPLATES / f"{template_name(name)}.json"
    ui = json.loads(path.read_text())
    needs = next(n for key, _, n in ORDER if key == name)
    ui["id"] = graph_id(name)
    ui.setdefault("extra", {})["cogvx"] = extra_cogvx(name, title, needs)
    return dump(ui)


def dump(d: dict) -> str:
    return json.dumps(d, indent=1, ensure_ascii=False) + "\n"


def render(wf: Workflow) -> dict[Path, str]:
    return {TEMPLATES / f"{wf.template}.json": dump(wf.ui()), API / f"{wf.name}.json": dump(wf.api())}


def expected_files() -> dict[Path, str]:
    """Every generated file and its text (the thumbnails are listed with text None: drawn on request)."""
    files: dict[Path, str | None] = {}
    for wf in workflows():
        files.update(render(wf))
    for name, title in HANDWRITTEN.items():
        files[TEMPLATES / f"{template_name(name)}.json"] = handwritten_ui(name, title)
        files[API / f"{name}.json"] = (API / f"{name}.json").read_text()  # kept as it is
    for name, _, _ in ORDER:
        files[TEMPLATES / f"{template_name(name)}.jpg"] = None
    return files


# ---------------------------------------------------------------------------------------------------------------
# Thumbnails
# ---------------------------------------------------------------------------------------------------------------
def tiny_frames() -> list:
    """Frames of the tiny workflow's video, made by the built-in model through the CLI (seconds on a CPU)."""
    from cogvx_core.video_io import read_frames

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "tiny.mp4"
        subprocess.run([sys.executable, "-m", "cogvx_core", "generate", "--prompt", TINY_PROMPT, "--out", str(out),
                        "--sampler", "ddim", "--steps", "25", "--seed", "42"], check=True, cwd=ROOT,
                       capture_output=True)
        frames = read_frames(out)  # (T, H, W, 3) in 0..1
    return [(f.clamp(0, 1) * 255).round().byte().numpy() for f in frames]


def thumbnail(path: Path, title: str, needs: str, frames: list | None) -> None:
    """A 512x512 card: the title, then the video's frames (cogvx-tiny) or what the workflow needs first."""
    from PIL import Image, ImageDraw, ImageFont

    def font(size: int, bold: bool = False):
        name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
        try:
            return ImageFont.truetype(f"/usr/share/fonts/truetype/dejavu/{name}", size)
        except OSError:
            return ImageFont.load_default(size)

    def wrap(draw, text: str, fnt, width: int) -> list[str]:
        lines, line = [], ""
        for word in text.split():
            trial = f"{line} {word}".strip()
            if draw.textlength(trial, font=fnt) <= width or not line:
                line = trial
            else:
                lines.append(line)
                line = word
        return lines + [line] if line else lines

    img = Image.new("RGB", (512, 512), (24, 26, 32))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, 511, 8], fill=(120, 200, 120) if not needs else (90, 140, 220))
    draw.text((32, 36), "CogVX", font=font(26, bold=True), fill=(150, 190, 255))
    y = 84
    for line in wrap(draw, title, font(36, bold=True), 448):
        draw.text((32, y), line, font=font(36, bold=True), fill=(240, 240, 240))
        y += 46
    y += 16
    if frames:
        picks = [frames[i * (len(frames) - 1) // 2] for i in range(3)]
        for i, frame in enumerate(picks):
            tile = Image.fromarray(frame).resize((136, 136), Image.NEAREST)
            img.paste(tile, (32 + i * 156, y))
        y += 156
        note = "Runs with no download: the built-in model ships with the pack."
        colour = (140, 220, 140)
    else:
        note = f"Needs: {needs}."
        colour = (190, 190, 200)
    for line in wrap(draw, note, font(22), 448):
        draw.text((32, y), line, font=font(22), fill=colour)
        y += 30
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", quality=88)


def draw_thumbnails() -> None:
    frames = tiny_frames()
    for name, title, needs in ORDER:
        thumbnail(TEMPLATES / f"{template_name(name)}.jpg", title, needs, frames if not needs else None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--thumbnails", action="store_true")
    args = ap.parse_args()
    files = expected_files()
    stale = []
    for path, text in files.items():
        if text is None:
            if not path.is_file():
                stale.append(path)
        elif args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    extra = [p for folder in (TEMPLATES, API) for p in folder.iterdir() if p not in files]
    if args.thumbnails and not args.check:
        draw_thumbnails()
        stale = [p for p in stale if not p.is_file()]
    for path in stale:
        print(f"out of date: {path.relative_to(ROOT)} (run python scripts/make_workflows.py"
              f"{' --thumbnails' if path.suffix == '.jpg' else ''})")
    for path in extra:
        print(f"not written by this script: {path.relative_to(ROOT)} (remove it, or add it here)")
    return 1 if stale or extra else 0


if __name__ == "__main__":
    raise SystemExit(main())
