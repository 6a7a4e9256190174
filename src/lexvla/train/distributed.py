"""Tensor-level distributed helpers: process-group setup from torchrun or SLURM, gather with gradient.

Every helper is a no-op in a single process (no process group), so library and training code call them
unconditionally.

Gradient convention of :func:`all_gather_with_grad` (the one of `torch.distributed.nn.all_gather` and
open_clip's `gather_features(gather_with_grad=True)`): each rank computes the loss of the whole gathered
batch, and the gradient returned for the local slice is the **sum over ranks** of the gradients reaching
that slice. All ranks compute the same global loss L, so the local slice receives `world_size · ∂L/∂x_r`,
and DDP's gradient *averaging* turns the parameter gradients into exactly the single-process `∂L/∂θ`
of the same global batch.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import FunctionCtx

from lexvla._launch import launcher_env
from lexvla.errors import LexVLAError

logger = logging.getLogger(__name__)

TIMEOUT_ENV = "LEXVLA_DIST_TIMEOUT_S"  # set-up and collective timeout, seconds
DEFAULT_TIMEOUT_S = 1800.0  # torch's own default for gloo and NCCL process groups
TEARDOWN_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _select_device(device: str, local_rank: int) -> torch.device:
    """`auto`: `cuda:<local_rank>` when CUDA is available, else CPU. `cuda` gets the local rank."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device(device)


def init_distributed(device: str = "auto", timeout_s: float | None = None) -> DistInfo:
    """Join the process group the launcher describes (torchrun or SLURM), or run as one process.

    torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Under SLURM (`srun`) the
    rank comes from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and the job script must export
    MASTER_ADDR and MASTER_PORT. Backend: NCCL on CUDA, gloo otherwise. Idempotent.

    Args:
        device: "auto", "cpu", "cuda" (this process's local GPU) or an explicit torch device string.
        timeout_s: how long joining may wait for the other processes, and any collective for the
            slowest rank (default: $LEXVLA_DIST_TIMEOUT_S, else 1800 s).

    Returns:
        The rank, world size, local rank and the device this process should use.

    Raises:
        LexVLAError: the other processes did not join within the timeout (naming the address).
    """
    rank, world_size, local_rank = launcher_env()
    torch_device = _select_device(device, local_rank)
    if world_size <= 1:
        return DistInfo(0, 1, 0, torch_device)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if not dist.is_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise LexVLAError(
                f"distributed launch without {' and '.join(missing)}: export them in the job script "
                "(e.g. MASTER_ADDR=$(scontrol show hostnames | head -1), MASTER_PORT=29500) or use "
                "torchrun"
            )
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        timeout = _timeout_s() if timeout_s is None else timeout_s
        try:
            dist.init_process_group(
                backend,
                init_method="env://",
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=timeout),
            )
        except (RuntimeError, ValueError) as err:  # DistStoreError and DistNetworkError included
            where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
            raise LexVLAError(
                f"rank {rank} of {world_size} could not join the process group at {where} within "
                f"{timeout:g} s ({type(err).__name__}: {str(err).splitlines()[0]}): start all "
                f"{world_size} processes, check that the address is reachable, or raise "
                f"{TIMEOUT_ENV}"
            ) from None
        logger.info("rank %d/%d joined (%s, %s)", rank, world_size, backend, torch_device)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, torch_device)


def _timeout_s() -> float:
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise LexVLAError(f"{TIMEOUT_ENV}={text!r}: give a positive number of seconds")
    return value


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    """True on rank 0, and in a single process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if not _active():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when `flag` is set on at least one rank (a MAX all-reduce of one number), so every rank
    takes the same branch; `flag` itself in a single process."""
    if not _active():
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def cleanup(timeout_s: float = TEARDOWN_TIMEOUT_S) -> bool:
    """Leave the process group, if any, waiting at most `timeout_s`; False if it did not finish.

    `fit` calls it only after success (destroying the group while another rank is still in a
    collective can hang). No extra barrier here: a barrier right before destroy made gloo abort
    ("terminate called without an active exception") in 2 of 8 runs of tests/test_distributed.py.
    The group is destroyed in a helper thread so that a teardown that hangs (a peer that vanished)
    cannot keep this process from exiting: after `timeout_s` it is logged and left behind.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return True
    cuda = torch.cuda.current_device() if torch.cuda.is_initialized() else None

    def destroy() -> None:
        if cuda is not None:
            torch.cuda.set_device(cuda)  # the current device is per thread
        dist.destroy_process_group()

    thread = threading.Thread(target=destroy, name="lexvla-pg-teardown", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        logger.warning("the process group did not shut down within %g s; exiting anyway", timeout_s)
        return False
    return True


def _wire_dtype(tensor: Tensor) -> torch.dtype:
    """gloo has no reduction kernels for 16-bit floats on every build: send them as float32."""
    if dist.get_backend() == "gloo" and tensor.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return tensor.dtype


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's (N_r, ...) tensor along dim 0; backward sums gradients over ranks."""

    @staticmethod
    def forward(ctx: FunctionCtx, tensor: Tensor) -> Tensor:
        world = dist.get_world_size()
        sizes_local = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
        sizes = [torch.zeros_like(sizes_local) for _ in range(world)]
        dist.all_gather(sizes, sizes_local)
        counts = [int(s.item()) for s in sizes]
        wire = _wire_dtype(tensor)
        largest = max(counts)
        padded = tensor.new_zeros((largest, *tensor.shape[1:]), dtype=wire)
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        gathered = torch.cat([p[:n] for p, n in zip(parts, counts)]).to(tensor.dtype)
        rank = dist.get_rank()
        ctx.start = sum(counts[:rank])  # type: ignore[attr-defined]
        ctx.stop = ctx.start + counts[rank]  # type: ignore[attr-defined]
        return gathered  # (sum_r N_r, ...)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> Tensor:  # type: ignore[override]
        total = grad.to(_wire_dtype(grad)).contiguous()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total[ctx.start : ctx.stop].to(grad.dtype)  # type: ignore[attr-defined]


def all_gather_with_grad(tensor: Tensor) -> Tensor:
    """Gather `tensor` from every rank along dim 0 (rank order), keeping the autograd graph.

    Ranks may hold different numbers of rows. The result on every rank is
    `cat([t_0, t_1, ..., t_{W-1}])`; the gradient of the local slice is the sum over ranks of the
    gradients reaching it (see the module docstring for why that is right under DDP).
    Returns `tensor` unchanged in a single process.
    """
    if not _active():
        return tensor
    return _AllGatherWithGrad.apply(tensor)
