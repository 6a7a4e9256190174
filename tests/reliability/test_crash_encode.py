"""Crash safety of corpus encoding: `encode_corpus` SIGKILLed at random points (before or after any
file is moved into place, mid-batch, or by a timer on the real `lexvla encode-corpus` command), then
resumed, gives exactly the shards of an uninterrupted run: no document lost or duplicated, and no
half-written file where a reader looks.

(Training and index building have their own SIGKILL tests: tests/test_train_loop.py and
tests/test_index_crash.py.)
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.encode import ENCODE, assert_no_half_written_files, assert_same_shards, corpus
from helpers.index import no_fsync
from lexvla.index import build_index, read_shard_manifest

__all__ = ["corpus"]  # a fixture used here

# Runs encode_corpus in a child process and SIGKILLs it at the nth occurrence of an event:
# "before-replace" / "after-replace" (every atomic file publish goes through os.replace) or "batch"
# (a forward pass). fsync is off: a SIGKILL loses nothing the kernel already has.
KILLER = """
import os, signal, sys
import lexvla._atomic as lexvla_atomic
import lexvla.search.encode as encode
from lexvla import create_model
lexvla_atomic.FSYNC = False
images, out, event, nth = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
seen = [0]
def hit(name):
    if name == event:
        seen[0] += 1
        if seen[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
real_replace, real_encode_batch = os.replace, encode._encode_batch
def replace(src, dst):
    hit("before-replace")
    real_replace(src, dst)
    hit("after-replace")
def encode_batch(model, pixels, *rest):
    hit("batch")
    return real_encode_batch(model, pixels, *rest)
os.replace, encode._encode_batch = replace, encode_batch
encode.encode_corpus(create_model("tiny"), images, out, batch_size=3, chunk_size=5,
                     progress=False, model_name="tiny")
"""
EVENTS = {"before-replace": 15, "after-replace": 15, "batch": 5}  # occurrences in a full run


def _kill(images: Path, out: Path, event: str, nth: int) -> bool:
    """Run the killer; True if it was killed (False: the run finished before the nth event)."""
    done = subprocess.run(
        [sys.executable, "-c", KILLER, str(images), str(out), event, str(nth)],
        capture_output=True,
        timeout=180,
    )
    assert done.returncode in (0, -signal.SIGKILL), done.stderr.decode()[-2000:]
    return done.returncode == -signal.SIGKILL


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_encode_killed_at_random_points_resumes_to_the_same_shards(
    corpus, tiny_model, tmp_path: Path, seed: int
) -> None:
    images, reference = corpus
    out = tmp_path / "out"
    rng = random.Random(seed)
    kills = []
    for _ in range(3):  # three kills in a row, each resuming what the last one left
        event = rng.choice(sorted(EVENTS))
        nth = rng.randint(1, EVENTS[event] // 2)  # early enough to fall inside what is left
        kills.append((event, nth, _kill(images, out, event, nth)))
        if (out / "manifest.json").exists():
            assert_no_half_written_files(out)
    assert any(killed for *_, killed in kills), kills
    from lexvla.search import encode_corpus

    with no_fsync():
        report = encode_corpus(tiny_model, images, out, **ENCODE)
    assert len(report["encoded"]) + len(report["skipped"]) == 3
    assert_same_shards(out, reference)
    assert_no_half_written_files(out)
    assert {p.stem for p in out.glob("*.npz")} == {s.name for s in read_shard_manifest(out).shards}
    with no_fsync():  # and the index built from it is the reference's
        resumed, clean = build_index(out, tmp_path / "i1"), build_index(reference, tmp_path / "i2")
    assert [resumed.document(d)["key"] for d in range(resumed.num_docs)] == [
        clean.document(d)["key"] for d in range(clean.num_docs)
    ]


@pytest.mark.slow
def test_cli_encode_killed_by_a_timer_resumes(corpus, tmp_path: Path) -> None:
    """The real `lexvla encode-corpus`, killed at a random moment once it has started writing."""
    images, reference = corpus
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "lexvla.cli", "encode-corpus", "--model", "tiny", "--images",
        str(images), "--out", str(out), "--batch-size", "3", "--chunk-size", "5",
    ]  # fmt: skip
    rng = random.Random(7)
    for _ in range(2):
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not (out / "manifest.json").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "encode-corpus did not start"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if (out / "manifest.json").exists():
            assert_no_half_written_files(out)
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_shards(out, reference)
    assert_no_half_written_files(out)
