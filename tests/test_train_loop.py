"""End-to-end training on `tiny`: loss goes down, run folder layout, exact SIGKILL resume, corrupt data,
2-process DDP (gloo) equal to one process, and the divergence guard (non-finite steps skipped, a
streak of them stops the run)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lexvla.losses import LexVLAObjective
from lexvla.presets import get_preset
from lexvla.train.loop import TrainingDivergedError, fit
from lexvla.train.setup import experiment_config

TRAIN = [sys.executable, "-m", "lexvla.train"]


def _cfg(*overrides: str):
    return experiment_config("tiny", overrides=list(overrides))


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def test_smoke_training_reduces_the_loss_and_writes_the_run_folder(tmp_path):
    cfg = _cfg(
        "train.steps=40",
        "train.save_every=10",
        "train.keep_checkpoints=2",
        "data.path=synthetic:64",
        "train.batch_size=16",
    )
    state = fit(cfg, tmp_path, progress=False)
    assert state.step == 40
    losses = [m["loss"] for m in _metrics(tmp_path)]
    assert len(losses) == 40 and all(np.isfinite(losses))
    assert losses[0] == pytest.approx(np.log(16), abs=0.01)  # random tiny vectors: chance level
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.03, losses
    for name in ("config.json", "metrics.jsonl", "summary.json", "model/model.safetensors"):
        assert (tmp_path / name).is_file(), name
    steps = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert steps == ["step_0000020", "step_0000030"]  # keep-last-2; the final model lives in model/
    assert list((tmp_path / "tb").iterdir()), "TensorBoard events written"
    from lexvla import create_model

    assert create_model(tmp_path).vocab_size > 0  # a run folder works wherever --model is taken


def _run_until_killed(run: Path, args: list[str], kill_after_step: int) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [*TRAIN, *args, "--out", str(run)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            metrics = run / "metrics.jsonl"
            if metrics.exists() and any(
                json.loads(line).get("step", 0) >= kill_after_step
                for line in metrics.read_text().splitlines()
                if line.endswith("}")
            ):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "training finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)


@pytest.mark.slow
def test_sigkill_and_resume_ends_with_the_same_weights(tmp_path):
    args = [
        "--preset",
        "tiny",
        "--set",
        "train.steps=14",
        "--set",
        "train.save_every=3",
        "--set",
        "train.keep_checkpoints=5",
        "--set",
        "data.path=synthetic:40",
    ]
    killed = tmp_path / "killed"
    _run_until_killed(killed, args, kill_after_step=8)
    assert not (killed / "model").exists()
    subprocess.run(
        [*TRAIN, *args, "--out", str(killed), "--resume"], check=True, capture_output=True
    )
    straight = tmp_path / "straight"
    subprocess.run([*TRAIN, *args, "--out", str(straight)], check=True, capture_output=True)
    a, b = _weights(killed), _weights(straight)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)
    steps = [m["step"] for m in _metrics(killed)]
    assert steps == list(range(1, 15)), "every step logged exactly once"
    assert [m["loss"] for m in _metrics(killed)] == pytest.approx(
        [m["loss"] for m in _metrics(straight)]
    )


@pytest.mark.parametrize("cached", [False, True])
def test_corrupt_images_are_skipped_counted_and_reported(tmp_path, monkeypatch, cached):
    monkeypatch.setenv("LEXVLA_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    rows = ["filepath,caption"]
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(
            tmp_path / f"img{i}.png"
        )
        rows.append(f"img{i}.png,a photo number {i} of a red dog")
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not an image")
    rows += ["zero.jpg,an empty file", "text.jpg,a text file"]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    cfg = _cfg(
        f"data.path={tmp_path / 'data.csv'}",
        "train.steps=3",
        "train.batch_size=8",
        f"train.cache_features={str(cached).lower()}",
    )
    state = fit(cfg, tmp_path / "run", progress=False)
    assert state.step == 3 and state.skipped_samples == 2
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_samples"] == 2
    assert {Path(p).name for p in summary["skipped_files"]} == {"zero.jpg", "text.jpg"}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one_process(tmp_path, strategy):
    if shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("torchrun is not installed next to this Python")
    common = [
        "--preset",
        "tiny",
        "--set",
        "train.steps=3",
        "--set",
        "train.batch_size=8",
        "--set",
        "model.text.lora_dropout=0.0",
        "--set",
        "data.path=synthetic:32",
        "--set",
        "train.save_every=0",
        "--set",
        f"train.distributed={strategy}",
    ]
    single, double = tmp_path / "one", tmp_path / "two"
    subprocess.run([*TRAIN, *common, "--out", str(single)], check=True, capture_output=True)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "--master_port",
            str(29500 + os.getpid() % 1000),
            "-m",
            "lexvla.train",
            *common,
            "--out",
            str(double),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    losses_one = [m["loss"] for m in _metrics(single)]
    losses_two = [m["loss"] for m in _metrics(double)]
    assert losses_two == pytest.approx(losses_one, rel=1e-4, abs=1e-5)
    a, b = _weights(single), _weights(double)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_tiny_preset_default_data_is_synthetic():
    assert get_preset("tiny").data.path.startswith("synthetic")


def test_precomputed_feature_tables_train_exactly_like_pixels(tmp_path, monkeypatch):
    """Frozen features computed once into tables (float32) give the same run as the towers every step."""
    monkeypatch.setenv("LEXVLA_CACHE", str(tmp_path / "cache"))
    common = ["train.steps=4", "train.batch_size=8", "data.path=synthetic:24"]
    common += [
        "model.text.use_lora=false",
        "model.text.head=mlp",
        "model.text.input_words_weight=1.0",  # the captions travel with their cached features
        "train.feature_cache_dtype=float32",
    ]
    fit(_cfg(*common, "train.cache_features=false"), tmp_path / "pixels", progress=False)
    fit(_cfg(*common, "train.cache_features=true"), tmp_path / "tables", progress=False)
    tables = sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "features").iterdir())
    assert tables == ["image", "text"]
    expected, got = _metrics(tmp_path / "pixels"), _metrics(tmp_path / "tables")
    assert [m["loss"] for m in got] == pytest.approx([m["loss"] for m in expected], rel=1e-5)
    # Up to float32 rounding: a caption's features depend on how its batch is padded (training
    # batches of 8 here, the table's batches of 64 of near-equal length there).
    for name, value in _weights(tmp_path / "pixels").items():
        torch.testing.assert_close(_weights(tmp_path / "tables")[name], value, rtol=1e-4, atol=1e-5)


def test_feature_table_resumes_from_its_chunks_and_reads_a_second_time(tmp_path):
    from lexvla.train.features import FeatureTable

    calls: list[range] = []

    def encode(span: range) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(span)
        if span.start == 4 and len(calls) == 2:
            raise KeyboardInterrupt  # the first pass dies in its second chunk
        rows = torch.arange(span.start, span.stop, dtype=torch.float32)[:, None].repeat(1, 3)
        return rows, torch.tensor([i != 5 for i in span])

    with pytest.raises(KeyboardInterrupt):
        FeatureTable.build(tmp_path, 10, encode, chunk=4)
    table = FeatureTable.build(tmp_path, 10, encode, chunk=4)
    assert [(c.start, c.stop) for c in calls] == [(0, 4), (4, 8), (4, 8), (8, 10)]
    assert table.features[:, 0].tolist() == list(range(10)) and table.failed == [5]
    calls.clear()
    again = FeatureTable.build(tmp_path, 10, encode, chunk=4)
    assert calls == [] and torch.equal(again.features, table.features)
    (tmp_path / "chunk_000001.safetensors").write_bytes(b"garbage")  # a damaged chunk is recomputed
    FeatureTable.build(tmp_path, 10, encode, chunk=4)
    assert [(c.start, c.stop) for c in calls] == [(4, 8)]


# ---------------------------------------------------------------------------------- divergence guard
class _Poisoned(LexVLAObjective):
    """The objective, with a NaN loss at the 1-based steps in `NAN_LOSS` and a finite loss but a NaN
    gradient (0 · sqrt'(0) on the temperature) at the steps in `NAN_GRAD`."""

    NAN_LOSS: frozenset[int] = frozenset()
    NAN_GRAD: frozenset[int] = frozenset()

    def __call__(self, image, text, logit_scale, step, penalty_inputs=None, **kwargs):
        out = super().__call__(image, text, logit_scale, step, penalty_inputs, **kwargs)
        if step + 1 in self.NAN_LOSS:
            out["loss"] = out["loss"] * float("nan")
        if step + 1 in self.NAN_GRAD:
            out["loss"] = out["loss"] + 0.0 * torch.sqrt(logit_scale - logit_scale.detach()).sum()
        return out


def _poison(monkeypatch, nan_loss=(), nan_grad=()) -> list[dict]:
    """Make `fit` use _Poisoned; returns the per-step record (weights, AdamW step count) it fills."""
    import lexvla.train.loop as loop

    poisoned = type(
        "P", (_Poisoned,), {"NAN_LOSS": frozenset(nan_loss), "NAN_GRAD": frozenset(nan_grad)}
    )
    monkeypatch.setattr(loop, "LexVLAObjective", poisoned)
    record: list[dict] = []
    original = loop.train_step

    def recording_step(t, step):
        metrics = original(t, step)
        params = t.model.trainable_parameters()
        adam = [float(s["step"]) for s in t.optimizer.state.values() if "step" in s]
        record.append({"weights": {k: v.detach().clone() for k, v in params.items()}, "adam": adam})
        return metrics

    monkeypatch.setattr(loop, "train_step", recording_step)
    return record


def test_nonfinite_steps_are_skipped_counted_and_logged_as_null(tmp_path, monkeypatch):
    record = _poison(monkeypatch, nan_loss={3}, nan_grad={5})
    cfg = _cfg("train.steps=7", "train.save_every=0", "train.grad_clip=0")
    state = fit(cfg, tmp_path, progress=False)
    assert state.step == 7 and state.nonfinite_steps == 2 and state.nonfinite_in_a_row == 0
    for skipped in (3, 5):  # 1-based: record[i] holds the weights after step i + 1
        for key, value in record[skipped - 1]["weights"].items():
            assert torch.equal(value, record[skipped - 2]["weights"][key]), (skipped, key)
    assert not torch.equal(record[3]["weights"]["logit_scale"], record[2]["weights"]["logit_scale"])
    assert set(record[-1]["adam"]) == {5.0}  # AdamW made 5 updates in 7 steps
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line, parse_constant=_no_constants) for line in lines]  # strict JSON
    assert [m["skipped_nonfinite"] for m in metrics] == [0, 0, 1, 0, 1, 0, 0]
    assert metrics[2]["loss"] is None and metrics[2]["grad_norm"] is None
    assert np.isfinite(metrics[4]["loss"]) and metrics[4]["grad_norm"] is None
    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=_no_constants)
    assert summary["nonfinite_steps"] == 2


def _no_constants(name: str):
    raise AssertionError(f"bare {name} in a JSON file")


def test_divergence_stops_the_run_naming_step_loss_and_last_good_checkpoint(tmp_path, monkeypatch):
    _poison(monkeypatch, nan_loss=set(range(5, 100)))
    cfg = _cfg("train.steps=20", "train.save_every=2", "train.keep_checkpoints=5")
    with pytest.raises(TrainingDivergedError) as caught:
        fit(cfg, tmp_path, progress=False)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 10))  # stopped after 5 in a row: 5-9
    message = str(caught.value)
    assert "diverged at step 9" in message and "steps 5-9" in message
    assert f"last finite loss: {metrics[3]['loss']:.6g} at step 4" in message
    # Step 4's checkpoint holds the weights that gave step 5's NaN: the good one is step 2's.
    assert f"last good checkpoint: {tmp_path / 'checkpoints' / 'step_0000002'}" in message
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert saved == ["step_0000002", "step_0000004"]  # none written during the streak
    assert not (tmp_path / "model").exists() and not (tmp_path / "summary.json").exists()


def test_a_diverging_lr_exits_with_status_2_and_no_model(tmp_path):
    result = subprocess.run(
        [*TRAIN, "--preset", "tiny", "--out", str(tmp_path), "--set", "train.lr=1e8",
         "--set", "train.steps=15"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "training diverged at step" in result.stderr and "Traceback" not in result.stderr
    assert "last finite loss" in result.stderr and "last good checkpoint" in result.stderr
    assert not (tmp_path / "model").exists()
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=_no_constants)


@pytest.mark.slow
def test_two_processes_stop_together_on_divergence(tmp_path):
    if shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("torchrun is not installed next to this Python")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    result = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000 + 1),
         "-m", "lexvla.train", "--preset", "tiny", "--out", str(tmp_path),
         "--set", "train.lr=1e8", "--set", "train.steps=15", "--set", "train.batch_size=8"],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.count("training diverged at step") == 2, result.stderr[
        -3000:
    ]  # both ranks
    single = subprocess.run(
        [*TRAIN, "--preset", "tiny", "--out", str(tmp_path / "one"), "--set", "train.lr=1e8",
         "--set", "train.steps=15", "--set", "train.batch_size=8"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    where = re.compile(r"diverged at step \d+: steps \d+-\d+")
    assert set(where.findall(result.stderr)) == set(where.findall(single.stderr)) != set()
