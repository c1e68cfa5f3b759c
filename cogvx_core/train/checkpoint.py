"""The trainer's checkpoints: exact resume from atomic folders.

<root>/step-NNNNNNNN holds trainable.safetensors (the trainable weights, the optimizer's tensors, the torch RNG
state) and state.json (the step, which fixes the data order, timesteps and noise; the learning-rate scale; the
optimizer's scalars and groups; the loss history; what the run trains: settings, data, base model, processes). A
checkpoint is written to a temporary folder and renamed, so a run killed at any moment resumes from the latest
complete one and ends with bitwise the same weights as a run never interrupted. The VAE trainer (vae.py) keeps its
checkpoints in the same folders under another prefix.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..checks import json_object, require_keys
from ..errors import CogVXError
from ..safe_write import damaged_checkpoint

CHECKPOINT_FORMAT = 1
STEP_PREFIX = "step-"


# ---------------------------------------------------------------------------------------------------------------
# A trainer's state <-> (state.json, tensors)
# ---------------------------------------------------------------------------------------------------------------
def training_state(trainer) -> tuple[dict, dict[str, torch.Tensor]]:
    """(state.json's dict, the tensors) that resume a Trainer exactly."""
    opt = trainer.optimizer.state_dict()
    state = {"format": CHECKPOINT_FORMAT, "step": trainer.step, "settings": trainer.settings.trajectory(),
             "steps": trainer.settings.steps, "world_size": trainer.dist.world_size,
             "dataset": trainer.dataset.fingerprint, "base_model": trainer.base_fingerprint,
             "variant": trainer.transformer.variant.name, "param_names": trainer.param_names,
             "lr_scale": trainer.lr_scale, "bad_streak": trainer.bad_streak, "optimizer_groups": opt["param_groups"],
             "optimizer_scalars": {str(i): {k: v for k, v in st.items() if not torch.is_tensor(v)}
                                   for i, st in opt["state"].items()},
             "history": trainer.history, "validations": trainer.validations}
    tensors = {f"param.{n}": p.detach() for n, p in zip(trainer.param_names, trainer.params)}
    for i, st in opt["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{i}.{k}"] = v
    tensors["rng.torch"] = torch.get_rng_state()
    if trainer.device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(trainer.device)
    return state, tensors


def restore_training_state(trainer, path: Path) -> None:
    """Puts the checkpoint at `path` into `trainer`: weights, optimizer, RNG, step, history. Refuses a checkpoint of
    other settings, data, base model or number of processes."""
    state, tensors = read_checkpoint(path, ("format", "step", "settings", "optimizer_groups", "history"))
    check_compatible(trainer, state, path)
    with torch.no_grad():
        for n, p in zip(trainer.param_names, trainer.params):
            p.copy_(tensors[f"param.{n}"])
    opt_state: dict = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = v
    for i, scalars in state.get("optimizer_scalars", {}).items():
        opt_state.setdefault(int(i), {}).update(scalars)
    trainer.optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer_groups"]})
    restore_run_state(trainer, state, tensors)


def restore_run_state(trainer, state: dict, rng: dict[str, torch.Tensor]) -> None:
    """What a checkpoint holds besides weights and optimizer (sharded or not): the RNG state, the step, the history,
    the learning-rate scale."""
    torch.set_rng_state(rng["rng.torch"])
    if "rng.cuda" in rng and trainer.device.type == "cuda":
        torch.cuda.set_rng_state(rng["rng.cuda"], trainer.device)
    trainer.step = int(state["step"])
    trainer.history, trainer.validations = list(state["history"]), list(state["validations"])
    trainer.lr_scale, trainer.bad_streak = float(state["lr_scale"]), int(state["bad_streak"])


def check_compatible(trainer, state: dict, path: Path) -> None:
    """Raises a CogVXError naming what differs when `trainer` cannot continue the run of `state`."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CogVXError(f"{path}: checkpoint format {state.get('format')} is not this version's "
                         f"({CHECKPOINT_FORMAT}); start a new run (another --checkpoint-dir).")
    settings = trainer.settings
    mine = settings.trajectory()
    theirs = state["settings"]
    changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if changed:
        diffs = ", ".join(f"{k}: {theirs.get(k)!r} -> {mine.get(k)!r}" for k in changed)
        raise CogVXError(f"{path}: this checkpoint was made with other settings ({diffs}); resume with the same "
                         "settings, or start a new run in another --checkpoint-dir.")
    if settings.lr_schedule != "constant" and state.get("steps") != settings.steps:
        raise CogVXError(f"{path}: the {settings.lr_schedule} schedule depends on the total steps; resume "
                         f"with --steps {state.get('steps')} (or start a new run).")
    if state["world_size"] != trainer.dist.world_size:
        raise CogVXError(f"{path}: this run used {state['world_size']} processes and this one "
                         f"{trainer.dist.world_size}; data order and timesteps depend on it. Resume with the same "
                         "number of processes.")
    if state["dataset"] != trainer.dataset.fingerprint:
        raise CogVXError(f"{path}: the training data changed since this checkpoint (a clip, caption or "
                         "preparation setting); resume with the same data, or start a new run.")
    if state["base_model"] != trainer.base_fingerprint:
        raise CogVXError(f"{path}: this checkpoint trains another base model; load the model it was made "
                         "with, or start a new run.")
    if state["param_names"] != trainer.param_names:
        raise CogVXError(f"{path}: the trainable layers differ from this run's; start a new run.")
    if int(state["step"]) > settings.steps:
        raise CogVXError(f"{path}: the checkpoint is at step {state['step']}, past --steps {settings.steps}; "
                         "raise --steps to continue training.")


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint folders
# ---------------------------------------------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(root: Path, step: int, tensors: dict[str, torch.Tensor], state: dict, keep: int = 2,
                     prefix: str = STEP_PREFIX) -> Path:
    """<root>/<prefix>NNNNNNNN with trainable.safetensors and state.json, made in a temporary folder and renamed (a
    complete checkpoint or none); older ones beyond `keep` are removed afterwards."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{prefix}{step:08d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                  str(tmp / "trainable.safetensors"), metadata={"format": "pt"})
        return publish_checkpoint(tmp, final, state, keep, prefix)
    except BaseException:  # a full disk, a kill by exception: no half checkpoint is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_checkpoint(tmp: Path, final: Path, state: dict, keep: int, prefix: str = STEP_PREFIX) -> Path:
    """Adds state.json to a checkpoint written in `tmp` (one safetensors file, or a sharded one), syncs it and renames
    it to `final` (a complete checkpoint or none); older ones beyond `keep` are removed afterwards."""
    (tmp / "state.json").write_text(json.dumps(state))
    for f in tmp.iterdir():
        if f.is_file():
            _fsync(f)
    if final.exists():  # the same step saved again (a resumed run): the older copy goes
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(final.parent)
    for old in list_checkpoints(final.parent, prefix)[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def clear_checkpoints(root: str | os.PathLike) -> int:
    """Deletes every checkpoint (and killed write) in `root`, for a run that starts over there; returns how many."""
    root = Path(root)
    found = list_checkpoints(root) + [p for p in root.glob(f".{STEP_PREFIX}*.tmp-*")] if root.is_dir() else []
    for p in found:
        shutil.rmtree(p, ignore_errors=True)
    return len(found)


def list_checkpoints(root: str | os.PathLike, prefix: str = STEP_PREFIX) -> list[Path]:
    """Complete checkpoints in `root`, oldest first (temporary folders of killed writes are not listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.name.startswith(prefix) and p.name[len(prefix):].isdigit() and (p / "state.json").is_file() \
                and ((p / "trainable.safetensors").is_file() or (p / ".metadata").is_file()):  # .metadata: sharded
            found.append(p)
    return sorted(found, key=lambda p: int(p.name[len(prefix):]))


def latest_checkpoint(root: str | os.PathLike, prefix: str = STEP_PREFIX) -> Path | None:
    found = list_checkpoints(root, prefix)
    return found[-1] if found else None


def read_checkpoint(path: Path, required: tuple[str, ...] = ("step",)) -> tuple[dict, dict[str, torch.Tensor]]:
    """(state.json's dict, the tensors) of the checkpoint folder `path`. A truncated or corrupt one (or a state without
    the `required` keys) is named, and the newest earlier complete checkpoint offered."""
    try:
        state = json_object(json.loads((path / "state.json").read_text()), path / "state.json")
        require_keys(state, required, path / "state.json")
        with safe_open(str(path / "trainable.safetensors"), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError, RuntimeError, SafetensorError, CogVXError) as e:
        prefix = path.name.rstrip("0123456789")  # step- or vae-step-
        raise damaged_checkpoint(path, e, list_checkpoints(path.parent, prefix)) from None
    return state, tensors
