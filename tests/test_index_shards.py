"""Corpus shard format: round trip, manifest, validation, corruption, pickles, vocabulary mismatch."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.index import no_fsync, random_csr
from lexvla.errors import LexVLAError
from lexvla.index import (
    init_shard_dir,
    iter_shards,
    read_shard,
    read_shard_manifest,
    read_shard_vocab,
    shard_finished,
    vocab_hash,
    write_shard,
)

VOCAB = [f"w{i}" for i in range(32)]


def _meta(n: int, start: int = 0) -> list[dict]:
    return [
        {"key": f"k{i}", "path": f"img/{i}.jpg", "caption": f"c {i}"}
        for i in range(start, start + n)
    ]


def _write(directory: Path, name: str, m: sp.csr_matrix, start: int = 0) -> None:
    write_shard(directory, name, m.indptr, m.indices, m.data, _meta(m.shape[0], start))


def test_round_trip_and_manifest(tmp_path: Path) -> None:
    d = tmp_path / "lex_emb"
    init_shard_dir(d, VOCAB, {"model": "runs/x"})
    m = random_csr(np.random.default_rng(0), 25, 32, 0.2, dyadic=False)
    _write(d, "part-0", m)
    assert shard_finished(d, "part-0") and not shard_finished(d, "part-1")
    shard = read_shard(d, "part-0")
    np.testing.assert_array_equal(shard.indptr, m.indptr)
    np.testing.assert_array_equal(shard.indices, m.indices)
    np.testing.assert_array_equal(shard.values, m.data.astype(np.float16))
    assert shard.values.dtype == np.float16 and shard.indices.dtype == np.int32
    assert shard.indptr.dtype == np.int64 and shard.metadata == _meta(25)
    manifest = read_shard_manifest(d)
    assert manifest.vocab_sha256 == vocab_hash(VOCAB) and manifest.model == {"model": "runs/x"}
    info = manifest.get("part-0")
    assert (info.rows, info.nnz) == (25, m.nnz)
    assert info.npz_sha256 == hashlib.sha256((d / "part-0.npz").read_bytes()).hexdigest()
    assert read_shard_vocab(d) == VOCAB
    with np.load(d / "part-0.npz", allow_pickle=False) as npz:  # the documented layout
        assert sorted(npz.files) == ["indices", "indptr", "values", "vocab_size"]
        assert int(npz["vocab_size"]) == 32
    lines = (d / "part-0.jsonl").read_text().splitlines()
    assert [json.loads(x)["key"] for x in lines] == [f"k{i}" for i in range(25)]


def test_writer_canonicalises_rows(tmp_path: Path) -> None:
    d = tmp_path / "s"
    init_shard_dir(d, VOCAB, {})
    # unsorted row, an explicit zero and a weight that underflows float16
    write_shard(d, "a", [0, 3, 4], [9, 2, 5, 7], [0.5, 0.25, 0.0, 1e-9], _meta(2))
    shard = read_shard(d, "a")
    np.testing.assert_array_equal(shard.indptr, [0, 2, 2])
    np.testing.assert_array_equal(shard.indices, [2, 9])
    np.testing.assert_array_equal(shard.values, np.array([0.25, 0.5], np.float16))


def test_finished_shard_is_not_overwritten_silently(tmp_path: Path) -> None:
    d = tmp_path / "s"
    init_shard_dir(d, VOCAB, {})
    m = random_csr(np.random.default_rng(1), 4, 32, 0.3, dyadic=True)
    _write(d, "a", m)
    with pytest.raises(LexVLAError, match="already finished"):
        _write(d, "a", m)
    write_shard(d, "a", m.indptr, m.indices, m.data * 2, _meta(4), overwrite=True)
    assert len(read_shard_manifest(d).shards) == 1


def test_directory_refuses_other_vocab_or_model(tmp_path: Path) -> None:
    d = tmp_path / "s"
    init_shard_dir(d, VOCAB, {"model": "a"})
    init_shard_dir(d, VOCAB, {"model": "a"})  # same: fine (resume)
    with pytest.raises(LexVLAError, match="another vocabulary"):
        init_shard_dir(d, VOCAB[::-1], {"model": "a"})
    with pytest.raises(LexVLAError, match="model"):
        init_shard_dir(d, VOCAB, {"model": "b"})
    with pytest.raises(LexVLAError, match="unique"):
        init_shard_dir(tmp_path / "t", ["a", "b", "a"], {})


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([0, 1], [40], [1.0], _meta(1)), "outside"),
        (([0, 1], [3], [np.inf], _meta(1)), "negative, NaN or infinite"),
        (([0, 1], [3], [1e6], _meta(1)), "negative, NaN or infinite"),  # overflows float16
        (([0, 2], [3, 3], [1.0, 1.0], _meta(1)), "twice"),
        (([0, 2, 1], [3, 4], [1.0, 1.0], _meta(2)), "row pointer"),
        (([0, 1], [3], [1.0], _meta(2)), "metadata"),
        (([0, 1], [3], [1.0], [{"key": "a"}]), "path"),
    ],
)
def test_writer_validates(tmp_path: Path, args: tuple, match: str) -> None:
    init_shard_dir(tmp_path, VOCAB, {})
    with pytest.raises(LexVLAError, match=match):
        write_shard(tmp_path, "bad", *args)
    assert not shard_finished(tmp_path, "bad")


def test_reader_detects_corruption_and_truncation(tmp_path: Path) -> None:
    init_shard_dir(tmp_path, VOCAB, {})
    _write(tmp_path, "a", random_csr(np.random.default_rng(2), 10, 32, 0.3, dyadic=True))
    jsonl = tmp_path / "a.jsonl"
    original = jsonl.read_bytes()
    jsonl.write_bytes(original.replace(b"k3", b"k9"))
    with pytest.raises(LexVLAError, match=r"a\.jsonl does not match its sha256"):
        read_shard(tmp_path, "a")
    jsonl.write_bytes(original)
    npz = tmp_path / "a.npz"
    npz.write_bytes(npz.read_bytes()[:-20])
    with pytest.raises(LexVLAError, match=r"a\.npz"):
        read_shard(tmp_path, "a")
    with pytest.raises(LexVLAError, match=r"a\.npz"):  # even without checksums
        read_shard(tmp_path, "a", verify=False)
    with pytest.raises(LexVLAError, match="not finished"):
        read_shard(tmp_path, "b")


def _sneak(directory: Path, name: str, **arrays: np.ndarray) -> None:
    """Replace a shard's npz behind the writer's back and fix its checksum in the manifest."""
    np.savez(directory / f"{name}.npz", **arrays)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["shards"][0]["npz_sha256"] = hashlib.sha256(
        (directory / f"{name}.npz").read_bytes()
    ).hexdigest()
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_reader_refuses_pickled_objects_and_wrong_dtypes(tmp_path: Path) -> None:
    init_shard_dir(tmp_path, VOCAB, {})
    write_shard(tmp_path, "a", [0, 1], [3], [1.0], _meta(1))
    good = {
        "indptr": np.array([0, 1]),
        "indices": np.array([3], np.int32),
        "vocab_size": np.int64(32),
    }
    _sneak(tmp_path, "a", values=np.array([{"x": 1}], dtype=object), **good)
    with pytest.raises(LexVLAError, match="pickled"):
        read_shard(tmp_path, "a")
    _sneak(tmp_path, "a", values=np.array([1.0], np.float64), **good)
    with pytest.raises(LexVLAError, match="float16"):
        read_shard(tmp_path, "a")
    _sneak(
        tmp_path, "a", values=np.array([1.0], np.float16), **{**good, "vocab_size": np.int64(33)}
    )
    with pytest.raises(LexVLAError, match="vocab_size"):
        read_shard(tmp_path, "a")


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(
        st.dictionaries(
            st.integers(0, 19),
            st.floats(min_value=2.0**-24, max_value=60000, width=16),
            max_size=8,
        ),
        max_size=12,
    ),
    captions=st.lists(st.text(max_size=20), min_size=12, max_size=12),
    shards=st.integers(1, 3),
)
def test_property_round_trip(
    rows: list[dict[int, float]], captions: list[str], shards: int
) -> None:
    """Any batch of sparse float16 rows survives write -> read exactly, split over several shards."""
    vocab = [f"v{i}" for i in range(20)]
    indptr = np.cumsum([0] + [len(r) for r in rows])
    indices = np.array([t for r in rows for t in r], np.int64)  # dict order: unsorted rows
    values = np.array([v for r in rows for v in r.values()], np.float16)
    meta = [{"key": f"k{i}", "path": f"p/{i}", "caption": captions[i]} for i in range(len(rows))]
    bounds = np.linspace(0, len(rows), shards + 1).astype(int)
    with tempfile.TemporaryDirectory() as tmp, no_fsync():
        init_shard_dir(tmp, vocab, {"model": "m"})
        for s in range(shards):
            a, b = bounds[s], bounds[s + 1]
            part = slice(indptr[a], indptr[b])
            write_shard(
                tmp, f"s{s}", indptr[a : b + 1] - indptr[a], indices[part], values[part], meta[a:b]
            )
        back = list(iter_shards(tmp))
        assert [s.name for s in back] == [f"s{s}" for s in range(shards)]
        assert [m for s in back for m in s.metadata] == meta
        got = [
            dict(
                zip(
                    s.indices[s.indptr[i] : s.indptr[i + 1]].tolist(),
                    s.values[s.indptr[i] : s.indptr[i + 1]].tolist(),
                )
            )
            for s in back
            for i in range(s.num_rows)
        ]
        assert got == [{t: float(np.float16(v)) for t, v in r.items()} for r in rows]
        for s in back:
            assert all(
                (np.diff(s.indices[s.indptr[i] : s.indptr[i + 1]]) > 0).all()
                for i in range(s.num_rows)
            )
