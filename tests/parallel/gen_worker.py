"""One rank of the parallel-generation test: every mode on every model folder, rank 0 saving latents, frames and
the bytes each rank sent. The other ranks start from another seed: rank 0's generator state must win."""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from cogvx_core.parallel import make_groups
from cogvx_core.pipeline import load_pipeline
from parallel_kit import SEED, generate

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--folders", nargs="+")
    p.add_argument("--modes", nargs="+")
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    traffic = {}
    for folder in args.folders:
        pipe = load_pipeline(folder, dtype=torch.float32, device="cpu")
        for mode in args.modes:
            # cfg+sequence runs over a group given by the caller (here all ranks), the others over the default one
            group = dist.new_group(list(range(dist.get_world_size()))) if mode == "cfg+sequence" else None
            groups = make_groups(mode, group=group)
            result = generate(pipe, seed=SEED if rank == 0 else SEED + 100 + rank, parallel=groups)
            name = f"{Path(folder).name}-{mode}"
            sent = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size())]
            dist.all_gather(sent, torch.tensor([groups.traffic.total]))
            traffic[name] = {"per_rank": [int(s) for s in sent], **dict(groups.traffic.sent)}
            if rank == 0:
                save_file({"latents": result.latents.contiguous(), "frames": result.frames.contiguous()},
                          str(Path(args.out) / f"{name}.safetensors"))
            else:
                assert result.frames is None
    if rank == 0:
        (Path(args.out) / "traffic.json").write_text(json.dumps(traffic))
    dist.destroy_process_group()
