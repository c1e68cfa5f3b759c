"""`cogvx calibrate-cache`: fit TeaCache's polynomial to a model (with its LoRAs) from a few full generations."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..errors import CogVXError

HELP = "fit TeaCache's coefficients to a model (and its LoRAs) from full generations; writes them beside the model"

GENERIC_PROMPTS = (
    "A golden retriever runs across a sunny meadow, its fur moving in the wind.",
    "Waves roll onto a rocky beach at sunset, spray rising into the orange sky.",
    "A street in the rain at night, neon signs reflecting on the wet asphalt as people walk by.",
    "A hot air balloon drifts slowly over green hills and a winding river.",
    "A chef slices vegetables on a wooden board in a bright kitchen.",
    "Snow falls on a quiet pine forest while a deer walks between the trees.",
    "A red sports car drives along a coastal road past cliffs and the sea.",
    "Close-up of a hummingbird hovering beside a pink flower, wings blurred.",
)


def add_arguments(p) -> None:
    p.add_argument("--model", help="diffusers-format model folder (default: the built-in cogvx-tiny)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:STRENGTH]",
                   help="calibrate the model with this LoRA applied (repeatable); needs --out")
    p.add_argument("--prompts", type=int, default=8, help="prompts to generate")
    p.add_argument("--prompt-file", help="a text file with one prompt a line (default: the built-in model's "
                   "training captions, or a few generic prompts for other models)")
    p.add_argument("--steps", default="25,50", help="step counts to run each prompt at, comma separated")
    p.add_argument("--sampler", choices=["ddim", "dpm"], default="ddim", help="sampler of the calibration runs")
    p.add_argument("--guidance", type=float, default=6.0, help="classifier-free guidance scale")
    p.add_argument("--frames", type=int, help="pixel frames (default: the model's)")
    p.add_argument("--height", type=int, help="pixel height (default: the model's)")
    p.add_argument("--width", type=int, help="pixel width (default: the model's)")
    p.add_argument("--batch-size", type=int, default=4, help="videos generated together")
    p.add_argument("--seed", type=int, default=0, help="seed of the first batch (batch i uses seed + i)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", help="calibration file to write (default: cogvx_cache.json in the model folder, which "
                   "generate, eval and the nodes then use for this model)")


def _prompts(args, builtin: bool) -> list[str]:
    if args.prompts < 1:
        raise CogVXError(f"--prompts {args.prompts}: ask for at least one prompt.")
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise CogVXError(f"--prompt-file {path}: no such file.")
        pool = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not pool:
            raise CogVXError(f"--prompt-file {path}: no prompts in it.")
    elif builtin:
        from ..recipes.quality import benchmark_prompts

        return benchmark_prompts(args.prompts, "train", args.seed)  # never the held-out prompts eval scores
    else:
        pool = list(GENERIC_PROMPTS)
    return [pool[i % len(pool)] for i in range(args.prompts)]


def run(args) -> int:
    from ..cache import CACHE_FILE
    from ..calibrate import calibrate, write_calibration
    from ..models import TINY_MODEL
    from ..pipeline import load_pipeline
    from .common import ProgressBar, parse_lora
    from .eval import int_list, model_folder

    args.model = model_folder(args.model)
    if args.lora and not args.out:
        raise CogVXError("--lora: give --out FILE too; a calibration with a LoRA belongs to that LoRA, not beside the "
                         "base model. Pass the file to generate with --cache-coefficients.")
    if args.batch_size < 1:
        raise CogVXError(f"--batch-size {args.batch_size}: give at least 1.")
    steps = int_list(args.steps)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = load_pipeline(args.model, device=device)
    if args.lora:
        from ..lora import apply_loras, load_lora

        apply_loras(pipe.transformer, [(load_lora(p), s) for p, s in map(parse_lora, args.lora)])
    # unset: the model's own size (the release's, or the size a small model was trained at)
    size = tuple(a or d for a, d in zip((args.frames, args.height, args.width), pipe.transformer.default_size()))
    builtin = Path(args.model).resolve() == Path(TINY_MODEL).resolve()
    prompts = _prompts(args, builtin)
    result = calibrate(pipe, prompts, steps=steps, sampler=args.sampler, guidance=args.guidance, seed=args.seed,
                       batch_size=args.batch_size, size=size, progress=ProgressBar("calibrating"))
    out = Path(args.out) if args.out else Path(args.model) / CACHE_FILE
    write_calibration(result, out, model=Path(args.model).name, lora=list(args.lora))
    t = result["teacache"]
    print(f"TeaCache coefficients {['%.6g' % c for c in t['coefficients']]} (R^2 {t['r2']:.3f} over "
          f"{t['points']} steps of {len(prompts)} prompts x {len(steps)} step counts)", file=sys.stderr)
    print(out)
    return 0
