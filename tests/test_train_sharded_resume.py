"""FSDP2 runs resume: checkpoints hold `sharded/` (torch.distributed.checkpoint, safetensors), written by
every rank; a 2-process run SIGKILLed at a random step and resumed ends with the weights of the
uninterrupted run, and the same checkpoint resumes in one process (DCP reshards). The sharded layout
itself is checked in one process: it resumes to the exact saved state, and damaged or non-finite
shard files are refused naming the file."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.training import optimizer_state, trained_tiny
from lexvla import LexVLA
from lexvla.errors import LexVLAError
from lexvla.train import state as ckpt

TRAIN = [sys.executable, "-m", "lexvla.train"]
TORCHRUN = Path(sys.executable).parent / "torchrun"
ARGS = ["--preset", "tiny", "--set", "train.steps=10", "--set", "train.save_every=2",
        "--set", "train.keep_checkpoints=3", "--set", "train.batch_size=8",
        "--set", "model.text.lora_dropout=0.0", "--set", "data.path=synthetic:32",
        "--set", "train.distributed=fsdp"]  # fmt: skip


def _torchrun(out: Path, *extra: str, port: int) -> list[str]:
    return [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(port), "-m",
            "lexvla.train", *ARGS, "--out", str(out), *extra]  # fmt: skip


TIMEOUT_S = 900  # a hang, not a slow run: 10 tiny steps take ~15 s, but this CPU may be shared


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", LEXVLA_DIST_TIMEOUT_S="300", PYTHONUNBUFFERED="1")


def _logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [
        json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")
    ]


def _kill_at_step(command: list[str], run: Path, step: int) -> None:
    """Start a torchrun job in its own session and SIGKILL all of it (agent and both ranks) once
    rank 0 has logged `step`: a preemption."""
    proc = subprocess.Popen(command, env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + TIMEOUT_S
        while (
            time.time() < deadline
            and proc.poll() is None
            and max(_logged_steps(run), default=0) < step
        ):
            time.sleep(0.02)
        assert proc.poll() is None, "training finished before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)


def _run(command: list[str]) -> None:
    try:
        result = subprocess.run(
            command, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired as err:  # say where it stood: training, or after "done"
        output = (err.stdout or b"")[-1000:].decode() + (err.stderr or b"")[-3000:].decode()
        raise AssertionError(f"{command[-4:]} ran over {TIMEOUT_S} s:\n{output}") from None
    assert result.returncode == 0, result.stderr[-3000:]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


@pytest.mark.slow
def test_two_process_fsdp_run_killed_at_a_random_step_resumes_to_the_same_weights(tmp_path):
    if not TORCHRUN.exists():
        pytest.skip("torchrun is not installed next to this Python")
    seed = int.from_bytes(os.urandom(2), "little")
    kill_step = random.Random(seed).randrange(3, 9)
    port = 29500 + os.getpid() % 1000 + 2
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run(_torchrun(straight, port=port))
    _kill_at_step(_torchrun(killed, port=port), killed, kill_step)
    note = f"killed after step {kill_step} (seed {seed})"
    assert not (killed / "model").exists(), note
    newest = ckpt.checkpoint_steps(killed)[-1][1]
    shards = sorted(p.name for p in (newest / ckpt.SHARDED).iterdir())
    assert len(shards) == 2 and not (newest / ckpt.OPTIMIZER).exists(), (note, shards)
    one = tmp_path / "one-process"
    shutil.copytree(killed, one)

    _run(_torchrun(killed, "--resume", port=port))
    a, b = _weights(killed), _weights(straight)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=f"{key}; {note}")
    assert _logged_steps(killed) == list(range(1, 11)), note  # every step logged exactly once
    assert not list((killed / "checkpoints").glob(".*")), "temporary folders of the killed save"
    assert LexVLA.from_pretrained(killed / "model").vocab_size > 0  # a plain safetensors model

    # The 2-rank shards resume in one process (no FSDP): DCP reshards them into whole tensors.
    _run([*TRAIN, *ARGS, "--out", str(one), "--resume"])
    c = _weights(one)
    for key in a:  # one process and two differ only by the order of float sums
        torch.testing.assert_close(c[key], b[key], rtol=1e-4, atol=1e-5, msg=f"{key}; {note}")


# ------------------------------------------------------------------- the sharded layout, one process
def test_sharded_checkpoint_resumes_to_the_saved_state(tmp_path):
    model, optimizer, scheduler = trained_tiny()
    folder = ckpt.save_checkpoint(tmp_path, 2, model, optimizer, scheduler, sharded=True)
    assert (folder / ckpt.SHARDED).is_dir() and not (folder / ckpt.OPTIMIZER).exists()
    fresh, fresh_opt, fresh_sched = trained_tiny(steps=0)
    assert ckpt.load_latest(tmp_path, fresh, fresh_opt, fresh_sched) == 2
    for name, value in model.trainable_parameters().items():
        assert torch.equal(fresh.trainable_parameters()[name], value), name
    expected, got = optimizer_state(model, optimizer), optimizer_state(fresh, fresh_opt)
    assert got.keys() == expected.keys() and expected
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert fresh_sched.state_dict() == scheduler.state_dict()
    assert [g["lr"] for g in fresh_opt.param_groups] == [g["lr"] for g in optimizer.param_groups]
    # The step folder is still a plain model checkpoint.
    reloaded = LexVLA.from_pretrained(folder).trainable_parameters()
    assert all(torch.equal(reloaded[k], v) for k, v in model.trainable_parameters().items())


def test_whole_tensor_checkpoint_reads_the_same_through_dcp(tmp_path):
    """The reader of sharded checkpoints (used by FSDP runs) gives the legacy reader's state."""
    model, optimizer, scheduler = trained_tiny()
    folder = ckpt.save_checkpoint(tmp_path, 2, model, optimizer, scheduler)
    legacy, legacy_opt, _ = trained_tiny(steps=0)
    ckpt.load_trained_weights(legacy.trainable_parameters(), folder / "model.safetensors")
    ckpt._load_optimizer(folder, legacy, legacy_opt)
    through_dcp, dcp_opt, _ = trained_tiny(steps=0)
    ckpt._load_with_dcp(folder, through_dcp, dcp_opt)
    for name, value in legacy.trainable_parameters().items():
        assert torch.equal(through_dcp.trainable_parameters()[name], value), name
    expected, got = optimizer_state(legacy, legacy_opt), optimizer_state(through_dcp, dcp_opt)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def _shard_file(tmp_path: Path) -> Path:
    model, optimizer, scheduler = trained_tiny()
    folder = ckpt.save_checkpoint(tmp_path, 2, model, optimizer, scheduler, sharded=True)
    return next((folder / ckpt.SHARDED).iterdir())


def test_a_pickle_planted_in_a_shard_file_is_refused_unexecuted(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"cos\nsystem\n(S'mkdir {marker}'\ntR.".encode()
    _shard_file(tmp_path / "run").write_bytes(payload)
    fresh, fresh_opt, fresh_sched = trained_tiny(steps=0)
    with pytest.raises(LexVLAError, match="cannot resume from .*sharded.*refused"):
        ckpt.load_latest(tmp_path / "run", fresh, fresh_opt, fresh_sched)
    assert not marker.exists()


def test_non_finite_shards_are_refused(tmp_path):
    shard = _shard_file(tmp_path)
    from safetensors import safe_open

    with safe_open(str(shard), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
    name = next(k for k in tensors if k.endswith("::exp_avg"))
    tensors[name][0] = float("nan")
    save_file(tensors, str(shard), metadata=metadata)
    fresh, fresh_opt, fresh_sched = trained_tiny(steps=0)
    with pytest.raises(LexVLAError, match=f"NaN or inf values in {name}"):
        ckpt.load_latest(tmp_path, fresh, fresh_opt, fresh_sched)
