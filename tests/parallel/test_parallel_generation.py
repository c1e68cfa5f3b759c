"""Parallel generation on CPU processes (gloo): CFG-parallel, sequence-parallel (Ulysses) and both together give the
latents and frames of one process (relative error at most 1e-6), with the VAE tiles split over the ranks.

Two processes run every mode in one launch: cfg (CFG degree 2), sequence (degree 2, an uneven token split 14/13) and
cfg+sequence (CFG 2 x sequence 1); a second launch of four processes runs cfg+sequence as CFG 2 x sequence 2.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cogvx_core.cli import main

from cogvx_core.errors import CogVXError
from cogvx_core.parallel.groups import check_heads, degrees
from cogvx_core.pipeline import load_pipeline
from parallel_kit import PROMPT, generate, torchrun

pytestmark = pytest.mark.slow  # process groups of 2-4 workers (CI runs them; the quick set does not)

MODES = ("cfg", "sequence", "cfg+sequence")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def one_process(pipeline_folders):
    out = {}
    for variant, folder in pipeline_folders.items():
        result = generate(load_pipeline(folder, dtype=torch.float32, device="cpu"))
        out[variant] = (result.latents, result.frames)
    return out


def _launch(nproc, pipeline_folders, modes, tmp_path):
    out = tmp_path / f"out{nproc}"
    out.mkdir()
    worker = Path(__file__).with_name("gen_worker.py")
    run = torchrun(nproc, [str(worker), "--folders", *map(str, pipeline_folders.values()), "--modes", *modes,
                           "--out", str(out)], cwd=tmp_path, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def two_processes(pipeline_folders, tmp_path_factory):
    return _launch(2, pipeline_folders, MODES, tmp_path_factory.mktemp("gen2"))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", ["5b", "2b"])
def test_two_processes_equal_one_process(two_processes, one_process, pipeline_folders, mode, variant):
    got = load_file(str(two_processes / f"{pipeline_folders[variant].name}-{mode}.safetensors"))
    latents, frames = one_process[variant]
    assert got["latents"].shape == latents.shape and got["frames"].shape == frames.shape
    assert rel(got["latents"], latents) <= 1e-6
    assert rel(got["frames"], frames) <= 1e-6
    traffic = json.loads((two_processes / "traffic.json").read_text())[f"{pipeline_folders[variant].name}-{mode}"]
    assert all(t > 0 for t in traffic["per_rank"])  # both ranks took part
    assert ("all_to_all" in traffic) == (mode == "sequence")  # Ulysses only where the tokens are split


def test_four_processes_cfg_times_sequence(pipeline_folders, one_process, tmp_path_factory):
    out = _launch(4, {"5b": pipeline_folders["5b"]}, ["cfg+sequence"], tmp_path_factory.mktemp("gen4"))
    got = load_file(str(out / f"{pipeline_folders['5b'].name}-cfg+sequence.safetensors"))
    latents, frames = one_process["5b"]
    assert rel(got["latents"], latents) <= 1e-6
    assert rel(got["frames"], frames) <= 1e-6
    traffic = json.loads((out / "traffic.json").read_text())[f"{pipeline_folders['5b'].name}-cfg+sequence"]
    assert traffic["all_to_all"] > 0 and len(traffic["per_rank"]) == 4


def test_head_count_error_names_the_degrees_that_work():
    check_heads(48, 4)  # 5b: 4 ranks are fine
    with pytest.raises(CogVXError, match=r"divide 30.*degree 4.*1, 2, 3, 5, 6, 10, 15, 30"):
        check_heads(30, 4)  # 2b
    with pytest.raises(CogVXError, match=r"process counts for this mode: 2, 4, 6, 10, 12, 20, 30, 60"):
        check_heads(30, 4, cfg_degree=2)
    assert degrees("cfg+sequence", 4) == (2, 2) and degrees("sequence", 3) == (1, 3)
    with pytest.raises(CogVXError, match="two processes"):
        degrees("cfg", 4)
    with pytest.raises(CogVXError, match="even number"):
        degrees("cfg+sequence", 3)


def test_cli_under_torchrun_writes_the_frames_of_one_process(pipeline_folders, tmp_path, capsys):
    common = ["generate", "--model", str(pipeline_folders["5b"]), "--prompt", PROMPT, "--steps", "2", "--frames", "9",
              "--height", "48", "--width", "48", "--seed", "3", "--sampler", "dpm", "--dtype", "float32",
              "--device", "cpu", "--tile", "32"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    run = torchrun(2, ["-m", "cogvx_core", *common, "--parallel", "sequence", "--out", str(tmp_path / "two")],
                   cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("sampling [") == 2  # two steps, reported by rank 0 alone
    one, two = sorted((tmp_path / "one").glob("*.png")), sorted((tmp_path / "two").glob("*.png"))
    assert len(one) == len(two) == 9
    for a, b in zip(one, two):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_cli_parallel_without_torchrun_says_how_to_launch(pipeline_folders, tmp_path, capsys):
    rc = main(["generate", "--model", str(pipeline_folders["5b"]), "--prompt", PROMPT, "--steps", "1",
               "--parallel", "sequence", "--device", "cpu", "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "torchrun --nproc-per-node N -m cogvx_core generate" in capsys.readouterr().err


def test_bench_parallel_traffic_and_memory(tmp_path, monkeypatch):
    """The measurement behind the README's table, at a small size: each rank's activation peak is its share of the
    tokens (the text stays on every rank), the bytes sent per forward are the analytic all-to-all and gather count.
    Products as on a GPU (F.linear): the CPU-only oneDNN route's fused GELU moves the single-process peak."""
    monkeypatch.setenv("COGVX_CPU_GEMM", "torch")
    out = tmp_path / "bench.json"
    run = torchrun(2, ["-m", "cogvx_core", "bench-parallel", "--frames", "9", "--height", "128", "--width", "192",
                       "--device", "cpu", "--out", str(out)], cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(out.read_text())
    s = r["sequence"]
    assert s["max_rel_diff"] <= 1e-6
    assert 0.9 <= s["sent_over_analytic"] <= 1.1
    assert s["activation_ratio"] <= s["token_share"] * 1.05
    assert sum(r["cfg"]["sent_bytes"].values()) == sum(r["cfg"]["analytic_bytes"].values())
