"""Sharded data-parallel training (`train --shard fsdp`): torch's FSDP2 `fully_shard` over each expert block and
the model root, so parameters, gradients and AdamW state are split across the ranks (each holds 1/N), for a full
fine-tune and for a LoRA (the frozen base is sharded too). A block's full weights exist only while it runs.

The training step is DDP's: each rank its own batch and Explicit Uniform Sampling interval, gradients averaged
(reduce-scatter instead of all-reduce), so a sharded run equals a DDP run and a one-process run that averages the
ranks' gradients. Checkpoints are sharded (torch.distributed.checkpoint): each rank writes its shards, rank 0 the
run's state.json; they are written in a temporary folder and renamed, as the unsharded ones, so a killed run resumes
exactly from the latest complete one.

    <checkpoint_dir>/step-NNNNNNNN/  .metadata, __R_0.distcp (DCP), rng-R.safetensors (each rank), state.json
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ..errors import CogVXError

SHARDING = ("none", "fsdp")
DCP_METADATA = ".metadata"


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """fully_shard each expert block, then the root (embeddings, final norm and projection)."""
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise CogVXError("--shard fsdp splits the model over the processes of a torchrun launch; start it with "
                         "torchrun --nproc-per-node N -m cogvx_core train ... (or leave --shard out).")
    for block in model.transformer_blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _fsdp_modules(model: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered(model: torch.nn.Module):
    """Every sharded module's full parameters in place (collective: every rank enters), e.g. to save the result with
    the unsharded code paths; calls to module.forward inside bypass FSDP's hooks."""
    modules = _fsdp_modules(model)
    for m in modules:
        m.unshard()
    try:
        yield model
    finally:
        for m in modules:
            m.reshard()


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0's CPU (empty on the other ranks); every rank calls this."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ---------------------------------------------------------------------------------------------------------------
# Sharded checkpoints
# ---------------------------------------------------------------------------------------------------------------
def _options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # a LoRA run saves the LoRA, not the frozen base; loading then leaves the base as it is (checked below)
    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def is_sharded_checkpoint(path: Path) -> bool:
    return (path / DCP_METADATA).is_file()


def save_checkpoint(trainer, root: Path, state: dict, keep: int) -> Path:
    """Writes the trainer's sharded state to root/step-NNNNNNNN (every rank calls this); returns the folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from .checkpoint import STEP_PREFIX, publish_checkpoint

    info = trainer.dist
    final = root / f"{STEP_PREFIX}{trainer.step:08d}"
    tmp = root / f".{final.name}.tmp-sharded"  # one name on every rank
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    model_state, optim_state = get_state_dict(trainer.model, trainer.optimizer, options=_options())
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    rng = {"rng.torch": torch.get_rng_state()}
    if trainer.device.type == "cuda":
        rng["rng.cuda"] = torch.cuda.get_rng_state(trainer.device)
    save_file(rng, str(tmp / f"rng-{info.rank}.safetensors"))
    dist.barrier()
    if info.is_main:
        publish_checkpoint(tmp, final, state, keep)
    dist.barrier()
    return final


def load_checkpoint(trainer, path: Path) -> None:
    """Loads a sharded checkpoint into the trainer (every rank calls this): the sharded weights and optimizer state,
    each rank's RNG state, and the step, history and learning-rate scale of its state.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from .checkpoint import check_compatible, restore_run_state

    if not is_sharded_checkpoint(path):
        raise CogVXError(f"{path}: this checkpoint was saved unsharded (without --shard fsdp); resume it the way it "
                         "was made, or start a new run.")
    try:
        state = json.loads((path / "state.json").read_text())
        rng = load_file(str(path / f"rng-{trainer.dist.rank}.safetensors"))
    except (OSError, ValueError) as e:
        raise CogVXError(f"{path}: this checkpoint cannot be read ({e}); delete it to resume from the one before.")
    check_compatible(trainer, state, path)
    model_state, optim_state = get_state_dict(trainer.model, trainer.optimizer, options=_options())
    loaded = {"model": model_state, "optim": optim_state}
    dcp.load(loaded, checkpoint_id=str(path))
    keys = set_state_dict(trainer.model, trainer.optimizer, model_state_dict=loaded["model"],
                          optim_state_dict=loaded["optim"], options=_options(strict=False))
    missing = sorted(set(trainer.param_names) & set(keys.missing_keys))
    if missing or keys.unexpected_keys:
        raise CogVXError(f"{path}: the checkpoint's weights do not match this run's trainable layers (missing "
                         f"{missing[:3]}, unexpected {list(keys.unexpected_keys)[:3]}); start a new run.")
    restore_run_state(trainer, state, rng)
