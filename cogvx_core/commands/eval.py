"""`cogvx eval`: the quality benchmark (prompt adherence on held-out synthetic prompts, VAE PSNR and flicker)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from ..checkpoints.io import write_json
from ..errors import CogVXError

HELP = "quality benchmark: prompt adherence on held-out synthetic prompts (DDIM/DPM x steps), VAE PSNR and flicker"


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CogVXError(f"{text!r}: give whole numbers separated by commas, e.g. 10,25,50.") from None
    if not values or min(values) < 1:
        raise CogVXError(f"{text!r}: give step counts of at least 1, e.g. 10,25,50.")
    return values


def model_folder(model: str | None) -> str:
    """--model, or the built-in model when none is given; a clear error when the folder is missing."""
    from ..models import TINY_MODEL, builtin_models

    if model is None:
        if not builtin_models():
            raise CogVXError(f"No --model given and the built-in model is missing ({TINY_MODEL}); pass --model.")
        return str(TINY_MODEL)
    if not Path(model).is_dir():
        raise CogVXError(f"--model {model}: no such folder.")
    return model


def write_report(path: str, report: dict) -> None:
    """The JSON report (written whole or not at all), its path on stderr."""
    write_json(path, report)
    print(path, file=sys.stderr)


def add_arguments(p) -> None:
    p.add_argument("--model", help="diffusers-format model folder (default: the built-in cogvx-tiny)")
    p.add_argument("--prompts", type=int, default=50, help="held-out prompts per setting (default 50)")
    p.add_argument("--steps", default="10,25,50", help="sampling step counts, comma separated (default 10,25,50)")
    p.add_argument("--samplers", default="ddim,dpm", help="samplers, comma separated (default ddim,dpm)")
    p.add_argument("--guidance", type=float, default=6.0, help="classifier-free guidance scale (default 6)")
    p.add_argument("--split", choices=["heldout", "train", "spare"], default="heldout",
                   help="whose caption combinations to prompt with (default heldout: never trained)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt order and the noise")
    p.add_argument("--batch-size", type=int, default=10, help="videos generated together (default 10)")
    p.add_argument("--vae-clips", type=int, default=32, help="held-out clips for the VAE PSNR (0: skip; default 32)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:STRENGTH]", help="apply a LoRA (repeatable)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--cache", action="append", default=[], metavar="teacache[:T]|fbcache[:T]",
                   help="also run with this step cache (repeatable) and compare each to the uncached run: adherence, "
                   "passes computed/skipped, wall time, PSNR to the uncached video of the same seed")
    p.add_argument("--cache-coefficients", metavar="FILE", help="TeaCache coefficients from calibrate-cache")
    p.add_argument("--plot", metavar="PNG", help="with --cache: a chart of speed-up against PSNR")
    p.add_argument("--json", metavar="FILE", help="also write every number (and each prompt's verdict) as JSON")


def run(args) -> int:
    from ..pipeline import load_pipeline
    from ..recipes.quality import adherence, benchmark_prompts, format_table, heldout_clips, vae_quality
    from .common import ProgressBar, parse_lora

    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    bad = [s for s in samplers if s not in ("ddim", "dpm")]
    if bad or not samplers:
        raise CogVXError(f"--samplers {args.samplers!r}: choose from ddim, dpm (comma separated).")
    steps = int_list(args.steps)
    args.model = model_folder(args.model)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = load_pipeline(args.model, device=device)
    if args.lora:
        from ..lora import apply_loras, load_lora

        apply_loras(pipe.transformer, [(load_lora(p), s) for p, s in map(parse_lora, args.lora)])
    size = pipe.transformer.default_size()
    prompts = benchmark_prompts(args.prompts, args.split, args.seed)
    report: dict = {"model": args.model, "split": args.split, "prompts": len(prompts), "guidance": args.guidance,
                    "seed": args.seed, "size": {"frames": size[0], "height": size[1], "width": size[2]},
                    "lora": args.lora, "adherence": []}
    print(f"{len(prompts)} {args.split} prompts, {size[2]}x{size[1]}, {size[0]} frames, guidance {args.guidance}",
          file=sys.stderr)
    if args.cache:
        return _run_caches(args, pipe, prompts, samplers, steps, size, report)
    print(format_table([]), flush=True)  # the table's header now, each row as its setting finishes
    for sampler in samplers:
        for n in steps:
            r = adherence(pipe, prompts, sampler=sampler, steps=n, guidance=args.guidance, seed=args.seed,
                          batch_size=args.batch_size, size=size, progress=ProgressBar(f"{sampler} {n} steps"))
            report["adherence"].append(r.to_dict(with_verdicts=True))
            print(format_table([r]).splitlines()[-1], flush=True)
    if args.vae_clips > 0:
        start = time.perf_counter()
        vq = vae_quality(pipe.vae, heldout_clips(args.vae_clips, size))
        vq["seconds"] = round(time.perf_counter() - start, 1)
        report["vae"] = vq
        print(f"\nVAE on {vq['clips']} held-out clips: PSNR {vq['psnr']:.2f} dB (min {vq['psnr_min']:.2f}), "
              f"flicker {vq['flicker_reconstruction']:.2f} (source clips {vq['flicker_source']:.2f})")
    if args.json:
        write_report(args.json, report)
    return 0


def _run_caches(args, pipe, prompts, samplers, steps, size, report) -> int:
    """eval --cache: each cache setting against the uncached run (cache_report.compare)."""
    from ..cache import parse_cache, resolve
    from ..recipes.cache_report import compare, format_table, speed_quality_chart
    from .common import ProgressBar

    settings = [resolve(parse_cache(spec), pipe.variant, released=pipe.transformer.released_size,
                        model_dir=args.model, coefficients_file=args.cache_coefficients) for spec in args.cache]
    if any(s is None for s in settings):
        raise CogVXError("--cache off compares nothing: name a cache, e.g. --cache teacache:0.3.")
    rows = []
    for sampler in samplers:
        for n in steps:
            rows += compare(pipe, prompts, settings, sampler=sampler, steps=n, guidance=args.guidance, seed=args.seed,
                            batch_size=args.batch_size, size=size, progress=ProgressBar)
    print(format_table(rows))
    report["cache"] = rows
    if args.plot:
        path = Path(args.plot)
        path.parent.mkdir(parents=True, exist_ok=True)
        speed_quality_chart(rows).save(path)
        print(path, file=sys.stderr)
    if args.json:
        write_report(args.json, report)
    return 0
