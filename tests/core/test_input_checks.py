"""No silent garbage and no raw tracebacks: NaN in weights, LoRAs and latents stop the run naming the file or step;
zero or negative sizes are refused; doubtful alphas, start images and denoise values get a note; bad config.json
files, safetensors headers, seeds, devices, comma lists, tensor layouts and empty videos are CogVXErrors that say
what to fix; CogVXError shows as a short title."""

import json
import logging
import traceback
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from builders import randomize_, small_transformer_config
from cogvx_core.checks import (check_layout, config_types, denoise_note, finite_tensor, parse_device,
                               parse_numbers, positive)
from cogvx_core.checkpoints.io import SafetensorsHeader, read_json
from cogvx_core.checkpoints.lora import lora_from_state_dict
from cogvx_core.checkpoints.transformer import load_transformer
from cogvx_core.cli import main
from cogvx_core.errors import CheckpointError, CogVXError
from cogvx_core.samplers import sample
from cogvx_core.schedule import NoiseSchedule
from cogvx_core.transformer import build_transformer
from cogvx_core.video_io import read_frames, read_image_notes


@pytest.fixture(scope="module")
def transformer_folder(tmp_path_factory):
    """A small 5b transformer in the diffusers layout: (folder, config, state dict)."""
    folder = tmp_path_factory.mktemp("transformer")
    cfg = small_transformer_config("5b")
    model = randomize_(build_transformer(cfg, device="cpu"), seed=1)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps({"_class_name": "CogVideoXTransformer3DModel", **cfg}))
    return folder, cfg, sd


def _copy(folder, tmp_path, config=None, state=None):
    out = tmp_path / "t"
    out.mkdir()
    (out / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    save_file(state, out / "diffusion_pytorch_model.safetensors")
    return out


# -- NaN and infinity ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_names_the_file_and_the_tensor(transformer_folder, tmp_path, bad):
    folder, cfg, sd = transformer_folder
    state = dict(sd)
    name = "transformer_blocks.1.attn1.to_k.weight"
    state[name] = state[name].clone()
    state[name][3, 5] = bad
    out = _copy(folder, tmp_path, {"_class_name": "CogVideoXTransformer3DModel", **cfg}, state)
    with pytest.raises(CogVXError, match=rf"{out}.*tensor {name} holds NaN or infinite values"):
        load_transformer(out)
    load_transformer(folder)  # the clean file loads


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_nan_is_found_from_its_bits(dtype):
    good = torch.tensor([1.0, -2.5, 0.0, 240.0]).to(dtype)
    finite_tensor(good, "w", "f.safetensors")
    bad = torch.tensor([1.0, float("nan")]).to(dtype)
    with pytest.raises(CogVXError, match="f.safetensors: tensor w holds NaN"):
        finite_tensor(bad, "w", "f.safetensors")


def test_nan_in_a_lora_names_the_file_and_key():
    down, up = torch.randn(4, 128), torch.randn(128, 4)
    up[0, 0] = float("nan")
    state = {"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": down,
             "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": up}
    with pytest.raises(CogVXError, match=r"my\.safetensors: tensor .*to_q\.lora_B\.weight holds NaN"):
        lora_from_state_dict(state, source="my.safetensors")


@pytest.mark.parametrize("alpha, note", [
    (None, "gives no alpha; scale 1"),
    (float("nan"), "alpha is not a finite number .*to_q.alpha"),
    (0.0, "is zero, so these layers do nothing"),
    (-4.0, "zero or negative"),
])
def test_doubtful_lora_alpha_is_noted(alpha, note):
    state = {"transformer_blocks.0.attn1.to_q.lora_down.weight": torch.randn(4, 128),
             "transformer_blocks.0.attn1.to_q.lora_up.weight": torch.randn(128, 4)}
    if alpha is not None:
        state["transformer_blocks.0.attn1.to_q.alpha"] = torch.tensor(alpha)
    lora = lora_from_state_dict(state, source="x")
    assert len(lora.notes) == 1 and __import__("re").search(note, lora.notes[0])
    state["transformer_blocks.0.attn1.to_q.alpha"] = torch.tensor(8.0)
    assert lora_from_state_dict(state, source="x").notes == []


def test_lora_notes_are_logged_once_when_applied(caplog):
    from cogvx_core.lora import apply_loras, remove_loras

    cfg = small_transformer_config("5b")
    model = build_transformer(cfg, device="cpu")
    state = {"transformer_blocks.0.attn1.to_q.lora_down.weight": torch.randn(4, 128),
             "transformer_blocks.0.attn1.to_q.lora_up.weight": torch.randn(128, 4),
             "transformer_blocks.0.attn1.to_q.alpha": torch.tensor(0.0)}
    lora = lora_from_state_dict(state, source="zero.safetensors")
    with caplog.at_level(logging.WARNING):
        apply_loras(model, [(lora, 1.0)])
        apply_loras(model, [(lora, 0.5)])
    remove_loras(model)
    assert [r.getMessage() for r in caplog.records].count(f"zero.safetensors: {lora.notes[0]}") == 1


def test_nan_latents_stop_sampling_at_the_step():
    schedule = NoiseSchedule.for_variant(__import__("cogvx_core.variants", fromlist=["x"]).get_variant("5b"))
    calls = []

    def predict(x, t, do_cfg):
        calls.append(t)
        v = torch.zeros_like(x)
        if len(calls) == 2:
            v[0, 0, 0, 0, 0] = float("nan")  # the model blows up on the second step
        return v, None

    latents = torch.randn(1, 4, 2, 4, 4)  # (B, C, T, H, W)
    timesteps = schedule.timesteps(5)
    with pytest.raises(CogVXError, match=rf"sampling step 2 of 5 \(timestep {int(timesteps[1])}\).*NaN"):
        sample(predict, latents, schedule=schedule, timesteps=timesteps, guidance=1.0)
    assert len(calls) == 2  # stopped there, not after the whole run


# -- zero and negative values ------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, -1])
def test_zero_or_negative_sizes_are_refused_not_read_as_missing(value):
    with pytest.raises(CogVXError, match="frames must be positive"):
        positive("frames", value)
    assert positive("frames", None) is None and positive("frames", 9) == 9
    with pytest.raises(CogVXError, match="whole number"):
        positive("frames", 9.5)


@pytest.mark.parametrize("args, message", [
    (["--frames", "0"], "--frames must be positive"),
    (["--height", "-64"], "--height must be positive"),
    (["--fps", "0"], "fps must be a positive number"),
    (["--seed", str(2**64)], "does not fit in 64 bits"),
    (["--device", "gpu7"], "Unknown device 'gpu7'"),
])
def test_generate_refuses_bad_values_in_one_line(tmp_path, capsys, args, message):
    code = main(["generate", "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "v.mp4"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "v.mp4").exists()


# -- notes ---------------------------------------------------------------------------------------------------------
def test_start_image_notes(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (480, 720, 3), dtype=np.uint8)).save(tmp_path / "fine.png")
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "tiny.png")
    Image.fromarray(rng.integers(0, 255, (480, 720), dtype=np.uint8)).save(tmp_path / "gray.png")
    rgba = rng.integers(0, 255, (480, 720, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[:10, :10, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    target = (480, 720)
    assert read_image_notes(tmp_path / "fine.png", target) == []
    assert ["less than half" in n for n in read_image_notes(tmp_path / "tiny.png", target)] == [True]
    assert ["grayscale" in n for n in read_image_notes(tmp_path / "gray.png", target)] == [True]
    assert ["transparent" in n for n in read_image_notes(tmp_path / "alpha.png", target)] == [True]
    rgba[..., 3] = 255  # an alpha channel that is opaque everywhere is fine
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    assert read_image_notes(tmp_path / "opaque.png", target) == []


def test_denoise_below_one_on_an_empty_latent_gets_a_note():
    assert "empty latent" in denoise_note(0.6, empty_latent=True)[0]
    assert denoise_note(1.0, empty_latent=True) == [] and denoise_note(0.6, empty_latent=False) == []


def test_sampler_node_says_the_denoise_note(caplog):
    """The node shows it (host.say logs it outside ComfyUI) before any work on the empty latent."""
    from nodes.sampling import CogVXSampler

    model = mock.MagicMock()
    model.variant.i2v = True  # stops right after the note with its own refusal (I2V takes no denoise < 1)
    model.transformer.config = {"out_channels": 16}
    model.transformer.out_channels = 16
    latent = {"samples": torch.zeros(1, 16, 3, 8, 8)}
    with caplog.at_level(logging.WARNING), pytest.raises(CogVXError, match="denoise below 1"):
        CogVXSampler().sample(model, None, None, latent, 0, 2, 6.0, "ddim", False, denoise=0.5, image_cond={})
    assert any("on an empty latent" in r.getMessage() for r in caplog.records)


# -- config.json and safetensors headers --------------------------------------------------------------------------
@pytest.mark.parametrize("edit, message", [
    (lambda c: {**c, "num_layers": "2"}, r"key 'num_layers' is '2' \(string\) but must be a whole number"),
    (lambda c: {**c, "attention_head_dim": 32.5}, r"key 'attention_head_dim' is 32.5"),
    (lambda c: {**c, "norm_eps": [1e-5]}, r"key 'norm_eps' is \[1e-05\] \(list\) but must be a number"),
    (lambda c: {**c, "use_rotary_positional_embeddings": "yes"}, r"'use_rotary_positional_embeddings'.*true/false"),
    (lambda c: [c], r"must hold a JSON object .* not a list"),
    (lambda c: "{\"num_layers\": ", r"not valid JSON"),
])
def test_bad_transformer_config_names_the_file_and_key(transformer_folder, tmp_path, edit, message):
    folder, cfg, sd = transformer_folder
    config = edit({"_class_name": "CogVideoXTransformer3DModel", **cfg})
    out = _copy(folder, tmp_path, config, sd)
    with pytest.raises(CogVXError, match=message) as e:
        load_transformer(out)
    assert str(out / "config.json") in str(e.value)


def test_config_types_accepts_what_released_configs_hold(tmp_path):
    ref = {"a": 1, "b": 0.5, "c": [1], "d": None, "e": True, "f": "x"}
    assert config_types({"a": 2, "b": 1, "c": [], "d": 3, "e": False, "f": "y", "other": {}}, ref, "f") is not None
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({"num_train_timesteps": "1000"}))
    from cogvx_core.schedule import DIFFUSERS_DEFAULTS

    with pytest.raises(CogVXError, match=r"scheduler_config.json: key 'num_train_timesteps'"):
        read_json(path, "scheduler", DIFFUSERS_DEFAULTS)


def _raw_safetensors(path: Path, header) -> Path:
    data = json.dumps(header).encode()
    path.write_bytes(len(data).to_bytes(8, "little") + data + b"\0" * 64)
    return path


@pytest.mark.parametrize("header, message", [
    ([1, 2], "header is not a JSON object"),
    ({"w": {"dtype": "F32", "shape": [2]}}, "header entry of tensor 'w' is malformed"),
    ({"w": "F32"}, "header entry of tensor 'w' is malformed"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "malformed"),
    ({"__metadata__": {"a": 1}}, "__metadata__ must map names to strings"),
])
def test_malformed_safetensors_header_is_named(tmp_path, header, message):
    path = _raw_safetensors(tmp_path / "x.safetensors", header)
    with pytest.raises(CheckpointError, match=message):
        SafetensorsHeader(path)


# -- seeds, devices, comma lists, layouts, empty videos ------------------------------------------------------------
def test_unknown_devices_and_comma_lists():
    with pytest.raises(CogVXError, match="Unknown device 'tpu'"):
        parse_device("tpu")
    assert parse_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(CogVXError, match="no CUDA device"):
            parse_device("cuda:0")
    assert parse_numbers(" 9, 17 ,25,", "--frame-buckets") == [9, 17, 25]
    with pytest.raises(CogVXError, match=r"--frame-buckets: '1x7' is not a whole number"):
        parse_numbers("9,1x7", "--frame-buckets")
    with pytest.raises(CogVXError, match="must be a positive number"):
        parse_numbers("9,0", "--frame-buckets")


@pytest.fixture(scope="module")
def tiny_pipeline():
    from cogvx_core.models import TINY_MODEL
    from cogvx_core.pipeline import load_pipeline

    return load_pipeline(str(TINY_MODEL))


@pytest.mark.parametrize("kwargs, message", [
    (dict(image=torch.zeros(3, 64, 64)), r"image has shape \(3, 64, 64\) but must be \(B, 3, H, W\)"),
    (dict(image=torch.zeros(1, 64, 64, 3)), r"must be \(B, 3, H, W\) with 3 = 3"),
    (dict(video=torch.zeros(1, 9, 3, 64, 64)), r"video has shape \(1, 9, 3, 64, 64\) but must be \(B, 3, T, H, W\)"),
    (dict(cond=torch.zeros(226, 64)), r"cond has shape \(226, 64\) but must be \(B, L, D\)"),
    (dict(frames=0), "frames must be positive"),
    (dict(seed=2**64), "does not fit in 64 bits"),
    (dict(seed=-(2**63) - 1), "does not fit in 64 bits"),
])
def test_pipeline_api_names_the_expected_layout(tiny_pipeline, kwargs, message):
    with pytest.raises(CogVXError, match=message):
        tiny_pipeline.generate("a red circle moves left on a black background", steps=1, **kwargs)


def test_check_layout_refuses_non_tensors_and_empty():
    with pytest.raises(CogVXError, match="must be a tensor"):
        check_layout(np.zeros((1, 3, 8, 8)), "image", "(B, 3, H, W)")
    with pytest.raises(CogVXError, match="is empty"):
        check_layout(torch.zeros(0, 3, 8, 8), "image", "(B, 3, H, W)")


def test_video_with_no_frames(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"\0" * 16)
    with mock.patch("imageio.v2.mimread", return_value=[]):
        with pytest.raises(CogVXError, match="this video has no frames"):
            read_frames(path)


# -- how ComfyUI titles the error ---------------------------------------------------------------------------------
def test_cogvx_error_has_a_short_title():
    """ComfyUI's execution.py titles a failed node `module.qualname` unless the module is builtins; a custom node
    pack's module is its file path. The title must be just the class name, as Python's own formatting shows it."""
    for cls in (CogVXError, CheckpointError):
        err = cls("the model folder has no config.json; download it again.")
        shown = f"{cls.__qualname__}" if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
        assert shown == cls.__name__
        assert traceback.format_exception_only(err) == [f"{cls.__name__}: {err}\n"]
    assert issubclass(CogVXError, ValueError) and issubclass(CheckpointError, CogVXError)


def test_bad_vae_config_names_the_file_and_key(tmp_path):
    from cogvx_core.checkpoints.vae import load_vae

    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLCogVideoX",
                                                    "block_out_channels": 128}))
    with pytest.raises(CogVXError, match=rf"{folder / 'config.json'}: key 'block_out_channels' is 128 \(number\) but "
                                         r"must be a list"):
        load_vae(folder)
