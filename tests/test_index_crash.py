"""Crash safety and integrity of the index on disk: SIGKILL mid-build then resume, corrupt/truncated
files, pickled arrays, vocabulary / model / shard mismatches."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from helpers.index import assert_same_topk, brute_force, no_fsync, random_csr
from lexvla.errors import LexVLAError
from lexvla.index import SparseIndex, build_index, init_shard_dir, write_shard

V = 48
VOCAB = [f"w{i}" for i in range(V)]
SHARDS, ROWS = 6, 25

# Runs build_index in a child process and SIGKILLs it at the nth occurrence of a crash point.
# fsync is off: a killed process loses nothing the kernel already has (fsync matters for power loss).
KILLER = """
import os, signal, sys
import lexvla.index._commit as c
import lexvla._atomic as atomic
from lexvla.index import build_index
atomic.FSYNC = False
event, nth, seen = sys.argv[3], int(sys.argv[4]), [0]
def hook(e):
    if e == event:
        seen[0] += 1
        if seen[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
c.crash_point = hook
build_index(sys.argv[1], sys.argv[2])
"""


@pytest.fixture(autouse=True)
def _fast_writes() -> Iterator[None]:
    with no_fsync():
        yield


@pytest.fixture(scope="module")
def corpus() -> np.ndarray:
    """(SHARDS * ROWS, V) dense document weights (dyadic: exact scores, ties)."""
    rng = np.random.default_rng(11)
    return random_csr(rng, SHARDS * ROWS, V, 0.1, dyadic=True, head_words=3).toarray()


def _write_shards(directory: Path, dense: np.ndarray, shards: range) -> None:
    init_shard_dir(directory, VOCAB, {"model": "m"})
    for s in shards:
        rows = dense[s * ROWS : (s + 1) * ROWS]
        indptr = np.concatenate([[0], np.cumsum((rows > 0).sum(1))])
        indices = np.concatenate([np.flatnonzero(r) for r in rows])
        meta = [{"key": f"d{s * ROWS + i}", "path": f"{s}/{i}.jpg"} for i in range(ROWS)]
        write_shard(directory, f"shard-{s}", indptr, indices, rows[rows > 0], meta)


def _contents(index: SparseIndex) -> tuple[list[str], list[tuple[list[int], list[float]]]]:
    keys = [index.document(d)["key"] for d in range(index.num_docs)]
    return keys, [tuple(x.tolist() for x in index.vector(d)) for d in range(index.num_docs)]


def _check_searches(index: SparseIndex, dense: np.ndarray) -> None:
    rng = np.random.default_rng(5)
    assert index.num_docs == len(dense)
    for _ in range(10):
        terms = np.sort(rng.choice(V, 6, replace=False))
        weights = (rng.integers(1, 9, 6) / 8).astype(np.float32)
        ref = brute_force(dense, np.zeros(len(dense), bool), terms, weights, 15)
        assert_same_topk(*index.search_ids(terms, weights, 15), ref, exact=True)


def _kill(shards: Path, out: Path, event: str, nth: int) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(shards), str(out), event, str(nth)], capture_output=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]


@pytest.mark.parametrize(
    "kills",
    [
        [("staged", 2)],
        [("commit:written", 1)],
        [("commit:published", 1)],
        [("staged", 1), ("staged", 2), ("commit:written", 1)],  # killed three times in a row
    ],
    ids=["mid-staging", "before-publish", "after-publish", "three-kills"],
)
def test_killed_build_resumes_to_the_same_index(
    tmp_path: Path, corpus: np.ndarray, kills: list
) -> None:
    shards, out = tmp_path / "lex_emb", tmp_path / "index"
    _write_shards(shards, corpus, range(2))
    build_index(shards, out)  # the previously published index: shards 0-1
    _write_shards(shards, corpus, range(2, SHARDS))
    reference = build_index(shards, tmp_path / "reference")  # uninterrupted, all shards
    early_reader = SparseIndex.open(out)
    for event, nth in kills:
        _kill(shards, out, event, nth)
        during = SparseIndex.open(out)  # still a complete, searchable index
        published = event == "commit:published"
        _check_searches(during, corpus[: (SHARDS if published else 2) * ROWS])
        if not published:
            assert during.pending() > 0
    if kills[-1][0] == "commit:published":
        assert any((out / "pending").iterdir())  # applied changes left behind by the crash...
    resumed = build_index(shards, out)
    assert not any((out / "pending").iterdir()) and not any((out / "tmp").iterdir())  # ...discarded
    assert _contents(resumed) == _contents(
        reference
    )  # nothing lost, nothing duplicated, same order
    assert set(resumed.manifest["sources"]) == {f"shard-{s}" for s in range(SHARDS)}
    _check_searches(resumed, corpus)
    _check_searches(early_reader, corpus[: 2 * ROWS])  # readers keep their generation
    assert build_index(shards, out).generation == resumed.generation  # nothing left to do


def _built(tmp_path: Path, corpus: np.ndarray) -> Path:
    _write_shards(tmp_path / "s", corpus, range(2))
    build_index(tmp_path / "s", tmp_path / "i")
    return _current(tmp_path / "i")


def _current(root: Path) -> Path:
    return root / "generations" / (root / "CURRENT").read_text().strip()


def test_corrupt_file_is_detected_by_checksum(tmp_path: Path, corpus: np.ndarray) -> None:
    gen = _built(tmp_path, corpus)
    f = gen / "doc_weights.npy"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x40  # same size, one weight changed
    f.write_bytes(bytes(data))
    with pytest.raises(LexVLAError, match=r"doc_weights\.npy does not match its sha256"):
        SparseIndex.open(tmp_path / "i")
    SparseIndex.open(
        tmp_path / "i", verify=False
    )  # documented: only the checksum sees a flipped weight


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("name", ["post_docs.npy", "doc_terms.npy", "docs.jsonl", "manifest.json"])
def test_truncated_file_is_refused(
    tmp_path: Path, corpus: np.ndarray, name: str, verify: bool
) -> None:
    f = _built(tmp_path, corpus) / name
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(LexVLAError, match=name.replace(".", r"\.")):
        SparseIndex.open(tmp_path / "i", verify=verify)


def _replace_array(gen: Path, name: str, array: np.ndarray) -> None:
    """Swap an array file behind the writer's back and make the manifest agree (size + checksum)."""
    np.save(gen / name, array, allow_pickle=True)
    manifest = json.loads((gen / "manifest.json").read_text())
    entry = manifest["files"][name]
    entry["bytes"] = (gen / name).stat().st_size
    entry["sha256"] = hashlib.sha256((gen / name).read_bytes()).hexdigest()
    (gen / "manifest.json").write_text(json.dumps(manifest))


def test_pickled_and_out_of_range_arrays_are_refused(tmp_path: Path, corpus: np.ndarray) -> None:
    gen = _built(tmp_path, corpus)
    n = len(np.load(gen / "deleted.npy"))
    _replace_array(gen, "deleted.npy", np.array([None] * n, dtype=object))
    with pytest.raises(LexVLAError, match="pickled"):
        SparseIndex.open(tmp_path / "i")
    _replace_array(gen, "deleted.npy", np.zeros(n, bool))
    post_docs = np.load(gen / "post_docs.npy")
    post_docs[0] = 10**6  # a document id out of range: with a valid checksum, still refused
    _replace_array(gen, "post_docs.npy", post_docs)
    with pytest.raises(LexVLAError, match="post_docs"):
        SparseIndex.open(tmp_path / "i")


def test_build_refuses_other_vocab_model_or_changed_shard(
    tmp_path: Path, corpus: np.ndarray
) -> None:
    _built(tmp_path, corpus)
    other = tmp_path / "other"
    init_shard_dir(other, VOCAB[::-1], {"model": "m"})
    with pytest.raises(LexVLAError, match="another vocabulary"):
        build_index(other, tmp_path / "i")
    init_shard_dir(tmp_path / "m2", VOCAB, {"model": "m2"})
    with pytest.raises(LexVLAError, match="check_model=False"):
        build_index(tmp_path / "m2", tmp_path / "i")
    build_index(tmp_path / "m2", tmp_path / "i", check_model=False)  # empty: nothing added
    rows = corpus[:ROWS]
    indptr = np.concatenate([[0], np.cumsum((rows > 0).sum(1))])
    meta = [{"key": f"d{i}", "path": "x"} for i in range(ROWS)]
    write_shard(
        tmp_path / "s",
        "shard-0",
        indptr,
        np.concatenate([np.flatnonzero(r) for r in rows]),
        rows[rows > 0] * 2,
        meta,
        overwrite=True,
    )
    with pytest.raises(LexVLAError, match="changed since it was indexed"):
        build_index(tmp_path / "s", tmp_path / "i")
    with pytest.raises(LexVLAError, match="not a sparse index"):
        SparseIndex.open(tmp_path / "nowhere")
    with pytest.raises(LexVLAError, match="already holds an index"):
        SparseIndex.create(tmp_path / "i", VOCAB, {})
