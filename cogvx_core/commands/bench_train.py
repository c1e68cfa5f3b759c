"""`cogvx bench-train`: one LoRA training step, ours against the reference (diffusers transformer + peft LoRA +
the scheduler's add_noise / get_velocity, as diffusers' train_cogvideox_lora.py), at the same small config.

Each side runs in a fresh subprocess on the same random weights, LoRA init, latents, noise and timesteps (the
parent writes them to a temporary folder), so the peak memory of one is not hidden in the other's. Reported per
side: steps per second (median step time), the training's peak resident memory above the memory before its first step
(Linux /proc: VmHWM after clear_refs; on CUDA the allocator's peak) and the per-step losses, whose agreement is the loss parity. diffusers and peft
are needed only here.
"""

from __future__ import annotations

import argparse
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
from .common import require_reference

HELP = "benchmark one LoRA training step against diffusers + peft (steps/s, peak memory, loss parity)"

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def add_arguments(p) -> None:
    p.add_argument("--variant", default="5b", help="transformer architecture (default 5b)")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks")
    p.add_argument("--heads", type=int, default=4, help="attention heads of 64 (default 4: width 256)")
    p.add_argument("--frames", type=int, default=9, help="pixel frames per clip, 4k+1")
    p.add_argument("--height", type=int, default=128, help="clip height in pixels")
    p.add_argument("--width", type=int, default=192, help="clip width in pixels")
    p.add_argument("--batch-size", type=int, default=1, help="clips per step")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    p.add_argument("--rounds", type=int, default=3, help="worker pairs, run interleaved (reference, ours, ...) so "
                   "that load drift hits both alike; medians over all rounds are reported")
    p.add_argument("--no-gradient-checkpointing", action="store_true", help="keep every block's activations "
                   "instead of recomputing them (default: checkpointing on)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each worker (0: torch's default)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", choices=["ours", "reference"], help=argparse.SUPPRESS)  # the subprocesses
    p.add_argument("--workdir", help=argparse.SUPPRESS)


# ---------------------------------------------------------------------------------------------------------------
# Shared setup (written by the parent, read by both workers)
# ---------------------------------------------------------------------------------------------------------------
def _config(args) -> dict:
    from ..variants import get_variant

    v = get_variant(args.variant)
    return v.transformer_config(num_layers=args.layers, num_attention_heads=args.heads, attention_head_dim=64,
                                text_embed_dim=4096, time_embed_dim=512, max_text_seq_length=226)


def _prepare(args, work: Path) -> None:
    """Weights, LoRA init, a one-clip cached dataset and the per-step inputs, all from fixed seeds."""
    from safetensors.torch import save_file

    from ..lora import add_trainable_lora
    from ..train.buckets import Buckets
    from ..train.cache import Cache, key_of
    from ..train.dataset import CogVXDataset, Entry, save_manifest
    from ..train.trainer import Trainer
    from ..transformer import build_transformer
    from ..variants import latent_frames

    cfg = _config(args)
    torch.manual_seed(0)
    model = build_transformer(cfg, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape) / max(t.shape[-1] if t.ndim > 1 else 1, 1) ** 0.5
                        if not name.endswith("norm.weight") else 1 + 0.1 * torch.randn(t.shape))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(work / "weights.safetensors"))
    (work / "config.json").write_text(json.dumps(cfg))

    g = torch.Generator().manual_seed(1)
    lat_t = latent_frames(args.frames)
    h, w = args.height // 8, args.width // 8
    cache = Cache(work / "cache")
    entries = []
    for i in range(args.batch_size):
        mean = torch.randn(16, lat_t, h, w, generator=g)
        latent_key, text_key = key_of("latents", {"i": i}), key_of("text", {"i": i})
        cache.put("latents", latent_key, {"mean": mean, "logvar": torch.full_like(mean, -4.0)})
        cache.put("text", text_key, {"context": torch.randn(226, 4096, generator=g)})
        entries.append(Entry(f"clip{i}", "bench", "video", args.frames, args.height, args.width, lat_t, latent_key,
                             text_key))
    dataset = CogVXDataset(entries, cache, Buckets(((args.height, args.width),), (args.frames,)), model.variant.name,
                           None)
    save_manifest(dataset, work / "dataset.json")

    settings = _settings(args)
    lora_init = {}
    add_trainable_lora(model, args.rank, args.rank, TARGETS, generator=torch.Generator().manual_seed(2))
    for layer, m in model.named_modules():
        for a in getattr(m, "lora_adapters", ()):
            lora_init[f"{layer}.lora_A"] = a.down.detach().clone()
            lora_init[f"{layer}.lora_B"] = a.up.detach().clone()
    save_file(lora_init, str(work / "lora_init.safetensors"))
    from ..lora import remove_loras

    remove_loras(model)
    trainer = Trainer(model, dataset, settings, scaling_factor=1.0)
    inputs = {}
    for step in range(args.steps + 1):
        _, latents, mask, context, noise, t = trainer.batch(step)
        inputs.update({f"{step}.latents": latents, f"{step}.noise": noise, f"{step}.t": t, f"{step}.context": context})
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(work / "inputs.safetensors"))


def _settings(args):
    from ..train.trainer import TrainSettings

    return TrainSettings(steps=args.steps + 1, rank=args.rank, alpha=args.rank, learning_rate=1e-3,
                         mixed_precision="no", gradient_checkpointing=not args.no_gradient_checkpointing, seed=3,
                         timestep_sampling="uniform", latent_sampling="sample")


# ---------------------------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------------------------
def _rss_mib(field: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
    except OSError:
        pass


def _time_steps(step_fn, steps: int, sync) -> tuple[list[float], list[float], float, float]:
    """(timed step seconds, losses of all steps, RSS before training, peak RSS while training) in MiB; the first step
    is a warm-up (allocator pools, kernels, position tables) and is not timed, but counts for memory."""
    sync()
    base = _rss_mib("VmRSS")
    _reset_peak()
    losses = [step_fn(0)]
    sync()
    times = []
    for k in range(1, steps + 1):
        start = time.perf_counter()
        losses.append(step_fn(k))
        sync()
        times.append(time.perf_counter() - start)
    return times, losses, base, _rss_mib("VmHWM")


def _worker_ours(args, work: Path) -> dict:
    from safetensors.torch import load_file

    from ..train.dataset import load_manifest
    from ..train.ddp import DistInfo
    from ..train.trainer import Trainer
    from ..transformer import build_transformer

    dev = torch.device(args.device)
    cfg = json.loads((work / "config.json").read_text())
    model = build_transformer(cfg, device="cpu", dtype=torch.float32)
    model.load_state_dict(load_file(str(work / "weights.safetensors")))
    model.requires_grad_(False)
    trainer = Trainer(model.to(dev), load_manifest(work / "dataset.json"), _settings(args), scaling_factor=1.0,
                      dist=DistInfo(device=dev))
    init = load_file(str(work / "lora_init.safetensors"))
    with torch.no_grad():
        for name, p in zip(trainer.param_names, trainer.params):
            layer, _, role = name.rpartition(".lora_adapters.0.")
            p.copy_(init[f"{layer}.lora_{'A' if role == 'down' else 'B'}"])
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times, losses, base, peak = _time_steps(lambda k: trainer.train_step().loss, args.steps, sync)
    return {"times": times, "losses": losses, "rss_before_mib": base, "rss_peak_mib": peak,
            "cuda_peak_mib": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None}


def _worker_reference(args, work: Path) -> dict:
    import types

    from diffusers import CogVideoXDPMScheduler, CogVideoXTransformer3DModel
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline
    from peft import LoraConfig
    from safetensors.torch import load_file

    dev = torch.device(args.device)
    cfg = json.loads((work / "config.json").read_text())
    ref = CogVideoXTransformer3DModel(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    ref.load_state_dict(load_file(str(work / "weights.safetensors")), strict=False)
    ref.requires_grad_(False)
    ref.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights=True, target_modules=TARGETS))
    init = load_file(str(work / "lora_init.safetensors"))
    params = []
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                layer = name.split(".lora_")[0]
                p.copy_(init[f"{layer}.lora_{'A' if '.lora_A.' in name else 'B'}"])
                params.append(p)
    if not args.no_gradient_checkpointing:
        ref.enable_gradient_checkpointing()
    ref.to(dev).train()
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-4)
    scheduler = CogVideoXDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction",
                                      timestep_spacing="trailing", rescale_betas_zero_snr=True, snr_shift_scale=1.0)
    inputs = load_file(str(work / "inputs.safetensors"))
    lat_t, h, w = inputs["0.latents"].shape[2:]
    rope = None
    if ref.config.use_rotary_positional_embeddings:
        fake = types.SimpleNamespace(transformer=ref, vae_scale_factor_spatial=8)
        rope = CogVideoXPipeline._prepare_rotary_positional_embeddings(fake, h * 8, w * 8, lat_t, dev)

    def step(k: int) -> float:
        # the loss lines of diffusers' examples/cogvideo/train_cogvideox_lora.py, on (B, F, C, H, W) latents
        latents = inputs[f"{k}.latents"].to(dev).permute(0, 2, 1, 3, 4)
        noise = inputs[f"{k}.noise"].to(dev).permute(0, 2, 1, 3, 4)
        t = inputs[f"{k}.t"].to(dev)
        noisy = scheduler.add_noise(latents, noise, t)
        out = ref(hidden_states=noisy, encoder_hidden_states=inputs[f"{k}.context"].to(dev), timestep=t,
                  image_rotary_emb=rope, return_dict=False)[0]
        pred = scheduler.get_velocity(out, noisy, t)
        weights = 1 / (1 - scheduler.alphas_cumprod[t])
        while weights.ndim < pred.ndim:
            weights = weights.unsqueeze(-1)
        loss = torch.mean((weights * (pred - latents) ** 2).reshape(latents.shape[0], -1), dim=1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times, losses, base, peak = _time_steps(step, args.steps, sync)
    return {"times": times, "losses": losses, "rss_before_mib": base, "rss_peak_mib": peak,
            "cuda_peak_mib": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None}


# ---------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------
def _passthrough(args) -> list[str]:
    out = ["--variant", args.variant, "--layers", str(args.layers), "--heads", str(args.heads), "--frames",
           str(args.frames), "--height", str(args.height), "--width", str(args.width), "--batch-size",
           str(args.batch_size), "--rank", str(args.rank), "--steps", str(args.steps), "--device", args.device,
           "--threads", str(args.threads)]
    return out + (["--no-gradient-checkpointing"] if args.no_gradient_checkpointing else [])


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        torch.manual_seed(0)
        result = (_worker_ours if args.worker == "ours" else _worker_reference)(args, Path(args.workdir))
        print("RESULT " + json.dumps(result))
        return 0
    require_reference("bench-train", "diffusers", "peft")
    results: dict[str, list[dict]] = {"reference": [], "ours": []}
    with tempfile.TemporaryDirectory(prefix="cogvx-bench-train-") as tmp:
        work = Path(tmp)
        _prepare(args, work)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                                         os.environ.get("PYTHONPATH")]))}
        rounds = max(args.rounds, 1)
        for round_ in range(rounds):
            for side in ("reference", "ours"):
                print(f"round {round_ + 1}/{rounds}: {side} ...", end="", file=sys.stderr, flush=True)
                cmd = [sys.executable, "-m", "cogvx_core", "bench-train", "--worker", side, "--workdir", str(work),
                       *_passthrough(args)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if proc.returncode or line is None:
                    raise CogVXError(f"bench-train: the {side} worker failed:\n{proc.stderr[-2000:]}")
                results[side].append(json.loads(line[len("RESULT "):]))
                times = results[side][-1]["times"]
                print(f" {1 / statistics.median(times):.3f} steps/s", file=sys.stderr, flush=True)

    def summary(runs: list[dict]) -> dict:
        step = statistics.median(t for r in runs for t in r["times"])
        cuda = [r["cuda_peak_mib"] for r in runs if r["cuda_peak_mib"] is not None]
        return {"steps_per_s": 1 / step, "step_s": step,
                "peak_rss_mib": statistics.median(r["rss_peak_mib"] for r in runs),
                "train_rss_mib": statistics.median(r["rss_peak_mib"] - r["rss_before_mib"] for r in runs),
                "cuda_peak_mib": statistics.median(cuda) if cuda else None, "losses": runs[0]["losses"]}

    ours, ref = summary(results["ours"]), summary(results["reference"])
    parity = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours["losses"], ref["losses"]))
    report = {"config": {k: getattr(args, k) for k in ("variant", "layers", "heads", "frames", "height", "width",
                                                         "batch_size", "rank", "steps", "rounds", "device")},
              "gradient_checkpointing": not args.no_gradient_checkpointing, "ours": ours, "reference": ref,
              "steps_per_s_ratio": ours["steps_per_s"] / ref["steps_per_s"],
              "peak_rss_ratio": ours["peak_rss_mib"] / ref["peak_rss_mib"],
              "train_rss_ratio": ours["train_rss_mib"] / max(ref["train_rss_mib"], 1e-9),
              "loss_max_rel_diff": parity}
    mem = "cuda_peak_mib" if args.device.startswith("cuda") else "train_rss_mib"
    print(f"one LoRA training step, {args.variant} x{args.layers} layers, {args.heads * 64} wide, {args.frames}x"
          f"{args.width}x{args.height}, batch {args.batch_size}, rank {args.rank}, {args.device}, checkpointing "
          f"{'on' if not args.no_gradient_checkpointing else 'off'}")
    for name, r in (("reference (diffusers+peft)", ref), ("ours", ours)):
        print(f"  {name:27s} {r['steps_per_s']:7.3f} steps/s  peak RSS {r['peak_rss_mib']:8.1f} MiB  "
              f"training memory {r[mem]:8.1f} MiB")
    print(f"  ratio ours/reference: speed {report['steps_per_s_ratio']:.3f}x, peak RSS {report['peak_rss_ratio']:.3f}x,"
          f" training memory {ours[mem] / max(ref[mem], 1e-9):.3f}x; loss max rel diff {parity:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0
