"""The speed flags on the command line: generate --cache / --compile, calibrate-cache, eval --cache, bench-speed."""

import json

import pytest

from builders import write_pipeline_folder
from cogvx_core.cache import CACHE_FILE, read_coefficients
from cogvx_core.cli import main

TINY_ARGS = ["--prompt", "a red circle moves up on a black background", "--steps", "6", "--device", "cpu"]


def test_generate_reports_passes_and_caches(tmp_path, capsys):
    assert main(["generate", *TINY_ARGS, "--out", str(tmp_path / "a")]) == 0
    assert "transformer passes: 6 computed, 0 skipped" in capsys.readouterr().err
    # the built-in model's shipped calibration is found beside it
    assert main(["generate", *TINY_ARGS, "--cache", "teacache:100", "--out", str(tmp_path / "b")]) == 0
    assert "2 computed, 4 skipped" in capsys.readouterr().err


def test_bad_cache_arguments_exit_with_one_line(tmp_path, capsys):
    assert main(["generate", *TINY_ARGS, "--cache", "pab", "--out", str(tmp_path / "a")]) == 2
    assert "teacache[:THRESHOLD]" in capsys.readouterr().err
    assert main(["generate", *TINY_ARGS, "--cache-coefficients", "x.json", "--out", str(tmp_path / "a")]) == 2
    assert "needs --cache teacache" in capsys.readouterr().err


def test_calibrate_cache_writes_beside_the_model_and_generate_uses_it(tmp_path, capsys):
    folder = write_pipeline_folder(tmp_path / "m", "5b")  # small: no published coefficients apply
    base = ["--model", str(folder), "--prompt", "a fox", "--steps", "4", "--frames", "9", "--height", "96",
            "--width", "160", "--dtype", "float32", "--device", "cpu"]
    assert main(["generate", *base, "--cache", "teacache", "--out", str(tmp_path / "x")]) == 2
    assert "calibrate-cache" in capsys.readouterr().err
    assert main(["calibrate-cache", "--model", str(folder), "--prompts", "2", "--steps", "4,6", "--frames", "9",
                 "--height", "96", "--width", "160", "--batch-size", "2", "--device", "cpu"]) == 0
    saved = json.loads((folder / CACHE_FILE).read_text())["teacache"]
    assert saved["points"] == 3 + 5 and len(read_coefficients(folder)) == 5
    assert main(["generate", *base, "--cache", "teacache:0.3", "--out", str(tmp_path / "y")]) == 0
    assert "transformer passes:" in capsys.readouterr().err
    assert main(["calibrate-cache", "--model", str(folder), "--lora", "x.safetensors"]) == 2  # a LoRA needs --out


def test_eval_cache_compares_with_the_uncached_run(tmp_path, capsys):
    out = tmp_path / "e.json"
    assert main(["eval", "--prompts", "2", "--steps", "5", "--samplers", "ddim", "--batch-size", "2",
                 "--cache", "fbcache:0", "--cache", "teacache:100", "--device", "cpu", "--json", str(out),
                 "--plot", str(tmp_path / "c.png")]) == 0
    rows = json.loads(out.read_text())["cache"]
    assert [r["cache"] for r in rows] == ["off", "fbcache:0", "teacache:100"]
    assert rows[1]["psnr_min"] == 100.0 and rows[2]["passes_skipped"] == 3
    assert (tmp_path / "c.png").is_file() and "| ddim | 5 | teacache:100 |" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--compile"])
def test_generate_compile_flag_is_refused_cleanly_without_a_compiler(tmp_path, capsys, monkeypatch, flag):
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert main(["generate", *TINY_ARGS, flag, "--out", str(tmp_path / "a")]) == 2
    assert "C++ compiler" in capsys.readouterr().err


def test_bench_t5_times_our_layers_against_transformers_on_one_prompt():
    from cogvx_core.commands.bench import bench_t5

    r = bench_t5(1, repeats=1, tokens=24, size=dict(vocab_size=64, d_model=64, d_kv=16, d_ff=128, num_heads=4))
    assert r["rel_l2"] < 1e-6  # the same weights through our layer classes: the same encoding
    assert r["ours_s"] > 0 and r["reference_s"] > 0
