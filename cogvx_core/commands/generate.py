"""`cogvx generate`: text-, image- or video-to-video from a diffusers-format model folder."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..checks import check_seed, parse_device, positive
from ..errors import CogVXError
from ..safe_write import check_fps, check_writable
from . import memory_args
from .common import ProgressBar, parse_lora

HELP = "generate a video from a prompt (and a start image or an input video)"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(p) -> None:
    p.add_argument("--model", help="diffusers-format CogVideoX folder (model_index.json, transformer/, vae/, ...); "
                   "default: the built-in cogvx-tiny (64x64, 9 frames, synthetic shapes only)")
    p.add_argument("--prompt", required=True, help="what the video shows")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (empty: the usual "
                   "negative prompt)")
    p.add_argument("--image", help="start image (image-to-video models)")
    p.add_argument("--end-image", help="end image (image-to-video models, with --image): the video ends on it; not "
                   "part of the released models' training, results vary")
    p.add_argument("--video", help="input video file or folder of frames (video-to-video)")
    p.add_argument("--strength", type=float, default=0.8, help="video-to-video denoise strength (default 0.8)")
    p.add_argument("--frames", type=int, help="pixel frames, 4k+1 (default: the model's)")
    p.add_argument("--height", type=int, help="pixel height, a multiple of 16 (default: the model's)")
    p.add_argument("--width", type=int, help="pixel width, a multiple of 16 (default: the model's)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--guidance", type=float, default=6.0, help="classifier-free guidance scale")
    p.add_argument("--dynamic-cfg", action="store_true", help="the reference's dynamic guidance schedule")
    p.add_argument("--sampler", choices=["ddim", "dpm"], default="ddim", help="CogVideoX DDIM or DPM-Solver++(2M) SDE")
    p.add_argument("--seed", type=int, default=42, help="noise seed (the same seed gives the same video)")
    p.add_argument("--dtype", choices=list(DTYPES), help="compute dtype (default: the model's recommended)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--fps", type=float, help="frames per second of the written video (default: the model's)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:STRENGTH]",
                   help="apply a LoRA (repeatable); strength defaults to 1.0")
    add_speed_arguments(p)
    p.add_argument("--out", help=".mp4/.webm/.gif writes a video; any other path a folder of PNGs (required "
                   "unless --plan)")
    memory_args.add_arguments(p)
    p.add_argument("--parallel", choices=["cfg", "sequence", "cfg+sequence"],
                   help="split the run over the processes of a torchrun launch: the two guidance halves (cfg, 2 "
                   "processes), the video tokens (sequence, Ulysses; the count must divide the heads) or both; the "
                   "VAE tiles are split too. Same video as one process.")
    p.add_argument("--tile", type=int, metavar="PIXELS", help="decode in square VAE tiles of this size (the "
                   "reference's tiling; with --parallel the tiles are shared out)")


def add_speed_arguments(p) -> None:
    """--cache, --cache-coefficients and --compile (generate and eval)."""
    p.add_argument("--cache", metavar="teacache[:T]|fbcache[:T]", help="step caching: skip the transformer's blocks "
                   "on steps where they would barely change (TeaCache default threshold 0.3, first-block cache 0.1; "
                   "higher is faster and less exact; default: off)")
    p.add_argument("--cache-coefficients", metavar="FILE", help="TeaCache coefficients from calibrate-cache (default: "
                   "cogvx_cache.json in the model folder, else the published ones of a released model)")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks (one graph shared "
                   "by every block; the first step compiles)")


def speed_settings(args, pipe):
    """The run's StepCache (coefficients resolved) from --cache; compiles the blocks for --compile."""
    from ..cache import parse_cache, resolve

    if args.compile:
        from ..compile import compile_blocks

        compile_blocks(pipe.transformer)
    cache = parse_cache(args.cache)
    if cache is None and args.cache_coefficients:
        raise CogVXError("--cache-coefficients needs --cache teacache[:THRESHOLD].")
    return resolve(cache, pipe.variant, released=pipe.transformer.released_size, model_dir=args.model,
                   coefficients_file=args.cache_coefficients)


def run(args) -> int:
    # Everything a user typed is checked before minutes of loading and sampling, the output folder included.
    for name in ("frames", "height", "width", "steps"):
        positive(f"--{name}", getattr(args, name))
    positive("--strength", args.strength, integer=False)
    check_seed(args.seed)
    if args.fps is not None:
        check_fps(args.fps)
    if args.end_image and not args.image:
        raise CogVXError("--end-image needs --image: the video starts on the start image and ends on the end image.")
    if args.out and not args.plan:
        check_writable(args.out)  # before minutes of loading and sampling
    if args.model is None:
        from ..models import TINY_MODEL, builtin_models

        if not builtin_models():
            raise CogVXError(f"No --model given and the built-in model is missing ({TINY_MODEL}); pass --model with "
                             "a diffusers-format CogVideoX folder, or rebuild it: python -m cogvx_core recipe tiny "
                             "--replace-builtin.")
        args.model = str(TINY_MODEL)
    if not Path(args.model).exists():
        raise CogVXError(f"--model {args.model}: no such folder.")
    if args.parallel:
        if args.cache or args.compile or args.plan or (args.offload not in (None, "none")):
            raise CogVXError("--parallel runs without --cache, --compile, --offload and --plan for now; drop them, or "
                             "run in one process.")
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
    """The run of one process (or one rank of a --parallel launch, `parallel` its groups)."""
    from ..pipeline import load_pipeline
    from ..vae import Tiling
    from ..variants import snap_request, snap_video
    from ..video_io import (frames_to_model_input, pil_to_model_input, read_frames, read_image, read_image_notes,
                            write_frames)

    device = parse_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else None
    memory = None if parallel is not None else memory_args.resolve(args, args.model, device, dtype,
                                                                   has_image=bool(args.image))
    if args.plan:
        return 0
    if not args.out:
        raise CogVXError("--out is required (a .mp4/.webm/.gif file or a folder for PNG frames).")
    if memory is None:
        pipe = load_pipeline(args.model, dtype=dtype, device=device)
        from ..parallel import check_heads

        check_heads(pipe.transformer.config["num_attention_heads"], parallel.seq_degree, parallel.cfg_degree)
    else:
        pipe = load_pipeline(args.model, dtype=dtype, device=device, offload=memory.offload,
                             text_weight_dtype=memory.text_weight_dtype, weight_dtype=args.weight_dtype)
    main = parallel is None or parallel.is_main
    variant = pipe.variant
    if args.lora:
        from ..lora import apply_loras, load_lora

        apply_loras(pipe.transformer, [(load_lora(p), s) for p, s in map(parse_lora, args.lora)])
    cache = speed_settings(args, pipe)
    tiles = dict(tiling=Tiling(args.tile, args.tile)) if args.tile else (memory.tile_args if memory else {})

    height, width = args.height, args.width  # unset: the model's own defaults (the pipeline fills them in)
    image = end_image = video = None
    notes = []
    if args.image:
        default_frames, default_height, default_width = pipe.transformer.default_size()
        height, width = height or default_height, width or default_width
        if variant.i2v:  # the size the run will have, so the images are resized once, as the nodes do
            _, height, width, _ = snap_request(variant, args.frames or default_frames, height, width, has_image=True,
                                               released=pipe.transformer.released_size, name=pipe.transformer.name,
                                               learned_size=pipe.transformer.learned_size)
        image = pil_to_model_input(read_image(args.image), height, width)[None].to(pipe.dtype)  # (1, 3, H, W)
        if args.end_image:
            end_image = pil_to_model_input(read_image(args.end_image), height, width)[None].to(pipe.dtype)
        for note in read_image_notes(args.image, (height, width)):
            print(f"note: {note}", file=sys.stderr)
    if args.video:
        frames = read_frames(args.video)  # (T, H, W, 3)
        available = min(args.frames or frames.shape[0], frames.shape[0])
        keep, height, width, notes = snap_video(available, height or frames.shape[1], width or frames.shape[2])
        video = frames_to_model_input(frames[:keep], height, width)[None].to(pipe.dtype)  # (1, 3, T, H, W)

    result = pipe.generate(args.prompt, args.negative_prompt, image=image, end_image=end_image, video=video,
                           strength=args.strength,
                           frames=args.frames, height=height, width=width, steps=args.steps,
                           guidance=args.guidance, dynamic_cfg=args.dynamic_cfg, sampler=args.sampler,
                           seed=args.seed, progress=ProgressBar("sampling") if main else None, cache=cache,
                           parallel=parallel, **tiles)
    if not main:  # rank 0 writes the video
        return 0
    print(result.passes.summary(), file=sys.stderr)
    for note in notes:  # the pipeline's own notes were logged as they arose: printed once, not again here
        print(f"note: {note}", file=sys.stderr)
    out = write_frames(result.frames[0], args.out, fps=args.fps or variant.fps)
    if out != Path(args.out):
        print(f"note: {args.out} already has files; the frames went to {out}", file=sys.stderr)
    print(out)
    return 0
