"""Distributed helpers: single-process no-ops, launcher variables, and a real 2-process gloo group."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from lexvla._launch import launcher_env
from lexvla.config import LossConfig
from lexvla.errors import LexVLAError
from lexvla.losses import LexVLAObjective
from lexvla.search.encode import resolve_rank
from lexvla.train import distributed as D

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
WORLD = 2
SIZES = (5, 3)  # uneven local batches: global batch of 8


@pytest.fixture
def clean_env(monkeypatch):
    for key in (*LAUNCH_VARS, "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_single_process_is_a_no_op(clean_env):
    info = D.init_distributed("cpu")
    assert info == D.DistInfo(0, 1, 0, torch.device("cpu")) and not info.is_distributed
    x = torch.randn(3, 4)
    assert D.all_gather_with_grad(x) is x
    assert D.is_main_process()
    assert D.any_rank(True, info.device) and not D.any_rank(False, info.device)
    D.barrier()
    D.cleanup()


def test_launcher_variables(clean_env):
    clean_env.setenv("SLURM_PROCID", "3")
    clean_env.setenv("SLURM_NTASKS", "8")
    clean_env.setenv("SLURM_LOCALID", "1")
    assert launcher_env() == (3, 8, 1)
    assert resolve_rank(None, None) == (3, 8)  # corpus encoding reads the same variables
    assert resolve_rank(0, None) == (0, 8)
    clean_env.setenv("RANK", "5")  # torchrun inside a SLURM allocation wins
    clean_env.setenv("WORLD_SIZE", "6")
    clean_env.setenv("LOCAL_RANK", "2")
    assert launcher_env() == (5, 6, 2)


def test_slurm_single_task_is_single_process(clean_env):
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "1")
    assert D.init_distributed("cpu").world_size == 1


def test_missing_master_address_is_a_clear_error(clean_env):
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "2")
    with pytest.raises(LexVLAError, match="MASTER_ADDR"):
        D.init_distributed("cpu")


def _global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.nn.Linear]:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(sum(SIZES), 6, generator=gen)  # (8, 6) image features
    texts = torch.randn(sum(SIZES), 6, generator=gen)  # (8, 6) text features
    torch.manual_seed(1)
    return images, texts, torch.nn.Linear(6, 16)  # shared "encoder" to a V=16 vocabulary


def _encode(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.normalize(F.elu(model(x)) + 1, dim=-1)  # (N, V) lexical weights


def _loss(objective, model, images, texts) -> torch.Tensor:
    return objective(_encode(model, images), _encode(model, texts), torch.tensor([10.0]), 5)["loss"]


def _worker(rank: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    info = D.init_distributed("cpu")
    try:
        assert (info.rank, info.world_size, info.local_rank) == (rank, WORLD, rank)
        assert D.is_main_process() == (rank == 0)
        images, texts, model = _global_batch()
        objective = LexVLAObjective(LossConfig(penalty="overuse", penalty_weight=0.5), 100.0)
        start, stop = sum(SIZES[:rank]), sum(SIZES[: rank + 1])
        # Reference: one process, whole global batch.
        ref_model = torch.nn.Linear(6, 16)
        ref_model.load_state_dict(model.state_dict())
        ref_images = images.clone().requires_grad_(True)
        ref_loss = _loss(objective, ref_model, ref_images, texts)
        ref_loss.backward()
        # Distributed: local slice, gather with gradient, DDP-averaged parameter gradients.
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        local = images[start:stop].clone().requires_grad_(True)
        gathered = D.all_gather_with_grad(local)
        torch.testing.assert_close(gathered, images)  # rank-order concatenation
        loss = objective(
            D.all_gather_with_grad(_encode(ddp, local)),
            D.all_gather_with_grad(_encode(ddp, texts[start:stop])),
            torch.tensor([10.0]),
            5,
        )["loss"]
        loss.backward()
        torch.testing.assert_close(loss, ref_loss)
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
        # Input slice: sum over ranks of the same global loss's gradient = W * dL/dx_r.
        torch.testing.assert_close(local.grad, WORLD * ref_images.grad[start:stop])
        half = D.all_gather_with_grad(images[start:stop].bfloat16())  # 16-bit over gloo
        assert half.dtype == torch.bfloat16 and torch.equal(half, images.bfloat16())
        assert D.any_rank(rank == 1, info.device)  # one rank's flag reaches every rank
        assert not D.any_rank(False, info.device)
        D.barrier()
    finally:
        D.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gather_matches_single_process(clean_env):
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)


def test_a_missing_peer_is_a_clear_error_within_the_set_up_timeout(clean_env):
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "2")  # rank 1 never starts
    clean_env.setenv("MASTER_ADDR", "127.0.0.1")
    clean_env.setenv("MASTER_PORT", str(_free_port()))
    start = time.monotonic()
    with pytest.raises(
        LexVLAError, match=r"rank 0 of 2 could not join .* at 127\.0\.0\.1:\d+ within 2 s"
    ):
        D.init_distributed("cpu", timeout_s=2)
    assert time.monotonic() - start < 30
    assert not torch.distributed.is_initialized()
    clean_env.setenv(D.TIMEOUT_ENV, "soon")
    with pytest.raises(LexVLAError, match="LEXVLA_DIST_TIMEOUT_S='soon'"):
        D.init_distributed("cpu")


def test_a_hanging_teardown_is_left_behind_after_its_timeout(monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(D.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(D.dist, "destroy_process_group", release.wait)  # blocks like a lost peer
    start = time.monotonic()
    try:
        assert D.cleanup(timeout_s=0.5) is False
        assert 0.5 <= time.monotonic() - start < 10
    finally:
        release.set()
    monkeypatch.setattr(D.dist, "destroy_process_group", lambda: None)
    assert D.cleanup(timeout_s=5) is True
