"""`cogvx train`: a LoRA (or full fine-tune) of a CogVideoX text-to-video model on a folder of clips and captions.

    python -m cogvx_core train --model CogVideoX-5b --data clips/ --out style.safetensors --steps 2000 \\
        --checkpoint-dir ckpt/ --save-every 100 [--resume]

Several GPUs: `torchrun --nproc-per-node 4 -m cogvx_core train ...` (DDP; CPU processes use gloo); add
`--shard fsdp` to shard the weights, gradients and optimizer state over them (FSDP2).
The folder layout is described in cogvx_core/train/dataset.py; latents and T5 embeddings are cached in
<data>/.cogvx_cache (or --cache-dir) and reused while clips and settings stay the same.
"""

from __future__ import annotations

import sys
import time

import torch

from ..checks import check_seed, parse_device, parse_numbers, positive
from ..errors import CogVXError
from ..safe_write import FolderLock, check_writable
from .common import bar

HELP = "train a LoRA on a folder of videos/images with captions"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="diffusers-format CogVideoX folder (transformer/, vae/, "
                   "text_encoder/, tokenizer/, scheduler/)")
    p.add_argument("--data", required=True, help="folder of clips (mp4/webm/gif/frame folders) and images, each with "
                   "a same-name .txt caption, or a metadata.jsonl")
    p.add_argument("--out", required=True, help="the LoRA to write (.safetensors, diffusers/peft layout)")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps of the whole run")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank (default 64)")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default: the rank, i.e. scale 1)")
    p.add_argument("--targets", default="to_q,to_k,to_v,to_out.0",
                   help="layer-name endings to adapt, comma separated (default: attention q, k, v, out)")
    p.add_argument("--full-finetune", action="store_true", help="train every weight instead of a LoRA (--out then "
                   "holds the whole transformer)")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    p.add_argument("--schedule", choices=["constant", "cosine"], default="constant", help="learning-rate schedule "
                   "after the warmup")
    p.add_argument("--warmup", type=int, default=0, help="linear warmup steps (default 0)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off; default 1.0)")
    p.add_argument("--seed", type=int, default=42, help="seed of the LoRA init, data order, timesteps and noise")
    p.add_argument("--frames", type=int, help="longest clip in pixel frames, 4k+1 (default: the model's)")
    p.add_argument("--height", type=int, help="training height (default: the model's)")
    p.add_argument("--width", type=int, help="training width (default: the model's)")
    p.add_argument("--buckets", help="resolution buckets WIDTHxHEIGHT,... (default: --width x --height)")
    p.add_argument("--frame-buckets", help="duration buckets in pixel frames, e.g. 1,17,33,49 (default: every "
                   "frame count the model was trained on up to --frames, and 1 for images)")
    p.add_argument("--no-frame-pack", action="store_true", help="one duration per batch (default: mixed durations "
                   "in a batch, padded and masked: the paper's Frame Pack)")
    p.add_argument("--fps", type=float, help="resample clips to this frame rate (default: the model's; 0 keeps each "
                   "clip's own)")
    p.add_argument("--batch-size", type=int, default=1, help="clips per step (per GPU)")
    p.add_argument("--timestep-sampling", choices=["explicit", "uniform"], default="explicit",
                   help="Explicit Uniform Sampling (default) or the reference trainers' plain uniform draw")
    p.add_argument("--latents", choices=["sample", "mean"], default="sample",
                   help="a fresh VAE posterior draw each step (default, as diffusers' trainer) or its mean")
    p.add_argument("--no-gradient-checkpointing", action="store_true", help="keep every block's activations "
                   "(faster, far more memory; default: checkpointing on)")
    p.add_argument("--mixed-precision", choices=["bf16", "no"], help="bf16 autocast (default on a GPU) or none "
                   "(default on the CPU)")
    p.add_argument("--dtype", choices=list(DTYPES), help="weight dtype (default: bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--cache-dir", help="latent / text-embedding cache (default: <data>/.cogvx_cache)")
    p.add_argument("--checkpoint-dir", help="where resumable checkpoints go")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (default: 100 with --checkpoint-dir)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="latest checkpoints kept in --checkpoint-dir")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint-dir")
    p.add_argument("--val-every", type=int, default=0, help="fixed-noise validation loss every N steps (0: off)")
    p.add_argument("--val-data", help="held-out folder for the validation loss (default: clips of --data)")
    p.add_argument("--no-estimate", action="store_true", help="skip the memory and time estimate")
    p.add_argument("--shard", choices=["none", "fsdp"], default="none", help="under torchrun: fsdp shards the "
                   "weights, gradients and optimizer state over the processes (FSDP2; full fine-tunes and LoRAs, "
                   "sharded checkpoints); none (default) keeps a whole copy per process (DDP)")


class TrainBar:
    """One line on stderr: step, loss (and its running mean), step time, ETA, and the latest validation loss."""

    def __init__(self, total: int, start_step: int, stream=None):
        self.total, self.start_step, self.stream = total, start_step, stream or sys.stderr
        self.started = time.perf_counter()
        self.mean = None
        self.val = None

    def __call__(self, r) -> None:
        if r.loss == r.loss:
            self.mean = r.loss if self.mean is None else 0.9 * self.mean + 0.1 * r.loss
        if r.validation:
            self.val = r.validation["loss"]
        done = r.step - self.start_step
        per_step = (time.perf_counter() - self.started) / max(done, 1)
        eta = per_step * (self.total - r.step)
        loss = "skipped (not finite)" if r.skipped else f"{r.loss:.4f}"
        extra = f" val {self.val:.4f}" if self.val is not None else ""
        self.stream.write(f"\rtrain {bar(r.step, self.total, 24)} {r.step}/{self.total} loss {loss} "
                          f"(avg {self.mean if self.mean is not None else float('nan'):.4f}){extra} "
                          f"{r.seconds:.2f}s/step ETA {int(eta) // 60}m{int(eta) % 60:02d}s ")
        if r.step >= self.total or r.validation or r.rolled_back:
            self.stream.write("\n")
        self.stream.flush()


def run(args) -> int:
    from ..checkpoints.folder import read_model_folder
    from ..checkpoints.transformer import load_transformer
    from ..checkpoints.vae import load_vae
    from ..pipeline import scaling
    from ..schedule import NoiseSchedule
    from ..text import load_text_encoder
    from ..train import ddp
    from ..train.buckets import buckets_for, parse_resolutions
    from ..train.dataset import prepare_dataset
    from ..train.estimate import estimate
    from ..train.checkpoint import latest_checkpoint
    from ..train.trainer import Trainer, TrainSettings

    folder = read_model_folder(args.model)
    if folder.transformer is None or folder.vae is None or folder.text_encoder is None:
        raise CogVXError(f"--model {args.model}: training needs a whole diffusers-format CogVideoX folder "
                         "(transformer/, vae/, text_encoder/, tokenizer/); some are missing.")
    if not str(args.out).lower().endswith(".safetensors"):
        raise CogVXError(f"--out {args.out}: the output is a .safetensors file; use a name ending in .safetensors.")
    for name in ("frames", "height", "width", "steps"):
        positive(f"--{name}", getattr(args, name, None))
    check_seed(args.seed)
    if args.device:
        parse_device(args.device)
    check_writable(args.out)  # before hours of training, not after
    if args.resume and not args.checkpoint_dir:
        raise CogVXError("--resume needs --checkpoint-dir (the folder the interrupted run wrote its checkpoints to).")

    info = ddp.init_from_env(args.device)
    main = info.is_main
    # Taken before minutes of loading and preparing, not when the trainer starts (the trainer shares it).
    lock = FolderLock(args.checkpoint_dir, "training run", "use another --checkpoint-dir") \
        if args.checkpoint_dir and main else None
    try:
        cuda = info.device.type == "cuda"
        dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if cuda else torch.float32)
        transformer = load_transformer(folder.transformer, dtype=dtype, device=info.device)
        variant = transformer.variant
        resolutions = parse_resolutions(args.buckets) if args.buckets else None
        frame_counts = parse_numbers(args.frame_buckets, "--frame-buckets") if args.frame_buckets else None
        buckets = buckets_for(transformer, args.frames, args.height, args.width, resolutions, frame_counts)
        targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
        settings = TrainSettings(
            steps=args.steps, rank=args.rank, alpha=args.alpha, targets=targets, full_finetune=args.full_finetune,
            learning_rate=args.lr, lr_schedule=args.schedule, warmup_steps=args.warmup,
            weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, batch_size=args.batch_size,
            seed=args.seed, gradient_checkpointing=not args.no_gradient_checkpointing,
            mixed_precision=args.mixed_precision or ("bf16" if cuda else "no"),
            timestep_sampling=args.timestep_sampling, latent_sampling=args.latents,
            frame_pack=not args.no_frame_pack,
            save_every=args.save_every if args.save_every is not None else (100 if args.checkpoint_dir else 0),
            keep_checkpoints=args.keep_checkpoints, val_every=args.val_every)
        settings.check()

        # encode what the cache lacks, then free the VAE and T5
        vae = load_vae(folder.vae, dtype=dtype, device=info.device)
        text_encoder = load_text_encoder(folder.root, dtype=dtype, device=info.device,
                                         max_length=folder.text_length or transformer.text_length)
        sf, _ = scaling(vae, variant)

        def prep(folder):
            return prepare_dataset(folder, vae=vae, text_encoder=text_encoder, variant=variant, buckets=buckets,
                                   cache_dir=args.cache_dir, fps=args.fps, rank=info.rank,
                                   world_size=info.world_size, barrier=lambda: ddp.barrier(info),
                                   progress=_Counter("encoding", main))

        dataset = prep(args.data)
        val_dataset = prep(args.val_data) if args.val_data else None
        vae = text_encoder = None  # no longer needed: training reads the cache
        if cuda:
            torch.cuda.empty_cache()
        if main:
            print(f"data: {dataset.summary()} ({buckets.describe()})", file=sys.stderr)
            for note in dataset.notes:
                print(f"note: {note}", file=sys.stderr)

        schedule = NoiseSchedule.from_config(folder.schedule_config) if folder.schedule_config else None
        trainer = Trainer(transformer, dataset, settings, schedule=schedule, scaling_factor=sf, dist=info,
                          checkpoint_dir=args.checkpoint_dir, val_dataset=val_dataset, shard=args.shard)
        if args.checkpoint_dir and not args.resume:
            existing = latest_checkpoint(args.checkpoint_dir)
            if existing is not None:
                raise CogVXError(f"--checkpoint-dir {args.checkpoint_dir} already holds a run's checkpoints (latest: "
                                 f"{existing.name}); add --resume to continue it, or use an empty folder.")
        if args.resume:
            step = trainer.resume()
            if main:
                print(f"resumed from step {step}" if step is not None else
                      f"no checkpoint in {args.checkpoint_dir}; starting at step 0", file=sys.stderr)
        if not args.no_estimate and (main or args.shard == "fsdp"):  # sharded: every rank gathers a block
            described = estimate(trainer).describe()
            if main:
                print(described, file=sys.stderr)

        bar = TrainBar(settings.steps, trainer.step) if main else None
        try:
            trainer.run(on_step=bar)
        except KeyboardInterrupt:
            if args.checkpoint_dir and not info.distributed and trainer.step:
                path = trainer.save_checkpoint()
                print(f"\ninterrupted; state saved to {path}; continue with --resume", file=sys.stderr)
            raise
        if args.checkpoint_dir and getattr(latest_checkpoint(args.checkpoint_dir), "name", "") != \
                f"step-{trainer.step:08d}":
            trainer.save_checkpoint()  # the end state too, so a later run can continue with a higher --steps
        out = trainer.save(args.out)
        if main:
            print(out)
        return 0
    finally:
        ddp.shutdown(info)
        if lock is not None:
            lock.release()


class _Counter:
    def __init__(self, label: str, enabled: bool):
        self.label, self.enabled = label, enabled

    def __call__(self, done: int, total: int) -> None:
        if self.enabled:
            sys.stderr.write(f"\r{self.label} {done}/{total}")
            if done >= total:
                sys.stderr.write("\n")
            sys.stderr.flush()
