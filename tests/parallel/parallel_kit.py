"""What the parallel-generation tests run, shared by the test and its torchrun worker; and the launcher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from cogvx_core.vae import Tiling

PROMPT = "a small red fox runs along the river under a stormy sky"
SEED = 11
# 48x48 pixels, 9 frames: latents (3, 6, 6), 27 video tokens, so two ranks hold 14 and 13 (an uneven split); the
# DPM sampler draws noise every step (the shared generator state is exercised); 32 px tiles make 4 VAE tiles.
RUN = dict(frames=9, height=48, width=48, steps=3, sampler="dpm", guidance=6.0, tiling=Tiling(32, 32))
ROOT = Path(__file__).resolve().parents[2]


def generate(pipe, seed: int = SEED, **kw):
    with torch.no_grad():
        return pipe.generate(PROMPT, "", seed=seed, **RUN, **kw)


def torchrun(nproc: int, args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node nproc <args>` on CPU processes, finding this checkout's package."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "tests"), str(Path(__file__).parent),
                                                       os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=str(cwd))
