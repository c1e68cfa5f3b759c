"""`cogvx recipe`: the project's seeded training recipes.

    python -m cogvx_core recipe tiny [--out DIR | --replace-builtin] [--work DIR] [--smoke]
    python -m cogvx_core recipe lora-demo [--model DIR] [--out DIR]
    python -m cogvx_core recipe eus [--out DIR]
"""

from __future__ import annotations

import json

from ..recipes.synthetic import SPARE_COLOUR_NAMES, UNSEEN_SHAPE_COLOURS

DEFAULT_TINY_OUT = "out/cogvx-tiny"

HELP = "seeded training recipes: the built-in tiny model, the LoRA demonstration, the EUS ablation"


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="recipe", metavar="RECIPE", required=True)
    fmt = {"formatter_class": p.formatter_class}  # every level of --help shows the defaults
    tiny = sub.add_parser("tiny", help="train the built-in cogvx-tiny model from scratch (data, T5, VAE, transformer)",
                          **fmt)
    tiny.add_argument("--out", default=DEFAULT_TINY_OUT, help="model folder to write; never the shipped model unless "
                      f"--replace-builtin (default {DEFAULT_TINY_OUT})")
    tiny.add_argument("--replace-builtin", action="store_true", help="write the model over the shipped "
                      "cogvx_core/models/cogvx-tiny (instead of --out)")
    tiny.add_argument("--work", default="out/recipe-tiny", help="work folder: data, caches, checkpoints; a re-run "
                      "continues after the last finished stage (default out/recipe-tiny)")
    tiny.add_argument("--smoke", action="store_true", help="the same stages at a toy scale (seconds)")
    tiny.add_argument("--until", choices=["data", "text", "vae", "transformer"], default="transformer",
                      help="stop after this stage (a later run with the same --work continues; default: all)")

    lora = sub.add_parser("lora-demo", help="teach the tiny model a shape colour it never drew with a LoRA trained "
                          "by the project's trainer; adherence before and after", **fmt)
    lora.add_argument("--model", help="base model folder (default: the built-in cogvx-tiny)")
    lora.add_argument("--out", default="out/lora-demo", help="output folder: LoRA, numbers, figure")
    lora.add_argument("--colour", choices=list(UNSEEN_SHAPE_COLOURS), default=SPARE_COLOUR_NAMES[0],
                      help="the shape colour to teach (default purple: a word no base clip has; black and gray "
                      "are base words for backgrounds only)")
    lora.add_argument("--smoke", action="store_true", help="a toy-scale run (seconds)")

    eus = sub.add_parser("eus", help="the paper's Explicit Uniform Sampling ablation: loss-curve variance with and "
                         "without it", **fmt)
    eus.add_argument("--model", help="model folder whose VAE, T5 and transformer config are used (default: the "
                     "built-in cogvx-tiny)")
    eus.add_argument("--out", default="out/eus", help="output folder: numbers and figure")
    eus.add_argument("--smoke", action="store_true", help="a toy-scale run (seconds)")


def run(args) -> int:
    if args.recipe == "tiny":
        from ..models import TINY_MODEL
        from ..recipes.tiny import TinyRecipe, build

        recipe = TinyRecipe.smoke() if args.smoke else TinyRecipe()
        out = TINY_MODEL if args.replace_builtin else args.out
        result = build(out, args.work, recipe, until=args.until, replace_builtin=args.replace_builtin)
    elif args.recipe == "lora-demo":
        from ..recipes.demos import lora_demo

        result = lora_demo(args.model, args.out, colour=args.colour, smoke=args.smoke)
    else:
        from ..recipes.demos import eus_ablation

        result = eus_ablation(args.model, args.out, smoke=args.smoke)
    print(json.dumps(result, indent=1))
    return 0
