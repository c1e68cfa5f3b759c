"""`cogvx generate`: text-, image- or video-to-video from a diffusers-format model folder."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from ..errors import CogVXError

HELP = "generate a video from a prompt (and a start image or an input video)"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(p) -> None:
    p.add_argument("--model", help="diffusers-format CogVideoX folder (model_index.json, transformer/, vae/, ...); "
                   "default: the built-in cogvx-tiny (64x64, 9 frames, synthetic shapes only)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--image", help="start image (image-to-video models)")
    p.add_argument("--end-image", help="end image (image-to-video models, with --image): the video ends on it; not "
                   "part of the released models' training, results vary")
    p.add_argument("--video", help="input video file or folder of frames (video-to-video)")
    p.add_argument("--strength", type=float, default=0.8, help="video-to-video denoise strength (default 0.8)")
    p.add_argument("--frames", type=int, help="pixel frames, 4k+1 (default: the model's)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=6.0)
    p.add_argument("--dynamic-cfg", action="store_true", help="the reference's dynamic guidance schedule")
    p.add_argument("--sampler", choices=["ddim", "dpm"], default="ddim")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dtype", choices=list(DTYPES), help="compute dtype (default: the model's recommended)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--fps", type=int, help="frames per second of the written video (default: the model's)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:STRENGTH]",
                   help="apply a LoRA (repeatable); strength defaults to 1.0")
    p.add_argument("--out", required=True, help=".mp4/.webm/.gif writes a video; any other path a folder of PNGs")
    p.add_argument("--parallel", choices=["cfg", "sequence", "cfg+sequence"],
                   help="split the run over the processes of a torchrun launch: the two guidance halves (cfg, 2 "
                   "processes), the video tokens (sequence, Ulysses; the count must divide the heads) or both; the "
                   "VAE tiles are split too. Same video as one process.")
    p.add_argument("--tile", type=int, metavar="PIXELS", help="decode in square VAE tiles of this size (the "
                   "reference's tiling; with --parallel the tiles are shared out)")


class _Bar:
    """A one-line progress bar on stderr with the step time."""

    def __init__(self, label: str):
        self.label, self.start = label, time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        width = 30
        filled = int(width * done / max(total, 1))
        rate = (time.perf_counter() - self.start) / max(done, 1)
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {rate:.2f}s/it")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _parse_lora(spec: str) -> tuple[str, float]:
    path, sep, strength = spec.rpartition(":")
    if sep and path and not path.endswith(("\\", "/")):
        try:
            return path, float(strength)
        except ValueError:
            pass
    return spec, 1.0


def run(args) -> int:
    if args.model is None:
        from ..models import TINY_MODEL, builtin_models

        if not builtin_models():
            raise CogVXError(f"No --model given and the built-in model is missing ({TINY_MODEL}); pass --model with "
                             "a diffusers-format CogVideoX folder, or rebuild it: python -m cogvx_core recipe tiny.")
        args.model = str(TINY_MODEL)
    if not Path(args.model).exists():
        raise CogVXError(f"--model {args.model}: no such folder.")
    if args.parallel:
        return _run_parallel(args)
    return _generate(args, None)


def _run_parallel(args) -> int:
    """One rank of `torchrun ... generate --parallel MODE`: every rank runs the same command."""
    from ..parallel import make_groups
    from ..train import ddp

    info = ddp.init_from_env(args.device)
    try:
        if not info.distributed:
            raise CogVXError(f"--parallel {args.parallel} splits the run over several processes: launch with "
                             "torchrun --nproc-per-node N -m cogvx_core generate ... (one process per GPU).")
        args.device = str(info.device)
        return _generate(args, make_groups(args.parallel))
    finally:
        ddp.shutdown(info)


def _generate(args, parallel) -> int:
    from ..pipeline import is_released_size, load_pipeline
    from ..variants import snap_request, snap_video
    from ..vae import Tiling
    from ..video_io import frames_to_model_input, pil_to_model_input, read_frames, read_image, write_frames

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CogVXError("--device cuda: no CUDA device is available; use --device cpu.")
    dtype = DTYPES[args.dtype] if args.dtype else None
    pipe = load_pipeline(args.model, dtype=dtype, device=device)
    if parallel is not None:
        from ..parallel import check_heads

        check_heads(pipe.transformer.config["num_attention_heads"], parallel.seq_degree, parallel.cfg_degree)
    main = parallel is None or parallel.is_main
    variant = pipe.variant
    if args.lora:
        from ..lora import apply_loras, load_lora

        apply_loras(pipe.transformer, [(load_lora(p), s) for p, s in map(_parse_lora, args.lora)])

    height, width = args.height, args.width
    if not is_released_size(pipe.transformer) and not args.video:
        # A small model: frames and size it was trained at, not the variant's (an input video keeps its own).
        cfg = pipe.transformer.config
        args.frames = args.frames or cfg["sample_frames"]
        height, width = height or cfg["sample_height"] * 8, width or cfg["sample_width"] * 8
    if args.end_image and not args.image:
        raise CogVXError("--end-image needs --image: the video starts on the start image and ends on the end image.")
    image = end_image = video = None
    notes = []
    if args.image:
        height, width = height or variant.height, width or variant.width
        if variant.i2v:  # the size the run will have, so the images are resized once, as the nodes do
            _, height, width, _ = snap_request(variant, args.frames or variant.frames, height, width, has_image=True,
                                               released=is_released_size(pipe.transformer))
        image = pil_to_model_input(read_image(args.image), height, width)[None].to(pipe.dtype)  # (1, 3, H, W)
        if args.end_image:
            end_image = pil_to_model_input(read_image(args.end_image), height, width)[None].to(pipe.dtype)
    if args.video:
        frames = read_frames(args.video)  # (T, H, W, 3)
        available = min(args.frames or frames.shape[0], frames.shape[0])
        keep, height, width, notes = snap_video(available, height or frames.shape[1], width or frames.shape[2])
        video = frames_to_model_input(frames[:keep], height, width)[None].to(pipe.dtype)  # (1, 3, T, H, W)

    result = pipe.generate(args.prompt, args.negative_prompt, image=image, end_image=end_image, video=video,
                           strength=args.strength,
                           frames=args.frames, height=height, width=width, steps=args.steps,
                           guidance=args.guidance, dynamic_cfg=args.dynamic_cfg, sampler=args.sampler,
                           seed=args.seed, progress=_Bar("sampling") if main else None,
                           tiling=Tiling(args.tile, args.tile) if args.tile else None, parallel=parallel)
    if not main:  # rank 0 writes the video
        return 0
    for note in notes + result.notes:
        print(f"note: {note}", file=sys.stderr)
    out = write_frames(result.frames[0], args.out, fps=args.fps or variant.fps)
    print(out)
    return 0
