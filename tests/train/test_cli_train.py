"""`cogvx train` end to end: a LoRA trained by the CLI loads in the reference (diffusers' load_lora_weights) and gives
the same frames there as our generate --lora; --resume continues a shorter run to the same LoRA as one long run."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from builders import psnr, reference_pipeline
from cogvx_core.cli import main
from trainkit import CAPTIONS, write_clip

PROMPT = "a small red fox runs along the river under a stormy sky"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    for i, n in enumerate((9, 9, 5)):
        write_clip(folder / f"clip{i}.mp4", n, 64, 96, seed=i, caption=CAPTIONS[i])
    write_clip(folder / "still.png", 1, 64, 96, seed=7, caption=CAPTIONS[3])
    return folder


def _train(folder, data, out, *extra):
    return main(["train", "--model", str(folder), "--data", str(data), "--out", str(out), "--rank", "4",
                 "--alpha", "8", "--frames", "9", "--height", "32", "--width", "48", "--batch-size", "2", "--seed", "3",
                 "--device", "cpu", *(() if "--estimate" in extra else ("--no-estimate",)),
                 *(e for e in extra if e != "--estimate")])


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _generate(tmp_path, folder, name, *extra):
    out = tmp_path / name
    assert main(["generate", "--model", str(folder), "--prompt", PROMPT, "--steps", "4", "--frames", "9",
                 "--height", "64", "--width", "96", "--seed", "5", "--dtype", "float32", "--device", "cpu",
                 "--out", str(out), *extra]) == 0
    return np.stack([np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))])


def test_trained_lora_gives_the_same_frames_in_the_reference(model_folder, data, tmp_path, capsys):
    folder = model_folder("5b")
    lora = tmp_path / "style.safetensors"
    assert _train(folder, data, lora, "--steps", "4", "--lr", "0.05") == 0
    err = capsys.readouterr().err
    assert "4 clips" in err and "train [" in err and "4/4 loss" in err and "s/step" in err
    tensors, meta = _tensors(lora)
    assert meta["cogvx.rank"] == "4" and meta["cogvx.alpha"] == "8" and meta["cogvx.base_variant"] == "5b"
    assert all(k.startswith("transformer.transformer_blocks.") for k in tensors)

    ours = _generate(tmp_path, folder, "ours", "--lora", str(lora))
    base = _generate(tmp_path, folder, "base")
    pipe = reference_pipeline(folder, "t2v")
    pipe.load_lora_weights(str(lora))
    ref = pipe(prompt=PROMPT, negative_prompt="", num_inference_steps=4, guidance_scale=6.0, num_frames=9,
               height=64, width=96, generator=torch.Generator().manual_seed(5), max_sequence_length=12,
               output_type="np").frames[0]
    ref = (np.asarray(ref) * 255).round().astype(np.uint8)
    print(f"PSNR ours vs reference {psnr(ours, ref):.1f} dB; with vs without the LoRA {psnr(ours, base):.1f} dB")
    assert psnr(ours, ref) >= 50
    assert psnr(ours, base) < 40  # the LoRA changes the video, so the comparison above means something


def test_resume_continues_to_the_same_lora(model_folder, data, tmp_path, capsys):
    folder = model_folder("5b")
    straight = tmp_path / "straight.safetensors"
    assert _train(folder, data, straight, "--steps", "6", "--estimate") == 0
    assert "estimate: peak memory" in capsys.readouterr().err
    ckpt = tmp_path / "ckpt"
    assert _train(folder, data, tmp_path / "half.safetensors", "--steps", "3", "--checkpoint-dir", str(ckpt),
                  "--save-every", "3") == 0
    capsys.readouterr()
    resumed = tmp_path / "resumed.safetensors"
    assert _train(folder, data, resumed, "--steps", "6", "--checkpoint-dir", str(ckpt), "--resume") == 0
    assert "resumed from step 3" in capsys.readouterr().err
    assert _train(folder, data, resumed, "--steps", "6", "--checkpoint-dir", str(ckpt)) == 2
    assert "already holds a run's checkpoints (latest: step-00000006); add --resume" in capsys.readouterr().err
    a, _ = _tensors(straight)
    b, _ = _tensors(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_errors(model_folder, data, tmp_path, capsys):
    folder = model_folder("5b")
    assert _train(folder, data, tmp_path / "x.safetensors", "--steps", "1", "--resume") == 2
    assert "--resume needs --checkpoint-dir" in capsys.readouterr().err
    assert _train(folder, data, tmp_path / "x.pt", "--steps", "1") == 2
    assert "ending in .safetensors" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    write_clip(bad / "a.mp4", 9)
    assert _train(folder, bad, tmp_path / "x.safetensors", "--steps", "1") == 2
    assert "a.mp4: no caption" in capsys.readouterr().err
