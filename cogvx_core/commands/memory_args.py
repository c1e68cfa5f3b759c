"""The memory options of `generate` (--offload, --vram, --prefetch, --t5, --weight-dtype, --plan) and how they
become an Offload, decode tiles and a printed plan."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import torch

from ..errors import CogVXError

T5_CHOICES = ("auto", "device", "cpu", "fp8")


def add_arguments(p) -> None:
    p.add_argument("--offload", choices=["auto", "none", "model", "blocks"], default=None,
                   help="none: all models stay on the GPU; model: each model on the GPU only while it runs; blocks: "
                   "the transformer's blocks stream from pinned CPU memory (as many stay resident as --vram "
                   "allows); auto (the default on CUDA): the fastest that fits --vram")
    p.add_argument("--vram", type=float, metavar="GB",
                   help="memory budget in GiB for auto, the resident blocks and the decode's tiles (default: the "
                   "GPU's free memory)")
    p.add_argument("--prefetch", type=int, default=1, help="blocks copied ahead while one computes (default 1)")
    p.add_argument("--t5", choices=T5_CHOICES, default="auto",
                   help="where T5 runs: device, cpu, fp8 (fp8 weights on the device); auto: the device when it fits")
    p.add_argument("--weight-dtype", choices=["fp8_e4m3fn", "fp8_e5m2"],
                   help="store the transformer's big weights in fp8 (half of bf16; computes in --dtype)")
    p.add_argument("--plan", action="store_true",
                   help="print the predicted peak memory of each stage for this request and exit without running")


@dataclass
class MemorySettings:
    offload: object  # offload.Offload
    tile_args: dict
    text_weight_dtype: torch.dtype | None
    plan: object  # memory_plan.Plan


def budget_bytes(args, device: torch.device) -> int | None:
    from ..memory_plan import GiB

    if args.vram is not None:
        if args.vram <= 0:
            raise CogVXError(f"--vram must be a positive number of GiB; got {args.vram}.")
        return int(args.vram * GiB)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return None


def resolve(args, model: str, device: torch.device, dtype: torch.dtype | None, has_image: bool) -> MemorySettings:
    """The plan for this run and the settings it implies; `--plan` prints it (the caller then stops)."""
    from ..checkpoints.transformer import FP8_DTYPES
    from ..memory_plan import choose, plan, request_for_folder
    from ..offload import Offload

    if args.prefetch < 0:
        raise CogVXError(f"--prefetch must be 0 or more; got {args.prefetch}.")
    mode = args.offload or ("auto" if device.type == "cuda" else "none")
    text_weight_dtype = torch.float8_e4m3fn if args.t5 == "fp8" else None
    weight_dtype = FP8_DTYPES[args.weight_dtype] if args.weight_dtype else None
    request = request_for_folder(model, frames=args.frames, height=args.height, width=args.width,
                                 cfg=args.guidance > 1, dtype=dtype, weight_dtype=weight_dtype,
                                 text_weight_dtype=text_weight_dtype, has_image=has_image)
    request = replace(request, prefetch=args.prefetch)
    text_devices = {"auto": ("device", "cpu"), "cpu": ("cpu",)}.get(args.t5, ("device",))
    budget = budget_bytes(args, device)
    modes = ("none", "model", "blocks") if mode == "auto" else (mode,)
    if budget is not None:
        chosen = choose(request, budget, modes, text_devices)
    else:  # no budget (a CPU run): the mode asked for, nothing resident beyond it, no tiles
        chosen = plan(replace(request, offload=modes[0], text_device=text_devices[0]))
    if args.plan:
        print(chosen.table(budget))
    elif budget is not None and not chosen.fits(budget):
        print(f"warning: the predicted peak {chosen.peak / 2**30:.2f} GiB does not fit the budget "
              f"{budget / 2**30:.2f} GiB even with {chosen.describe()}; running anyway.", file=sys.stderr)
    return MemorySettings(Offload.from_plan(chosen, device), chosen.decode_kwargs(), text_weight_dtype, chosen)
