"""`cogvx bench-vae`: time and peak memory of our VAE decode against diffusers' AutoencoderKLCogVideoX.

Both decode the same random latents with the same random weights. On CUDA they run in this process and the peak is
torch.cuda.max_memory_allocated above what was allocated before the decode. On CPU each runs in a fresh Python
process (so one's freed memory cannot hide the other's) and the peak is the growth of the resident set over the
baseline after setup and a tiny warm-up decode: VmHWM after resetting it through /proc/self/clear_refs, else
resource.getrusage's ru_maxrss.
diffusers is imported only inside the benchmark, never by the product code.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..errors import CogVXError
from ..variants import VAE_DEFAULTS
from .common import require_reference

HELP = "benchmark VAE decode (time, peak memory) against diffusers' AutoencoderKLCogVideoX"

_ROOT = Path(__file__).resolve().parents[2]  # the folder holding cogvx_core/


def _dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    value = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise CogVXError(f"Unknown dtype {name!r}; use float32, bfloat16 or float16.")
    return value


def _latents(shape, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(0)).to(dtype)


# ------------------------------------------------------------------ CPU: one fresh process per model

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


def _peak_rss_bytes(reset_worked: bool) -> int:
    if reset_worked:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_main() -> None:
    """Runs in a fresh process: set up one model, decode `repeats` times, print a JSON line with the results."""
    import gc
    args = json.loads(sys.stdin.read())
    torch.set_num_threads(args["threads"])
    dtype = _dtype(args["dtype"])
    z = _latents(args["latent_shape"], dtype)
    if args["which"] == "ours":
        from ..checkpoints.vae import load_vae
        model = load_vae(args["weights"], dtype=dtype)
        decode = model.decode
    else:
        from diffusers import AutoencoderKLCogVideoX
        from safetensors.torch import load_file
        model = AutoencoderKLCogVideoX(**args["config"]).to(dtype).eval()
        model.load_state_dict(load_file(args["weights"]))
        decode = lambda latents: model.decode(latents).sample  # noqa: E731
    times, peak, out = [], 0, None
    with torch.no_grad():
        # Warm-up on a tiny latent: touches every weight (a loader may leave them memory-mapped from the file) and
        # sets up the conv kernels, so neither counts as decode memory or time.
        decode(z[:, :, :1, :2, :2])
        for _ in range(args["repeats"]):
            out = None
            gc.collect()
            base = _rss_bytes()
            reset = _reset_peak_rss()
            start = time.perf_counter()
            out = decode(z)
            times.append(time.perf_counter() - start)
            peak = max(peak, _peak_rss_bytes(reset) - base)
    torch.save(out, args["output"])
    print("BENCH " + json.dumps({"times": times, "peak_bytes": peak, "peak_reset": reset}))


def _run_child(which: str, common: dict, tmp: Path) -> tuple[dict, torch.Tensor]:
    args = {**common, "which": which, "output": str(tmp / f"{which}.pt")}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_ROOT), os.environ.get("PYTHONPATH", "")])}
    # Tensors of 1 MiB and more get their own mmap, returned to the OS when freed, so the resident set follows the
    # live tensors (glibc's adaptive threshold would otherwise recycle freed heap memory and hide allocations).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    proc = subprocess.run([sys.executable, "-c", "from cogvx_core.commands.bench_vae import child_main; child_main()"],
                          input=json.dumps(args), capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{which} decode process failed:\n{proc.stderr[-4000:]}")
    # the benchmark's own file, written just above by the child
    return json.loads(lines[-1][6:]), torch.load(args["output"], weights_only=True)


# ------------------------------------------------------------------ CUDA: same process

def _cuda_run(decode, z: torch.Tensor, repeats: int, device) -> tuple[list[float], int, torch.Tensor]:
    times, peak, out = [], 0, None
    for _ in range(repeats):
        out = None
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        out = decode(z)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        peak = max(peak, torch.cuda.max_memory_allocated(device) - base)
    return times, peak, out


def bench_vae(config: dict, latent_shape, dtype=torch.float32, device="cpu", repeats: int = 1,
              threads: int | None = None) -> dict:
    """Decodes random latents of `latent_shape` (B, C, t, h, w) with our VAE and diffusers' (same random weights).

    Returns times (s, median of `repeats`), peak memory growth (bytes) of each, ratios ours/reference and the
    relative L2 difference of the two outputs.
    """
    from diffusers import AutoencoderKLCogVideoX
    from safetensors.torch import save_file

    from ..checkpoints.vae import load_vae

    dtype, device = _dtype(dtype), torch.device(device)
    cfg = {**VAE_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    torch.manual_seed(0)
    reference = AutoencoderKLCogVideoX(**cfg).eval()
    if device.type == "cuda":
        state = reference.state_dict()
        reference.to(device, dtype)
        with tempfile.TemporaryDirectory() as tmp:
            save_file({k: v.contiguous() for k, v in state.items()}, f"{tmp}/vae.safetensors",
                      metadata={"config": json.dumps(cfg)})
            del state
            ours = load_vae(f"{tmp}/vae.safetensors", dtype=dtype, device=device)
        z = _latents(latent_shape, dtype).to(device)
        with torch.no_grad():
            reference.decode(z[:, :, :1, :2, :2])  # warm-up
            ours.decode(z[:, :, :1, :2, :2])
            ref_times, ref_peak, ref_out = _cuda_run(lambda x: reference.decode(x).sample, z, repeats, device)
            ref_out = ref_out.float().cpu()
            our_times, our_peak, our_out = _cuda_run(ours.decode, z, repeats, device)
            our_out = our_out.float().cpu()
        method = "torch.cuda.max_memory_allocated"
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            weights = tmp / "vae.safetensors"
            save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(weights),
                      metadata={"config": json.dumps(cfg)})
            del reference
            common = dict(config=cfg, weights=str(weights), latent_shape=list(latent_shape), dtype=str(dtype),
                          repeats=repeats, threads=threads or torch.get_num_threads())
            ref_info, ref_out = _run_child("reference", common, tmp)
            our_info, our_out = _run_child("ours", common, tmp)
        ref_times, ref_peak = ref_info["times"], ref_info["peak_bytes"]
        our_times, our_peak = our_info["times"], our_info["peak_bytes"]
        method = "peak RSS growth over the post-setup baseline (" + (
            "VmHWM after clear_refs)" if our_info["peak_reset"] else "ru_maxrss)")
        ref_out, our_out = ref_out.float(), our_out.float()
    ref_time, our_time = statistics.median(ref_times), statistics.median(our_times)
    return {
        "device": str(device), "dtype": str(dtype), "latent_shape": list(latent_shape),
        "output_shape": list(our_out.shape), "repeats": repeats, "memory_method": method,
        "reference_time_s": ref_time, "ours_time_s": our_time, "time_ratio": our_time / ref_time,
        "reference_peak_bytes": ref_peak, "ours_peak_bytes": our_peak, "memory_ratio": our_peak / ref_peak,
        "relative_l2_difference": ((our_out - ref_out).norm() / ref_out.norm()).item(),
    }


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="a diffusers vae/config.json (default: the released CogVideoX VAE)")
    parser.add_argument("--latent-shape", default="1,16,5,30,45", help="B,C,t,h,w of the latents to decode")
    parser.add_argument("--dtype", default="float32", help="weight and compute dtype of both VAEs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where both decodes run (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=1, help="timed decodes per VAE (the median counts)")


def run(args) -> int:
    require_reference("bench-vae", "diffusers")
    config = json.loads(Path(args.config).read_text()) if args.config else dict(VAE_DEFAULTS)
    try:
        shape = [int(v) for v in args.latent_shape.split(",")]
    except ValueError:
        raise CogVXError(f"--latent-shape {args.latent_shape!r}: give five integers B,C,t,h,w like 1,16,5,30,45.")
    result = bench_vae(config, shape, args.dtype, args.device, args.repeats)
    print(json.dumps(result, indent=2))
    return 0
