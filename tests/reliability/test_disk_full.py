"""A full disk: each writer, run on a small filesystem until it fills, ends with a `DiskFullError` (a
`LexVLAError`: one line and status 2 in the CLI) that names the path and the filesystem to free. What
was written before is intact and readable, no temporary file is left behind, and once space is freed
the resumed run equals an uninterrupted one.

Writers: model and training checkpoints (whole-tensor and sharded), a training run, the frozen-feature
tables and the per-image feature cache, `encode-corpus` shards, index staging, generation and
publishing, and the demo report. Each test mounts a size-limited tmpfs (root only: skipped with the
reason otherwise) and fills it with a ballast file at the moment it chooses, leaving a chosen number
of bytes, so that the write fails where the test wants: at its start or part of the way through.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers.encode import ENCODE, assert_no_half_written_files, assert_same_shards, corpus
from helpers.training import optimizer_state, trained_tiny
from lexvla import LexVLA
from lexvla._atomic import DiskFullError
from lexvla.demo import run_report
from lexvla.index import SparseIndex, _commit, build_index, shards
from lexvla.search import encode_corpus
from lexvla.train import state as ckpt
from lexvla.train.features import FeatureTable, ImageFeatureCache
from lexvla.train.loop import fit
from lexvla.train.setup import experiment_config

__all__ = ["corpus"]  # a fixture used here


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A fresh 32 MiB tmpfs, unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("the full-disk tests mount a size-limited tmpfs, which needs root")
    point = tmp_path / "disk"
    point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the tests need one")
    try:
        yield point
    finally:
        if subprocess.run(["umount", str(point)], capture_output=True).returncode:
            subprocess.run(["umount", "--lazy", str(point)], check=True)  # a file still mapped


class Ballast:
    """A file that takes all free space of a filesystem but about `leave` bytes; `free()` ends it."""

    def __init__(self, disk: Path, leave: int = 0) -> None:
        self.path = disk / "ballast"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            while True:
                os.write(fd, bytes(1 << 20))  # the last one is partial, the next one fails
        except OSError as err:
            assert err.errno == errno.ENOSPC, err
        os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
        os.close(fd)

    def free(self) -> None:
        self.path.unlink()


def temporary_files(root: Path) -> list[Path]:
    """Hidden files and folders (every writer's temporary names are hidden), but shard locks."""
    return [p for p in root.rglob(".*") if p.name != ".lock"]


def full_disk_message(disk: Path, path: Path) -> str:
    where, mount = re.escape(str(path)), re.escape(str(disk))
    return rf"no space left on device while writing {where}.*: free space on {mount}, then"


# ------------------------------------------------------------------------------------- checkpoints
def _update(model, optimizer, scheduler) -> None:
    for p in model.trainable_parameters().values():
        p.grad = torch.randn_like(p)
    optimizer.step()
    scheduler.step()


def _state(model, optimizer) -> dict[str, torch.Tensor]:
    weights = {k: v.detach().clone() for k, v in model.trainable_parameters().items()}
    return {**weights, **optimizer_state(model, optimizer)}


def _assert_resumes_to(run: Path, step: int, expected: dict[str, torch.Tensor]) -> None:
    model, optimizer, scheduler = trained_tiny(steps=0)
    assert ckpt.load_latest(run, model, optimizer, scheduler) == step
    got = _state(model, optimizer)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize(
    "sharded, leave",
    [(False, 0), (False, 600_000), (True, 0), (True, 1_900_000)],
    ids=["whole-no-space", "whole-full-after-the-weights", "sharded-no-space",
         "sharded-full-after-the-shards"],
)  # fmt: skip
def test_checkpoint_on_a_full_disk(disk: Path, sharded: bool, leave: int) -> None:
    """The weights take 0.55 MB, the whole-tensor optimiser state 1.1 MB, the shards 1.65 MB."""
    model, optimizer, scheduler = trained_tiny(steps=1)
    run = disk / "run"
    ckpt.save_checkpoint(run, 1, model, optimizer, scheduler, sharded=sharded)
    first = _state(model, optimizer)
    _update(model, optimizer, scheduler)
    ballast = Ballast(disk, leave)
    folder = run / "checkpoints" / "step_0000002"
    with pytest.raises(DiskFullError, match=full_disk_message(disk, folder) + ".*--resume"):
        ckpt.save_checkpoint(run, 2, model, optimizer, scheduler, sharded=sharded)
    assert [step for step, _ in ckpt.checkpoint_steps(run)] == [1] and not folder.exists()
    assert temporary_files(run) == []
    _assert_resumes_to(run, 1, first)  # the previous checkpoint is intact
    ballast.free()
    ckpt.save_checkpoint(run, 2, model, optimizer, scheduler, sharded=sharded)
    _assert_resumes_to(run, 2, _state(model, optimizer))


def test_replacing_a_model_folder_on_a_full_disk_keeps_the_old_one(disk: Path) -> None:
    model, optimizer, scheduler = trained_tiny(steps=1)
    model.save_pretrained(disk / "model")
    old = {k: v.detach().clone() for k, v in model.trainable_parameters().items()}
    _update(model, optimizer, scheduler)
    ballast = Ballast(disk, leave=300_000)
    with pytest.raises(DiskFullError, match=full_disk_message(disk, disk / "model")):
        model.save_pretrained(disk / "model")
    loaded = LexVLA.from_pretrained(disk / "model").trainable_parameters()
    assert all(torch.equal(loaded[k], v) for k, v in old.items())
    assert temporary_files(disk) == []
    ballast.free()
    model.save_pretrained(disk / "model")
    loaded = LexVLA.from_pretrained(disk / "model").trainable_parameters()
    assert all(torch.equal(loaded[k], v) for k, v in model.trainable_parameters().items())


# ---------------------------------------------------------------------------------------- training
TRAINING = ["train.steps=8", "train.save_every=2", "train.keep_checkpoints=2",
            "data.path=synthetic:32", "train.batch_size=8"]  # fmt: skip


@pytest.mark.slow
def test_training_stopped_by_a_full_disk_resumes_to_the_uninterrupted_weights(
    disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lexvla.train.loop as loop

    fit(experiment_config("tiny", overrides=TRAINING), tmp_path / "straight", progress=False)
    ballast: list[Ballast] = []
    real_save = loop.save

    def save_on_a_filling_disk(t):
        if t.state.step == 6:
            ballast.append(Ballast(disk, leave=200_000))
        real_save(t)

    monkeypatch.setattr(loop, "save", save_on_a_filling_disk)
    run = disk / "run"
    step_6 = run / "checkpoints" / "step_0000006"
    with pytest.raises(DiskFullError, match=full_disk_message(disk, step_6) + ".*--resume"):
        fit(experiment_config("tiny", overrides=TRAINING), run, progress=False)
    assert [step for step, _ in ckpt.checkpoint_steps(run)] == [2, 4]
    assert LexVLA.from_pretrained(run / "checkpoints" / "step_0000004").vocab_size > 0
    assert temporary_files(run) == [] and not (run / "model").exists()
    monkeypatch.undo()
    ballast[0].free()
    fit(experiment_config("tiny", overrides=TRAINING), run, resume=True, progress=False)
    resumed, straight = [
        load_file(str(r / "model" / "model.safetensors")) for r in (run, tmp_path / "straight")
    ]
    assert resumed.keys() == straight.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-6, atol=1e-7, msg=key)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


@pytest.mark.slow
def test_cli_train_on_a_full_disk_exits_with_status_2_and_one_line(disk: Path) -> None:
    Ballast(disk, leave=400_000)  # room for the run files, not for the first checkpoint
    args = [f"--set={item}" for item in TRAINING]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lexvla.train",
            "--preset",
            "tiny",
            "--out",
            str(disk / "run"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    message = " ".join(done.stderr.split())  # the console wraps long lines
    assert "Traceback" not in message and "no space left on device while writing" in message
    assert f"free space on {disk}" in message and "--resume" in message


# ---------------------------------------------------------------------------------- feature caches
ROWS, WIDTH = 4, 1 << 16  # a chunk of 4 rows of 64k float32 features: 1 MiB


def _encode_rows(calls: list[range], fill_at: int | None = None, disk: Path | None = None):
    ballast: list[Ballast] = []

    def encode(span: range) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(span)
        if span.start == fill_at and not ballast:
            ballast.append(Ballast(disk, leave=500_000))  # half a chunk
        rows = torch.arange(span.start, span.stop, dtype=torch.float32)[:, None]
        return rows * torch.linspace(0, 1, WIDTH), torch.ones(len(span), dtype=torch.bool)

    return encode, ballast


def test_feature_table_on_a_full_disk_keeps_its_chunks_and_resumes(
    disk: Path, tmp_path: Path
) -> None:
    calls: list[range] = []
    reference = FeatureTable.build(
        tmp_path / "ref", 14, _encode_rows(calls)[0], chunk=ROWS, dtype=torch.float32
    )
    calls.clear()
    encode, ballast = _encode_rows(calls, fill_at=8, disk=disk)
    folder = disk / "features"
    with pytest.raises(
        DiskFullError, match=full_disk_message(disk, folder / "chunk_000002.safetensors")
    ):
        FeatureTable.build(folder, 14, encode, chunk=ROWS, dtype=torch.float32)
    assert sorted(p.name for p in folder.iterdir()) == [
        "chunk_000000.safetensors",
        "chunk_000001.safetensors",
    ]
    for number in (0, 1):  # intact and readable
        chunk = load_file(str(folder / f"chunk_{number:06d}.safetensors"))["features"]
        assert torch.equal(chunk, reference.features[number * ROWS : (number + 1) * ROWS])
    ballast[0].free()
    calls.clear()
    table = FeatureTable.build(folder, 14, encode, chunk=ROWS, dtype=torch.float32)
    assert [(c.start, c.stop) for c in calls] == [(8, 12), (12, 14)]  # resumed at the failed chunk
    assert torch.equal(table.features, reference.features) and torch.equal(table.ok, reference.ok)
    assert temporary_files(folder) == []


def test_image_feature_cache_on_a_full_disk(disk: Path) -> None:
    def compute(pixels: torch.Tensor) -> torch.Tensor:
        return pixels.mean(dim=(2, 3))[:, None, :] + torch.zeros(
            len(pixels), 4096, 3
        )  # 48 KiB each

    pixels = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cache = ImageFeatureCache(disk / "cache", "fingerprint", memory=False)
    first = cache.get(pixels[:3], compute)
    ballast = Ballast(disk, leave=0)
    with pytest.raises(
        DiskFullError, match=full_disk_message(disk, disk / "cache" / "fingerprint")
    ):
        cache.get(pixels[3:], compute)
    assert temporary_files(disk / "cache") == []
    assert torch.equal(cache.get(pixels[:3], compute), first) and cache.hits == 3  # read back
    ballast.free()
    assert torch.equal(cache.get(pixels, compute), compute(pixels))
    assert torch.equal(
        ImageFeatureCache(disk / "cache", "fingerprint").get(pixels, compute), compute(pixels)
    )


# ----------------------------------------------------------------------------------- encode-corpus
def test_encode_corpus_on_a_full_disk_resumes_to_the_same_shards(
    disk: Path, corpus, tiny_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, reference = corpus
    out = disk / "lex_emb"
    ballast: list[Ballast] = []
    real_write = shards.write_shard

    def write_on_a_filling_disk(directory, name, *args, **kwargs):
        if name == "chunk-00001" and not ballast:
            ballast.append(Ballast(disk, leave=0))
        return real_write(directory, name, *args, **kwargs)

    monkeypatch.setattr(shards, "write_shard", write_on_a_filling_disk)
    with pytest.raises(DiskFullError, match=full_disk_message(disk, out / "chunk-00001.npz")):
        encode_corpus(tiny_model, images, out, **ENCODE)
    assert [s.name for s in shards.read_shard_manifest(out).shards] == ["chunk-00000"]
    shards.read_shard(out, "chunk-00000", verify=True)  # intact, checksums and all
    assert temporary_files(out) == []
    assert_no_half_written_files(out)
    monkeypatch.undo()
    ballast[0].free()
    encode_corpus(tiny_model, images, out, **ENCODE)
    assert_same_shards(out, reference)
    assert_no_half_written_files(out)


@pytest.mark.slow
def test_cli_encode_corpus_on_a_full_disk_exits_with_status_2(disk: Path, corpus) -> None:
    images, _ = corpus
    Ballast(disk, leave=0)
    command = [sys.executable, "-m", "lexvla.cli", "encode-corpus", "--model", "tiny",
               "--images", str(images), "--out", str(disk / "out")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2, done.stderr[-3000:]
    message = " ".join(done.stderr.split())  # the console wraps long lines
    assert "Traceback" not in message and f"free space on {disk}" in message
    assert f"while writing {disk / 'out'}" in message


# ------------------------------------------------------------------------------------------- index
DOCS, V = 400, 2000


def _index_shards(folder: Path) -> None:
    rng = np.random.default_rng(3)
    shards.init_shard_dir(folder, [f"w{i}" for i in range(V)], {"model": "m"})
    for number in range(3):
        nnz = rng.integers(20, 60, DOCS)
        indptr = np.concatenate([[0], np.cumsum(nnz)])
        indices = np.concatenate([np.sort(rng.choice(V, n, replace=False)) for n in nnz])
        values = rng.uniform(0.1, 1.0, len(indices)).astype(np.float16)
        meta = [{"key": f"s{number}-d{i}", "path": f"{i}.jpg"} for i in range(DOCS)]
        shards.write_shard(folder, f"shard-{number}", indptr, indices, values, meta)


def _contents(index: SparseIndex) -> list:
    return [
        (index.document(d)["key"], *(x.tolist() for x in index.vector(d)))
        for d in range(index.num_docs)
    ]


@pytest.mark.parametrize(
    "event, nth, leave",
    [("staged", 1, 100_000), ("staged", 3, 0), ("commit:written", 1, 0)],
    ids=["staging", "writing-the-generation", "publishing"],
)
def test_index_build_on_a_full_disk_keeps_the_published_index(
    disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, event: str, nth: int, leave: int
) -> None:
    source = tmp_path / "lex_emb"
    _index_shards(source)
    reference = build_index(source, tmp_path / "reference")
    out = disk / "index"
    SparseIndex.create(out, shards.read_shard_vocab(source), {"model": "m"})
    seen, ballast = [0], []

    def fill(name: str) -> None:
        seen[0] += name == event
        if name == event and seen[0] == nth:
            ballast.append(Ballast(disk, leave))

    monkeypatch.setattr(_commit, "crash_point", fill)
    with pytest.raises(DiskFullError, match=full_disk_message(disk, out)):
        build_index(source, out)
    published = SparseIndex.open(out)  # the previous (empty) generation: complete and searchable
    assert (
        published.num_docs == 0
        and published.search_ids(np.array([1]), np.array([1.0]), 5)[0].size == 0
    )
    assert temporary_files(out) == [] and not any((out / "tmp").iterdir())
    assert sorted(p.name for p in (out / "generations").iterdir()) == ["gen-000000"]
    monkeypatch.undo()
    ballast[0].free()
    resumed = build_index(source, out)
    assert _contents(resumed) == _contents(reference)


# ------------------------------------------------------------------------------------- demo report
def _demo_run(out_dir: Path, loss: float) -> SimpleNamespace:
    results = {"training": [{"loss": 2.0}, {"loss": loss}], "total_seconds": 3.0,
               "data": {"source": "synthetic", "path": "synthetic:8"}}  # fmt: skip
    return SimpleNamespace(results=results, timings={"train": 1.5}, figures={}, out_dir=out_dir)


def test_demo_report_on_a_full_disk_keeps_the_previous_report(disk: Path, tmp_path: Path) -> None:
    out = disk / "demo"
    out.mkdir()
    run_report.write(_demo_run(out, 1.5))
    before = {name: (out / name).read_bytes() for name in ("report.json", "report.html")}
    ballast = Ballast(disk, leave=0)
    with pytest.raises(DiskFullError, match=full_disk_message(disk, out / "report.json")):
        run_report.write(_demo_run(out, 0.5))
    assert {name: (out / name).read_bytes() for name in before} == before
    assert temporary_files(out) == []
    ballast.free()
    run_report.write(_demo_run(out, 0.5))
    (tmp_path / "demo").mkdir()
    run_report.write(_demo_run(tmp_path / "demo", 0.5))  # uninterrupted
    for name in before:
        assert (out / name).read_bytes() == (tmp_path / "demo" / name).read_bytes()
