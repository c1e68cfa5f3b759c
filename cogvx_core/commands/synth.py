"""`cogvx synth`: write a synthetic captioned dataset (shapes moving over plain backgrounds), to train or evaluate."""

from __future__ import annotations

import argparse
import sys
import time

from ..recipes.synthetic import SPLITS, combos_for, make_dataset

HELP = "write a synthetic dataset of captioned clips (a coloured shape moving over a plain background)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="dataset folder to write (created if missing)")
    p.add_argument("--n", type=int, required=True, help="number of clips")
    p.add_argument("--seed", type=int, default=0, help="dataset seed; the same seed writes the same clips (default 0)")
    p.add_argument("--frames", type=int, default=9, help="frames per clip, 4k+1 (default 9)")
    p.add_argument("--height", type=int, default=64, help="frame height in pixels (default 64)")
    p.add_argument("--width", type=int, default=64, help="frame width in pixels (default 64)")
    p.add_argument("--split", choices=SPLITS, default="train",
                   help="train: the training combinations; heldout: the combinations kept out of training, for "
                        "evaluation; spare: the spare colour (purple) only, for a LoRA demonstration (default train)")
    p.add_argument("--format", choices=("png", "mp4"), default="png",
                   help="png: a folder of lossless frames per clip (default); mp4: an H.264 file per clip (lossy)")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    paths = make_dataset(args.out, args.n, seed=args.seed, frames=args.frames, height=args.height, width=args.width,
                         split=args.split, video_format=args.format)
    combos = len(combos_for(args.split))
    print(f"wrote {len(paths)} {args.split} clips ({args.frames}x{args.height}x{args.width}, {combos} caption "
          f"combinations) to {args.out} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0
