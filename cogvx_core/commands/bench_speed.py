"""`cogvx bench-speed`: the whole sampling loop (50 CFG steps) of CogVX eager, compiled, compiled + fp8 matmuls and
compiled + TeaCache, against diffusers' transformer eager and compiled, in one process at one size.

Prepared for a GPU check: `python -m cogvx_core bench-speed` runs 5B at 49x480x720, 50 steps, bf16 (the issue's
H100 target: diffusers 87.5 s compiled). The weights are random (the machine cannot download; speed does not depend
on the weights, and TeaCache's skipped steps depend only on the timesteps, so its pass count is the real one).
Each setting is warmed up with two steps (compilation happens there), then timed over the full loop; text encoding
and VAE decoding are not included. On a CPU `--small` runs the same code on a small config (seconds).
`speed_check()` is the function a joint GPU check script can call; it returns one dict per setting.
"""

from __future__ import annotations

import importlib.util
import time
import types

import torch

from ..errors import CogVXError

HELP = "sampling-loop speed: CogVX eager / compiled / fp8 / TeaCache against diffusers eager and compiled"

SETTINGS = ("eager", "compiled", "compiled+fp8", "compiled+teacache")
REFERENCE_SETTINGS = ("diffusers-eager", "diffusers-compiled")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SMALL = dict(variant="5b", layers=2, heads=2, head_dim=64, frames=9, height=64, width=96, steps=4)


def add_arguments(p) -> None:
    p.add_argument("--variant", default="5b", help="architecture (random weights)")
    p.add_argument("--layers", type=int, help="transformer blocks (default: the released model's)")
    p.add_argument("--frames", type=int, default=49, help="pixel frames")
    p.add_argument("--height", type=int, default=480, help="pixel height")
    p.add_argument("--width", type=int, default=720, help="pixel width")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (DDIM, guidance 6)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="compute dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--settings", default=",".join(SETTINGS + REFERENCE_SETTINGS),
                   help="comma separated, from " + ", ".join(SETTINGS + REFERENCE_SETTINGS))
    p.add_argument("--teacache", type=float, default=0.3, help="TeaCache threshold of compiled+teacache")
    p.add_argument("--small", action="store_true", help="a small config for a CPU smoke run (overrides sizes)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> tuple[float, float | None, object]:
    """(seconds, peak GiB on CUDA or None, result)."""
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, peak, out


def speed_check(*, variant: str = "5b", layers: int | None = None, heads: int | None = None,
                head_dim: int | None = None, frames: int = 49, height: int = 480, width: int = 720, steps: int = 50,
                dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cuda",
                settings=SETTINGS + REFERENCE_SETTINGS, teacache: float = 0.3, compile_backend: str = "inductor",
                say=print) -> list[dict]:
    """Times each setting's full sampling loop (guidance 6, DDIM) on random weights; returns one row per setting with
    seconds, passes computed/skipped, peak memory and the relative L2 difference of the final latents to CogVX eager
    (to the diffusers eager run for diffusers-compiled)."""
    from ..cache import PUBLISHED_COEFFICIENTS, CacheRun, StepCache
    from ..modules.fp8 import note_for, to_fp8_fast
    from ..pipeline import denoise, latent_shape
    from ..samplers import sample
    from ..schedule import NoiseSchedule
    from ..transformer import build_transformer
    from ..variants import get_variant

    unknown = [s for s in settings if s not in SETTINGS + REFERENCE_SETTINGS]
    if unknown:
        raise CogVXError(f"Unknown settings {unknown}; choose from {', '.join(SETTINGS + REFERENCE_SETTINGS)}.")
    device = torch.device(device)
    v = get_variant(variant)
    overrides = {k: x for k, x in (("num_layers", layers), ("num_attention_heads", heads),
                                   ("attention_head_dim", head_dim)) if x is not None}
    cfg = v.transformer_config(**overrides)
    model = build_transformer(cfg, device=device, dtype=dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for t in model.state_dict().values():
            t.copy_((torch.randn(t.shape, generator=g) * 0.02).to(t.dtype))
    model.eval().requires_grad_(False)
    schedule = NoiseSchedule.for_variant(v)
    timesteps = schedule.timesteps(steps)
    shape, _ = latent_shape(model, 1, frames, height, width)
    noise = torch.randn(shape, generator=g).to(device, dtype)
    cond = torch.randn(1, cfg["max_text_seq_length"], cfg["text_embed_dim"], generator=g).to(device, dtype)
    uncond = torch.zeros_like(cond)
    image = torch.zeros_like(noise) if v.i2v else None
    teacache_setting = StepCache("teacache", teacache, PUBLISHED_COEFFICIENTS[v.name], "published")

    def ours(n: int, cache=None):
        run = CacheRun(cache, n)
        with torch.no_grad():
            out = denoise(model, noise.clone(), cond=cond, uncond=uncond, schedule=schedule,
                          timesteps=timesteps[:n], num_steps=steps, guidance=6.0, image_latents=image, cache_run=run)
        return out, run

    rows: list[dict] = []
    finals: dict[str, torch.Tensor] = {}

    def record(name: str, fn, compare_to: str | None):
        fn(2)  # warm-up: compiles where compiled
        seconds, peak, (out, run) = _timed(lambda: fn(steps), device)
        finals[name] = out.float()
        row = {"setting": name, "seconds": round(seconds, 3), "peak_gib": None if peak is None else round(peak, 2),
               "passes_computed": run.computed, "passes_skipped": run.skipped}
        if compare_to in finals:
            ref = finals[compare_to]
            row["rel_l2_vs_" + compare_to] = float((out.float() - ref).norm() / ref.norm())
        rows.append(row)
        say(f"{name}: {seconds:.2f} s, passes {run.computed}/{run.computed + run.skipped}" +
            (f", peak {peak:.1f} GiB" if peak is not None else ""))

    from ..compile import compile_blocks

    def compiled():
        compile_blocks(model, backend=compile_backend)

    if "eager" in settings:
        record("eager", lambda n: ours(n), None)
    if "compiled" in settings:
        compiled()
        record("compiled", lambda n: ours(n), "eager")
    if "compiled+teacache" in settings:
        compiled()
        record("compiled+teacache", lambda n: ours(n, teacache_setting), "eager")
    wanted = [s for s in REFERENCE_SETTINGS if s in settings]
    weights = {k: t.to("cpu", copy=True) for k, t in model.state_dict().items()} if wanted else {}
    if "compiled+fp8" in settings:  # last of ours: converts the weights in place
        compiled()
        note = note_for(device)
        if note:
            say(note)
        to_fp8_fast(model, names=lambda name: name.startswith("transformer_blocks."))
        record("compiled+fp8", lambda n: ours(n), "eager")

    if wanted:
        if importlib.util.find_spec("diffusers") is None:
            say("diffusers is not installed: the reference rows are skipped")
            return rows
        from diffusers import CogVideoXTransformer3DModel
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline

        del model
        ref = CogVideoXTransformer3DModel(**cfg).to(device, dtype)
        ref.load_state_dict(weights, strict=False)
        del weights
        ref.eval().requires_grad_(False)
        _, _, lat_t, lat_h, lat_w = shape
        rope = None
        ofs = torch.full((1,), 2.0, device=device) if cfg["ofs_embed_dim"] else None
        if cfg["use_rotary_positional_embeddings"]:
            fake = types.SimpleNamespace(transformer=ref, vae_scale_factor_spatial=8)

        def predict(x, t, do_cfg):
            nonlocal rope
            if cfg["use_rotary_positional_embeddings"]:  # the reference pipeline makes its tables per call
                rope = CogVideoXPipeline._prepare_rotary_positional_embeddings(fake, lat_h * 8, lat_w * 8, lat_t,
                                                                              device)
            x_in = torch.cat([x, x]).permute(0, 2, 1, 3, 4)  # the reference's (B, T, C, H, W)
            if image is not None:
                x_in = torch.cat([x_in, x_in], dim=2)
            ts = torch.full((2,), t, device=device, dtype=torch.long)
            out = ref(hidden_states=x_in, encoder_hidden_states=torch.cat([uncond, cond]), timestep=ts, ofs=ofs,
                      image_rotary_emb=rope, return_dict=False)[0].permute(0, 2, 1, 3, 4)
            v_uncond, v_cond = out.chunk(2)
            return v_cond, v_uncond

        def reference(n: int):
            with torch.no_grad():
                out = sample(predict, noise.clone(), schedule=schedule, timesteps=timesteps[:n], num_steps=steps,
                             guidance=6.0)
            return out, CacheRun(None, n, computed=n)

        if "diffusers-eager" in settings:
            record("diffusers-eager", reference, "eager")
        if "diffusers-compiled" in settings:
            for block in ref.transformer_blocks:  # the same regional compilation as ours
                block.compile(backend=compile_backend, dynamic=False, fullgraph=True)
            record("diffusers-compiled", reference, "diffusers-eager")
    return rows


def format_rows(rows: list[dict]) -> str:
    base = next((r["seconds"] for r in rows if r["setting"] == "diffusers-compiled"), None)
    lines = ["| setting | seconds | vs diffusers compiled | passes computed / skipped | peak GiB | rel. L2 |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        diff = next((f"{v:.1e} ({k[10:]})" for k, v in r.items() if k.startswith("rel_l2_vs_")), "")
        ratio = f"{r['seconds'] / base:.2f}x" if base else ""
        peak = "" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        lines.append(f"| {r['setting']} | {r['seconds']:.2f} | {ratio} | {r['passes_computed']} / "
                     f"{r['passes_skipped']} | {peak} | {diff} |")
    return "\n".join(lines)


def run(args) -> int:
    import json
    from pathlib import Path

    sizes = dict(variant=args.variant, layers=args.layers, frames=args.frames, height=args.height,
                 width=args.width, steps=args.steps)
    if args.small:
        sizes = dict(SMALL)
    settings = tuple(s.strip() for s in args.settings.split(",") if s.strip())
    print(f"device {args.device}, dtype {args.dtype}, torch {torch.__version__}, {sizes}")
    rows = speed_check(**sizes, dtype=DTYPES[args.dtype], device=args.device, settings=settings,
                       teacache=args.teacache)
    print(format_rows(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"config": sizes, "device": args.device, "rows": rows}, indent=1))
    return 0
