"""One rank of the sharded-training tests: trains the tiny model with --shard fsdp on a prepared dataset (a
manifest: no VAE or T5), a LoRA and/or a full fine-tune, resuming from the latest sharded checkpoint; --die-after
ends every rank abruptly after that step (os._exit: no cleanup, as a kill), --straight also trains a fresh run that
is never interrupted."""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parent)]

from cogvx_core.checkpoints.transformer import load_transformer  # noqa: E402
from cogvx_core.train import ddp  # noqa: E402
from cogvx_core.train.dataset import load_manifest  # noqa: E402
from cogvx_core.train.estimate import estimate  # noqa: E402
from cogvx_core.train.trainer import Trainer, TrainSettings  # noqa: E402
from train_worker import SETTINGS  # noqa: E402


def train(args, info, mode: str, ckpt: Path | None, out: Path, die_after: int = 0) -> None:
    transformer = load_transformer(Path(args.model) / "transformer", dtype=torch.float32)
    settings = TrainSettings(steps=args.steps, full_finetune=mode == "full", **SETTINGS)
    trainer = Trainer(transformer, load_manifest(args.manifest), settings, scaling_factor=0.7, dist=info,
                      checkpoint_dir=ckpt, shard="fsdp")
    print(f"resumed {trainer.resume()}", flush=True)
    if args.estimate and info.is_main:
        est = estimate(trainer, measure_rate=False)
        print(f"estimate weights {est.weights} optimizer {est.optimizer}", flush=True)
    elif args.estimate:
        estimate(trainer, measure_rate=False)

    def report(r):
        print(f"rank {info.rank} step {r.step} {r.loss!r}", flush=True)
        if r.step == die_after:
            os._exit(3)

    trainer.run(on_step=report)
    trainer.save(out)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    p.add_argument("--manifest")
    p.add_argument("--modes", nargs="+", default=["lora"])
    p.add_argument("--steps", type=int)
    p.add_argument("--checkpoint-dir")
    p.add_argument("--out")
    p.add_argument("--die-after", type=int, default=0)
    p.add_argument("--straight", help="also train an uninterrupted run, saved here")
    p.add_argument("--estimate", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    info = ddp.init_from_env("cpu")
    out = Path(args.out)
    for mode in args.modes:
        ckpt = Path(args.checkpoint_dir) / mode if args.checkpoint_dir else None
        train(args, info, mode, ckpt, out / f"{mode}.safetensors", args.die_after)
        if args.straight:
            train(args, info, mode, Path(args.straight) / "ckpt", Path(args.straight) / f"{mode}.safetensors")
    print("done", flush=True)
    ddp.shutdown(info)
