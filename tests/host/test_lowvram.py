"""CogVX weights stream through ComfyUI's own memory manager: in a real host, a transformer loaded through ComfyUI's
partial-load path with a budget of a third of its size leaves layers off the device (streamed by ComfyUI's casting
layers) and gives frames identical to a full load, with and without a LoRA. Needs COMFYUI_PATH and COMFYUI_PYTHON
(see scripts/setup_comfyui_host.sh); runs tests/host/lowvram_check.py in the host's Python."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch

from tests.host.host_env import require_host

ROOT = Path(__file__).resolve().parents[2]
COMFYUI_PATH, COMFYUI_PYTHON = require_host("check weight streaming inside a real ComfyUI")

from builders import write_pipeline_folder  # noqa: E402
from cogvx_core.checkpoints.transformer import load_transformer  # noqa: E402
from cogvx_core.lora import add_trainable_lora, save_lora  # noqa: E402


def test_partial_load_streams_weights_and_gives_the_full_load_frames(tmp_path):
    folder = write_pipeline_folder(tmp_path / "models" / "cogvideox" / "tiny-5b", "5b")
    transformer = load_transformer(folder / "transformer", dtype=torch.float32, device="cpu")
    params = add_trainable_lora(transformer, rank=4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for p in params:  # peft starts lora_B at zero: give it weights, so the LoRA changes the video
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    save_lora(tmp_path / "models" / "loras" / "tiny.safetensors", transformer)
    (tmp_path / "pack").mkdir()
    os.symlink(ROOT, tmp_path / "pack" / "cogvx", target_is_directory=True)

    out = tmp_path / "report.json"
    result = subprocess.run([COMFYUI_PYTHON, str(Path(__file__).with_name("lowvram_check.py")), str(tmp_path / "pack"),
                             str(tmp_path / "models"), str(out)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "COMFYUI_PATH": COMFYUI_PATH, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    report = json.loads(out.read_text())
    assert report["operations"].startswith("comfy.ops."), report["operations"]  # built from ComfyUI's layers
    assert report["full_streamed"] == 0
    assert 0 < report["partial_streamed"] < report["layers"]  # part of the model stayed off the device
    assert report["partial_lora_streamed"] > 0
    assert report["partial"] == report["full"]  # streaming moves weights, never changes a result
    assert report["partial_lora"] == report["full_lora"]
    assert report["full_lora"] != report["full"]  # the LoRA really acts on the streamed model
