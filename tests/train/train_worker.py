"""A training process for the kill-and-resume test: trains the tiny model on a prepared dataset (a manifest, so no
VAE or T5 is loaded), printing each step, optionally sleeping after each (so the test can kill it mid-run), and
resuming from the latest checkpoint."""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1]),
                str(Path(__file__).resolve().parent)]

from cogvx_core.checkpoints.transformer import load_transformer  # noqa: E402
from cogvx_core.train.dataset import load_manifest  # noqa: E402
from cogvx_core.train.trainer import Trainer, TrainSettings  # noqa: E402

SETTINGS = dict(rank=4, alpha=2, learning_rate=3e-3, batch_size=2, mixed_precision="no", seed=7, save_every=2,
                keep_checkpoints=2, lr_schedule="cosine", warmup_steps=2, val_every=3, val_items=2)

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    p.add_argument("--manifest")
    p.add_argument("--checkpoint-dir")
    p.add_argument("--out")
    p.add_argument("--steps", type=int)
    p.add_argument("--sleep", type=float, default=0.0)
    args = p.parse_args()
    torch.set_num_threads(1)

    transformer = load_transformer(Path(args.model) / "transformer", dtype=torch.float32)
    ds = load_manifest(args.manifest)
    trainer = Trainer(transformer, ds, TrainSettings(steps=args.steps, **SETTINGS), scaling_factor=0.7,
                      checkpoint_dir=args.checkpoint_dir)
    resumed = trainer.resume()
    print(f"resumed {resumed}", flush=True)

    def report(r):
        print(f"step {r.step} {r.loss!r}", flush=True)
        time.sleep(args.sleep)

    trainer.run(on_step=report)
    trainer.save(args.out)
    print("done", flush=True)
