"""`cogvx bench-gpu`: does a request fit the card, how fast, and was the planner right? One prepared run.

Builds the released 5B and 1.5 transformers and the VAE with random weights (T5 is not run: prompts are random
embeddings) and generates through the real pipeline (`CogVideoXPipeline.generate`) under each case's offload mode
and memory budget, with the settings the planner picks for that budget (resident blocks, decode tiles):

  5b-none      49x480x720, offload none, decode at the tiles the card's free memory allows
  5b-8gb       the same under an 8 GiB budget (bf16)              target: peak <= 8 GiB, time <= 1.25 x 5b-none
  5b-6gb       the same under 6 GiB (bf16), sampling only
  5b-fp8-6gb   fp8 weight storage under 6 GiB                     target: peak <= 6 GiB
  1.5-12gb     1.5 at 81x768x1360 under 12 GiB, a few steps,     target: peak <= 12 GiB
               sampling only (--decode-all decodes every case)
The first case runs one untimed step first (CUDA's first-call costs). Estimated on an H100 at the default steps:
about 6-7 minutes. The JSON and markdown are rewritten after every case, so a run cut short keeps what it measured.

Per case: sampling and decode time, the peak device memory of each stage (CUDA: torch.cuda.max_memory_allocated;
CPU: live tensor bytes, which counts activations and streamed block copies, not resident weights) beside the
planner's prediction of the same quantity, and whether the latents equal those of 5b-none bit for bit. The table is
printed last and written as bench_gpu.json and bench_gpu.md under --out. `--small` runs the same cases with a small
config of the same architecture (CPU, seconds), so the command itself is tested without a GPU.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import CogVXError

HELP = "GPU check: time and peak memory of 5B / 1.5 generation under offload modes and budgets, planner beside"

GiB = 1024**3


@dataclass(frozen=True)
class Case:
    name: str
    variant: str
    frames: int
    height: int
    width: int
    budget_gib: float | None  # None: the device's free memory (CPU: no budget)
    fp8: bool = False
    short: bool = False  # runs --short-steps instead of --steps
    decode: bool = True
    target: str = ""


CASES = [
    Case("5b-none", "5b", 49, 480, 720, None, target="reference time"),
    Case("5b-8gb", "5b", 49, 480, 720, 8, target="peak <= 8 GiB, time <= 1.25x 5b-none"),
    Case("5b-6gb", "5b", 49, 480, 720, 6, short=True, decode=False),
    Case("5b-fp8-6gb", "5b", 49, 480, 720, 6, fp8=True, short=True, target="peak <= 6 GiB"),
    Case("1.5-12gb", "1.5-5b", 81, 768, 1360, 12, short=True, decode=False, target="peak <= 12 GiB (sampling)"),
]

# --small: the same cases on a small model of the same architecture, sized so that its weights matter as they do
# on a card; budgets are fractions of 5b-none's predicted sampling peak, so blocks streaming and decode tiles run.
SMALL_TRANSFORMER = dict(num_attention_heads=4, attention_head_dim=64, num_layers=8, text_embed_dim=64,
                         time_embed_dim=64, max_text_seq_length=16, sample_height=16, sample_width=16)
SMALL_VAE = dict(block_out_channels=[8, 16, 16, 32], layers_per_block=1, norm_num_groups=4, sample_height=128,
                 sample_width=128)
SMALL_SIZE = (9, 96, 128)
SMALL_BUDGET_FRACTION = {"5b-8gb": 0.75, "5b-6gb": 0.55, "5b-fp8-6gb": 0.55, "1.5-12gb": 0.75}


def add_arguments(p) -> None:
    p.add_argument("--small", action="store_true", help="small configs on the CPU (a test of the command itself)")
    p.add_argument("--out", default="out/bench-gpu", help="folder for bench_gpu.json and bench_gpu.md")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --small)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps of 5b-none and 5b-8gb (default 50)")
    p.add_argument("--short-steps", type=int, default=10,
                   help="steps of the other cases (default 10; their 50-step time is extrapolated)")
    p.add_argument("--steps-15", type=int, default=3, help="steps of the 1.5 case (default 3)")
    p.add_argument("--prefetch", type=int, default=1, help="blocks copied ahead while one computes in the streamed "
                   "cases")
    p.add_argument("--no-warmup", action="store_true", help="skip the first case's untimed 1-step warm-up")
    p.add_argument("--decode-all", action="store_true", help="decode in every case (default: not 5b-6gb, 1.5)")
    p.add_argument("--cases", default=",".join(c.name for c in CASES), help="comma-separated case names")


# ---------------------------------------------------------------------------------------------------------------
# Models with random weights
# ---------------------------------------------------------------------------------------------------------------
def _fill_random(module: torch.nn.Module, device: torch.device, seed: int) -> None:
    """Every tensor random (norm gains 1), made on `device` (fast on a GPU), stored back where the module lives."""
    from ..checkpoints.io import set_tensor

    g = torch.Generator(device).manual_seed(seed)
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        value = torch.empty(t.shape, device=device, dtype=torch.float32)
        if t.ndim == 1 and "norm" in name and name.endswith("weight"):
            value.fill_(1.0)
        else:
            value.normal_(0.0, 0.02, generator=g)
        set_tensor(module, name, value.to(t.dtype).to("cpu"))


def _transformer(config: dict, dtype: torch.dtype, fp8: bool, device: torch.device):
    from ..checkpoints.transformer import _is_fp8_weight
    from ..checkpoints.io import set_tensor
    from ..transformer import build_transformer

    model = build_transformer(config, device="meta", dtype=dtype)
    _fill_random(model, device, seed=0)
    if fp8:  # the loader's rule: the big matmul weights in fp8, the rest in the compute dtype
        for name, p in list(model.named_parameters()):
            if _is_fp8_weight(name):
                set_tensor(model, name, p.data.to(torch.float8_e4m3fn))
    return model.eval().requires_grad_(False)


def _vae(config: dict, dtype: torch.dtype, device: torch.device):
    from ..vae import build_vae

    vae = build_vae(config, device="meta", dtype=dtype)
    _fill_random(vae, device, seed=1)
    return vae.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------------------------
class _Meter:
    """Stage times and peaks. CUDA: allocator peaks (reset between stages); CPU: live tensor bytes."""

    def __init__(self, device: torch.device):
        from ..memory_plan import LiveBytes

        self.cuda = device.type == "cuda"
        self.live = None if self.cuda else LiveBytes()
        self.marks: dict[str, float] = {}
        self.peaks: dict[str, int] = {}

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated() if self.cuda else self.live.peak

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self.live.peak = self.live.current

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def progress(self, done: int, total: int) -> None:
        if done == total and "sampled" not in self.marks:
            self.marks["sampled"] = self.now()
            self.peaks["sampling"] = self.peak()
            self.reset()


def _run_case(case: Case, args, device: torch.device, models: dict, reference: dict) -> dict:
    from ..memory_plan import Request, choose, plan
    from ..offload import Offload
    from ..pipeline import CogVideoXPipeline

    small = args.small
    dtype = torch.bfloat16
    transformer, vae = models[(case.variant, case.fp8)], models["vae"]
    frames, height, width = SMALL_SIZE if small else (case.frames, case.height, case.width)
    steps = args.steps_15 if case.variant.startswith("1.5") else args.short_steps if case.short else args.steps
    request = Request(transformer.config, vae.config, frames, height, width, dtype=dtype,
                      weight_dtype=torch.float8_e4m3fn if case.fp8 else None, text_device="cpu",
                      prefetch=args.prefetch, text_length=transformer.config["max_text_seq_length"])
    if small:
        budget = (None if case.budget_gib is None else
                  int(SMALL_BUDGET_FRACTION[case.name] * reference["none_peak"]) + (256 << 20))
    elif case.budget_gib is None:
        budget = int(torch.cuda.mem_get_info(device)[0]) if device.type == "cuda" else None
    else:
        budget = int(case.budget_gib * GiB)
    # T5 does not run here (random prompt embeddings): plans keep it off the device.
    chosen = choose(request, budget, text_devices=("cpu",)) if budget is not None else plan(request)
    if case.budget_gib is None:
        reference["none_peak"] = plan(replace(chosen.request, offload="none", tile=None)).stage("sampling").peak
    r = chosen.request
    offload = Offload.from_plan(chosen, device)
    if r.offload == "none":
        transformer.to(device), vae.to(device)
    pipe = CogVideoXPipeline(transformer, vae, None, offload=offload)
    text = transformer.config["max_text_seq_length"], transformer.config["text_embed_dim"]
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(1, *text, generator=g).to(dtype), torch.randn(1, *text, generator=g).to(dtype)
    tiles = chosen.decode_kwargs()
    if not args.no_warmup and not reference.get("warm"):  # first-call costs (cuBLAS, allocator) out of the timing
        reference["warm"] = True
        pipe.generate(cond=cond, uncond=uncond, frames=frames, height=height, width=width, steps=1, seed=0,
                      decode_frames=False)
    meter = _Meter(device)
    if meter.cuda:
        torch.cuda.empty_cache()
    meter.reset()
    start = meter.now()
    if meter.live is not None:
        meter.live.__enter__()
    decode = case.decode or args.decode_all
    try:
        result = pipe.generate(cond=cond, uncond=uncond, frames=frames, height=height, width=width, steps=steps,
                               seed=0, progress=meter.progress, decode_frames=decode, **tiles)
    finally:
        if meter.live is not None:
            meter.live.__exit__(None, None, None)
    end = meter.now()
    meter.peaks["decode"] = meter.peak()
    transformer.to("cpu"), vae.to("cpu")
    sampling_s = meter.marks["sampled"] - start
    same = None
    if case.variant == "5b" and not case.fp8:
        if case.budget_gib is None:
            reference.update(latents=result.latents.cpu(), steps=steps)
        elif reference.get("steps") == steps:  # comparable only at the same step count
            same = bool(torch.equal(result.latents.cpu(), reference["latents"]))
    predicted = {s.name: s.peak for s in chosen.stages}
    if not meter.cuda:  # live bytes see activations and streamed copies, not the weights already in place
        predicted = {s.name: s.activations + _streamed_bytes(chosen, s.name) for s in chosen.stages}
    if not decode:
        meter.peaks["decode"] = predicted["decode"] = 0
    del result
    return dict(case=case.name, target=case.target, settings=chosen.describe(), budget=budget, steps=steps,
                sampling_s=round(sampling_s, 2), s_per_step=round(sampling_s / steps, 3),
                sampling_s_50=round(sampling_s / steps * 50, 1), decode_s=round(end - meter.marks["sampled"], 2),
                measured_sampling=meter.peaks["sampling"], predicted_sampling=predicted["sampling"],
                measured_decode=meter.peaks["decode"], predicted_decode=predicted["decode"],
                same_latents_as_none=same, measure="cuda max_memory_allocated" if meter.cuda else "cpu live bytes")


def _streamed_bytes(chosen, stage: str) -> int:
    """Device copies the block streamer makes during sampling (made inside the run, so live bytes count them)."""
    from ..memory_plan import transformer_weights

    r = chosen.request
    if stage != "sampling" or r.offload != "blocks":
        return 0
    _, blocks = transformer_weights(r.transformer_config, r.dtype, r.weight_dtype)
    return min(len(blocks) - r.resident, r.prefetch + 1) * max(blocks)


# ---------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------
def _configs(variant: str, small: bool) -> tuple[dict, dict]:
    from ..variants import VAE_DEFAULTS, VARIANTS

    v = VARIANTS[variant]
    tcfg = v.transformer_config(**SMALL_TRANSFORMER) if small else v.transformer_config()
    vcfg = {**VAE_DEFAULTS, **(SMALL_VAE if small else {}), "scaling_factor": v.scaling_factor,
            "invert_scale_latents": v.invert_scale_latents}
    return tcfg, vcfg


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def _versus(measured: int, predicted: int) -> str:
    if not predicted:
        return "-"
    return f"{_size(measured)} / {_size(predicted)} ({predicted / max(measured, 1) - 1:+.1%})"


def _table(rows: list[dict]) -> str:
    head = ("| case | settings | steps | sampling s (50-step) | decode s | sampling peak: measured / predicted | "
            "decode peak: measured / predicted | same latents | target |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | error: {r['error']} | | | | | | | {r['target']} |")
            continue
        same = "-" if r["same_latents_as_none"] is None else r["same_latents_as_none"]
        decode_s = r["decode_s"] if r["predicted_decode"] else "-"
        lines.append(
            f"| {r['case']} | {r['settings']} | {r['steps']} | {r['sampling_s']} ({r['sampling_s_50']}) | {decode_s} | "
            f"{_versus(r['measured_sampling'], r['predicted_sampling'])} | "
            f"{_versus(r['measured_decode'], r['predicted_decode'])} | {same} | {r['target']} |")
    return "\n".join(lines)


def run(args) -> int:
    device = torch.device(args.device or ("cpu" if args.small else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CogVXError("bench-gpu needs a CUDA device; on a CPU run it with --small.")
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = sorted(set(names) - {c.name for c in CASES})
    if unknown:
        raise CogVXError(f"Unknown case(s) {', '.join(unknown)}; choose from {', '.join(c.name for c in CASES)}.")
    cases = [c for c in CASES if c.name in names]
    if any(c.budget_gib is not None and c.variant == "5b" for c in cases) and "5b-none" not in names and args.small:
        raise CogVXError("--small budgets are fractions of 5b-none's peak: include the 5b-none case.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, reference, models = [], {}, {}
    started = time.perf_counter()
    for case in cases:
        tcfg, vcfg = _configs(case.variant, args.small)
        for key in [k for k in models if k != "vae" and k != (case.variant, case.fp8)]:
            del models[key]  # one transformer in memory at a time
        if (case.variant, case.fp8) not in models:
            models[(case.variant, case.fp8)] = _transformer(tcfg, torch.bfloat16, case.fp8, device)
        if "vae" not in models:
            models["vae"] = _vae(vcfg, torch.bfloat16, device)
        print(f"[{time.perf_counter() - started:6.1f}s] {case.name} ...", flush=True)
        try:
            rows.append(_run_case(case, args, device, models, reference))
        except torch.cuda.OutOfMemoryError as e:  # a case that does not fit is a result, not the end of the run
            rows.append(dict(case=case.name, target=case.target, error=f"out of memory: {str(e)[:120]}"))
        print(json.dumps(rows[-1]), flush=True)
        table = _write(out, device, args.small, rows)
    print(f"\nbench-gpu on {_device_name(device)}, {time.perf_counter() - started:.0f} s\n{table}")
    return 0


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _write(out: Path, device: torch.device, small: bool, rows: list[dict]) -> str:
    table = _table(rows)
    name = _device_name(device)
    (out / "bench_gpu.json").write_text(json.dumps(dict(device=name, small=small, rows=rows), indent=1))
    (out / "bench_gpu.md").write_text(f"# bench-gpu on {name}{' (--small)' if small else ''}\n\n{table}\n")
    return table
