"""Training checkpoints: `run_dir/checkpoints/step_N/` = a model checkpoint + optimiser + scheduler state.

Everything is safetensors or JSON (never pickle); each checkpoint folder is written to a temporary
sibling and renamed into place, and only the newest `keep` are kept. A step folder is itself a model
checkpoint, so `--model RUN_DIR` and `--model RUN_DIR/checkpoints/step_N` both work.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lexvla.errors import LexVLAError
from lexvla.models.checkpoint import (
    DIVERGED_FIX,
    NONFINITE_FILE_FIX,
    atomic_dir,
    load_trained_weights,
    require_finite,
    write_model_files,
)
from lexvla.models.lexvla import LexVLA

logger = logging.getLogger(__name__)
_STEP = re.compile(r"step_(\d+)")
OPTIMIZER = "optimizer.safetensors"
STATE = "trainer_state.json"


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def feature_cache_root() -> Path:
    """Frozen features are shared by runs: `$LEXVLA_CACHE/features` (default ~/.cache/lexvla)."""
    root = os.environ.get("LEXVLA_CACHE") or str(Path.home() / ".cache" / "lexvla")
    return Path(root) / "features"


def checkpoint_steps(run_dir: Path) -> list[tuple[int, Path]]:
    """Completed checkpoints of a run, oldest first."""
    found = []
    for path in (run_dir / "checkpoints").glob("step_*"):
        match = _STEP.fullmatch(path.name)
        if match and (path / STATE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A whole tensor from an FSDP2 shard (a collective: every rank must call it), else itself."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return (full_tensor() if full_tensor is not None else tensor).detach().cpu().contiguous()


def full_trainable_state(model: LexVLA) -> dict[str, torch.Tensor]:
    """Trained parameters as whole CPU tensors (gathered from FSDP2 shards on every rank)."""
    return {name: _full(param) for name, param in model.trainable_parameters().items()}


def _optimizer_tensors(model: LexVLA, optimizer: torch.optim.Optimizer) -> tuple[dict, list]:
    tensors = {}
    for name, param in model.trainable_parameters().items():  # same order on every rank
        for key, value in optimizer.state.get(param, {}).items():
            tensors[f"{name}::{key}"] = _full(torch.as_tensor(value))
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return tensors, groups


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: LexVLA,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    keep: int = 2,
    extra: dict | None = None,
    is_writer: bool = True,
) -> Path:
    """Write checkpoint `step` atomically and prune older ones beyond `keep`.

    Under FSDP every rank calls this (to gather the shards); only `is_writer` writes.
    """
    folder = run_dir / "checkpoints" / f"step_{step:07d}"
    weights = full_trainable_state(model)
    tensors, groups = _optimizer_tensors(model, optimizer)
    # On every rank (all hold the whole tensors): all raise together, none waits for the writer.
    require_finite({**weights, **tensors}, f"not writing the checkpoint {folder}", DIVERGED_FIX)
    if not is_writer:
        return folder
    with atomic_dir(folder) as tmp:
        write_model_files(model, tmp, weights)
        save_file(tensors, str(tmp / OPTIMIZER))
        state = {
            "step": step,
            "param_groups": groups,
            "scheduler": scheduler.state_dict(),
            **(extra or {}),
        }
        (tmp / STATE).write_text(json.dumps(state, indent=2, default=float), encoding="utf-8")
    for _, old in checkpoint_steps(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("saved checkpoint %s", folder)
    return folder


def save_final_model(model: LexVLA, folder: Path, *, is_writer: bool = True) -> None:
    """The final model as a checkpoint folder (gathering FSDP shards on every rank)."""
    weights = full_trainable_state(model)
    if is_writer:
        with atomic_dir(folder) as tmp:
            write_model_files(model, tmp, weights)


def load_latest(
    run_dir: Path,
    model: LexVLA,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> int:
    """Restore the newest checkpoint of `run_dir` into model/optimizer/scheduler; returns its step."""
    steps = checkpoint_steps(run_dir)
    if not steps:
        logger.info("no checkpoint in %s: starting from step 0", run_dir)
        return 0
    step, folder = steps[-1]
    if any(hasattr(p, "full_tensor") for p in model.trainable_parameters().values()):
        raise LexVLAError(
            "resuming an FSDP run is not supported yet: resume it with train.distributed=ddp"
        )
    load_trained_weights(model, folder / "model.safetensors")
    _load_optimizer(folder, model, optimizer)
    state = _read_state(folder)
    try:
        scheduler.load_state_dict(state["scheduler"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise LexVLAError(
            f"{folder / STATE}: bad scheduler state ({err!r}); cannot resume"
        ) from None
    logger.info("resumed from %s (step %d)", folder, step)
    return int(state["step"])


def _read_state(folder: Path) -> dict:
    """trainer_state.json of a checkpoint (JSON only), with a clear error when it is damaged."""
    try:
        state = json.loads((folder / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # ValueError: not JSON, not UTF-8
        raise LexVLAError(f"cannot read {folder / STATE} ({err}); cannot resume from it") from None
    if not (
        isinstance(state, dict)
        and isinstance(state.get("param_groups"), list)
        and type(state.get("step")) is int
    ):
        raise LexVLAError(f"{folder / STATE} is not a trainer state; cannot resume from it")
    return state


def _load_optimizer(folder: Path, model: LexVLA, optimizer: torch.optim.Optimizer) -> None:
    try:
        tensors = load_file(str(folder / OPTIMIZER))
    except (SafetensorError, OSError) as err:
        raise LexVLAError(
            f"{folder / OPTIMIZER} is not a valid safetensors file ({err}); cannot resume from it"
        ) from None
    require_finite(tensors, f"cannot resume from {folder / OPTIMIZER}", NONFINITE_FILE_FIX)
    state = _read_state(folder)
    params = model.trainable_parameters()
    for name, param in params.items():
        entries = {
            k.split("::", 1)[1]: v for k, v in tensors.items() if k.split("::", 1)[0] == name
        }
        if entries:
            optimizer.state[param] = {k: v.to(param.device) for k, v in entries.items()}
    if len(state["param_groups"]) != len(optimizer.param_groups):
        raise LexVLAError(f"{folder}: optimizer groups do not match this model's; cannot resume")
    for group, saved in zip(optimizer.param_groups, state["param_groups"]):
        group.update(saved)
