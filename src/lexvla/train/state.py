"""Training checkpoints: `run_dir/checkpoints/step_N/` = a model checkpoint + optimiser + scheduler state.

Everything is safetensors or JSON (never pickle); each checkpoint folder is written to a temporary
sibling, fsynced and renamed into place, and only the newest `keep` are kept. A step folder is itself a
model checkpoint (`model.safetensors` holds whole weights), so `--model RUN_DIR` and
`--model RUN_DIR/checkpoints/step_N` both work. The optimiser state has one of two layouts:

- one process or DDP: `optimizer.safetensors`, whole tensors named `<parameter>::<state key>`;
- FSDP2: `sharded/`, written by every rank with `torch.distributed.checkpoint` (DCP) in its safetensors
  format: one file per rank with that rank's shards of the trained parameters and of their optimiser
  state (same names), and the offset of each shard. No rank gathers the optimiser state.

A sharded checkpoint resumes through DCP into whatever layout the resumed run has (FSDP2 on any number
of processes, DDP or one process: DCP reshards); an FSDP2 run resumes a whole-tensor checkpoint the
same way. A full disk stops the run with a `DiskFullError` naming the checkpoint; the checkpoints
written before it are intact, and `--resume` continues from the newest once space is freed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lexvla._atomic import (
    DiskFullError,
    atomic_dir,
    atomic_write_text,
    disk_full_error,
    is_disk_full,
)
from lexvla.errors import LexVLAError
from lexvla.models.lexvla import LexVLA
from lexvla.models.serialization import (
    DIVERGED_FIX,
    NONFINITE_FILE_FIX,
    WEIGHTS,
    load_trained_weights,
    require_finite,
    write_checkpoint_files,
)
from lexvla.train.distributed import any_rank, barrier

logger = logging.getLogger(__name__)
_STEP = re.compile(r"step_(\d+)")
OPTIMIZER = "optimizer.safetensors"
STATE = "trainer_state.json"
SHARDED = "sharded"  # the DCP folder of an FSDP2 checkpoint
RESUME_HINT = "resume the run with --resume (the checkpoints written before are intact)"

write_text_atomic = atomic_write_text  # run files (config.json, summary.json): atomic and fsynced


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


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 tensor (DTensor), else the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def is_sharded(model: LexVLA) -> bool:
    """True when FSDP2 has sharded the trained parameters (they are DTensors)."""
    return any(hasattr(p, "full_tensor") for p in model.trainable_parameters().values())


def full_trainable_state(model: LexVLA) -> dict[str, torch.Tensor]:
    """Trained parameters as whole CPU tensors (gathered from FSDP2 shards on every rank)."""
    return {name: _full(param) for name, param in model.trainable_parameters().items()}


def _optimizer_tensors(model: LexVLA, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimiser state as whole tensors named `<parameter>::<state key>`."""
    tensors = {}
    for name, param in model.trainable_parameters().items():  # same order on every rank
        for key, value in optimizer.state.get(param, {}).items():
            tensors[f"{name}::{key}"] = _full(torch.as_tensor(value))
    return tensors


def _sharded_state(model: LexVLA, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Trained parameters and optimiser state as they are held (DTensors under FSDP2), for DCP."""
    state: dict[str, torch.Tensor] = {}
    for name, param in model.trainable_parameters().items():
        state[name] = param.detach()
        for key, value in optimizer.state.get(param, {}).items():
            state[f"{name}::{key}"] = torch.as_tensor(value)
    return state


def _finite_everywhere(tensors: dict[str, torch.Tensor], what: str, fix: str) -> None:
    """`require_finite` of each rank's shards, every rank raising when one rank finds a bad value."""
    local = {name: _local(tensor) for name, tensor in tensors.items()}
    try:
        require_finite(local, what, fix)
    except LexVLAError:
        any_rank(True, _device(tensors))
        raise
    if any_rank(False, _device(tensors)):
        raise LexVLAError(f"{what}: NaN or inf values on another rank; {fix}")


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """Hide DCP's warning that it runs without a process group (resuming sharded state in one
    process is intended)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def _device(tensors: dict[str, torch.Tensor]) -> torch.device:
    return _local(next(iter(tensors.values()))).device


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
    sharded: bool | None = None,
) -> Path:
    """Write checkpoint `step` atomically and prune older ones beyond `keep`.

    Under FSDP every rank calls this (to gather the weights and write its shards); only `is_writer`
    writes the rest. `sharded` chooses the `sharded/` layout (default: when the model is sharded).

    Raises:
        DiskFullError: no space for the checkpoint (nothing under its final name changed).
    """
    folder = run_dir / "checkpoints" / f"step_{step:07d}"
    sharded = is_sharded(model) if sharded is None else sharded
    weights = full_trainable_state(model)
    what = f"not writing the checkpoint {folder}"
    staging = None
    if sharded:
        state = _sharded_state(model, optimizer)
        _finite_everywhere(state, what, DIVERGED_FIX)
        staging = _write_shards(state, folder, is_writer)
        optimizer_tensors = {}
    else:
        optimizer_tensors = _optimizer_tensors(model, optimizer)
        # On every rank (all hold the whole tensors): all raise together, none waits for the writer.
        require_finite({**weights, **optimizer_tensors}, what, DIVERGED_FIX)
    if not is_writer:
        return folder
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    trainer_state = {"step": step, "param_groups": groups, "scheduler": scheduler.state_dict()}
    try:
        with atomic_dir(folder, staging=staging) as tmp:
            write_checkpoint_files(tmp, model.checkpoint_files(weights))
            if not sharded:
                save_file(optimizer_tensors, str(tmp / OPTIMIZER))
            text = json.dumps({**trainer_state, **(extra or {})}, indent=2, default=float)
            (tmp / STATE).write_text(text, encoding="utf-8")
    except DiskFullError:
        raise disk_full_error(folder, then=RESUME_HINT) from None
    _prune(run_dir, keep)
    logger.info("saved checkpoint %s", folder)
    return folder


def _write_shards(state: dict[str, torch.Tensor], folder: Path, is_writer: bool) -> Path:
    """Every rank writes its shards of `state` into `.step_N.sharded-tmp/sharded` (made by the
    writer); returns that staging folder. Raises on every rank when any rank fails."""
    from torch.distributed.checkpoint import CheckpointException, HuggingFaceStorageWriter, save

    staging = folder.with_name(f".{folder.name}.sharded-tmp")  # the same name on every rank
    if is_writer:
        shutil.rmtree(staging, ignore_errors=True)  # a leftover of a killed run
        staging.mkdir(parents=True)
    barrier()
    writer = HuggingFaceStorageWriter(str(staging / SHARDED), save_distributed=True)
    try:
        with _single_process_quiet():
            save(state, storage_writer=writer)
    except CheckpointException as err:  # the failure of any rank, raised on every rank
        if is_writer:
            shutil.rmtree(staging, ignore_errors=True)
        if is_disk_full(err):
            raise disk_full_error(folder, then=RESUME_HINT) from None
        raise LexVLAError(f"cannot write the sharded checkpoint {folder}: {_short(err)}") from None
    return staging


def _short(err: BaseException) -> str:
    """One line per failed rank of a DCP `CheckpointException` (its text holds whole tracebacks)."""
    failures = getattr(err, "failures", None)
    if not failures:
        return str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return "; ".join(
        f"rank {rank}: {type(failure[0]).__name__}: {failure[0]}"
        for rank, failure in sorted(failures.items())
    )


def _prune(run_dir: Path, keep: int) -> None:
    """Remove checkpoints older than the newest `keep`, and temporary folders of killed saves."""
    for _, old in checkpoint_steps(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in (run_dir / "checkpoints").glob(".step_*"):
        shutil.rmtree(leftover, ignore_errors=True)


def save_final_model(model: LexVLA, folder: Path, *, is_writer: bool = True) -> None:
    """The final model as a checkpoint folder (gathering FSDP shards on every rank)."""
    weights = full_trainable_state(model)
    if is_writer:
        with atomic_dir(folder) as tmp:
            write_checkpoint_files(tmp, model.checkpoint_files(weights))


def load_latest(
    run_dir: Path,
    model: LexVLA,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> int:
    """Restore the newest checkpoint of `run_dir` into model/optimizer/scheduler; returns its step.

    A `sharded/` checkpoint, or any checkpoint resumed by a sharded model, is read with DCP.
    """
    steps = checkpoint_steps(run_dir)
    if not steps:
        logger.info("no checkpoint in %s: starting from step 0", run_dir)
        return 0
    step, folder = steps[-1]
    if (folder / SHARDED).is_dir() or is_sharded(model):
        source = folder / SHARDED if (folder / SHARDED).is_dir() else folder
        _load_with_dcp(source, model, optimizer)
    else:
        load_trained_weights(model.trainable_parameters(), folder / WEIGHTS)
        _load_optimizer(folder, model, optimizer)
    state = _read_state(folder)
    _load_param_groups(folder, state, optimizer)
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
    params = model.trainable_parameters()
    for name, param in params.items():
        entries = {
            k.split("::", 1)[1]: v for k, v in tensors.items() if k.split("::", 1)[0] == name
        }
        if entries:
            optimizer.state[param] = {k: v.to(param.device) for k, v in entries.items()}


def _load_param_groups(folder: Path, state: dict, optimizer: torch.optim.Optimizer) -> None:
    if len(state["param_groups"]) != len(optimizer.param_groups):
        raise LexVLAError(f"{folder}: optimizer groups do not match this model's; cannot resume")
    for group, saved in zip(optimizer.param_groups, state["param_groups"]):
        group.update(saved)


def _load_with_dcp(source: Path, model: LexVLA, optimizer: torch.optim.Optimizer) -> None:
    """Trained parameters and optimiser state from the safetensors files in `source`, read with DCP
    into the layout the model has now (its FSDP2 shards, or whole tensors): DCP reshards."""
    from torch.distributed.checkpoint import CheckpointException, HuggingFaceStorageReader, load

    stored = _stored_tensors(source)
    params = model.trainable_parameters()
    _check_architecture(source, stored, params)
    targets: dict[str, torch.Tensor] = {name: param.detach() for name, param in params.items()}
    states: dict[torch.nn.Parameter, dict[str, torch.Tensor]] = {}
    for name, param in params.items():
        keys = [k.split("::", 1)[1] for k in stored if k.split("::", 1)[0] == name and "::" in k]
        if keys:
            states[param] = {key: _target_like(source, name, stored, key, param) for key in keys}
            targets.update({f"{name}::{key}": value for key, value in states[param].items()})
    try:
        with _single_process_quiet():
            load(targets, storage_reader=HuggingFaceStorageReader(str(source)))
    except (CheckpointException, SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise LexVLAError(f"cannot resume from {source}: {_short(err)}") from None
    _finite_everywhere(targets, f"cannot resume from {source}", NONFINITE_FILE_FIX)
    for param, state in states.items():
        optimizer.state[param] = state


def _stored_tensors(source: Path) -> dict:
    """Name -> DCP tensor metadata (whole shape, dtype) of the safetensors files in `source`."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    try:
        return dict(HuggingFaceStorageReader(str(source)).read_metadata().state_dict_metadata)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:
        raise LexVLAError(
            f"cannot resume from {source}: its safetensors files cannot be read ({err}); they are"
            " damaged or not safetensors (refused)"
        ) from None


def _check_architecture(source: Path, stored: dict, params: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(params) - set(stored))
    unexpected = sorted(k for k in stored if k.split("::", 1)[0] not in params)
    if missing or unexpected:
        raise LexVLAError(
            f"{source} is a checkpoint of another architecture: unexpected keys {unexpected[:5]},"
            f" missing keys {missing[:5]}"
        )
    for name, param in params.items():
        if tuple(stored[name].size) != tuple(param.shape):
            raise LexVLAError(
                f"{source}: '{name}' has shape {tuple(stored[name].size)}, this model expects "
                f"{tuple(param.shape)} (a checkpoint of another architecture or vocabulary)"
            )


def _target_like(
    source: Path, name: str, stored: dict, key: str, param: torch.Tensor
) -> torch.Tensor:
    """An empty tensor to load optimiser state `name::key` into: shaped (and sharded) like the
    parameter, or a scalar (a step count)."""
    meta = stored[f"{name}::{key}"]
    dtype = meta.properties.dtype
    if tuple(meta.size) == tuple(param.shape):
        return torch.zeros_like(param.detach(), dtype=dtype)
    if tuple(meta.size) == ():
        return torch.zeros((), dtype=dtype)
    raise LexVLAError(
        f"{source}: optimiser state '{name}::{key}' has shape {tuple(meta.size)}, neither the"
        f" parameter's {tuple(param.shape)} nor a scalar; cannot resume from it"
    )
