"""Property-based tests (hypothesis) of what reads untrusted bytes or values: the CSR canonicaliser of
the sparse formats, the shard and index readers under random corruption, and the config parser.

Properties: the output equals a naive reference, or the input is refused with a LexVLAError; never any
other exception (and never a crash of the numba kernels, which index memory with the ids they get).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from helpers.index import no_fsync
from lexvla.config import ExperimentConfig, apply_overrides, from_dict, to_dict
from lexvla.errors import LexVLAError
from lexvla.index import SparseIndex, build_index, init_shard_dir, read_shard, write_shard
from lexvla.index._csr import canonical_csr

V = 12
VOCAB = [f"w{i}" for i in range(V)]
EXAMPLES = int(os.environ.get("LEXVLA_HYPOTHESIS_EXAMPLES", "60"))  # raise it for a deeper search
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

entries = st.tuples(
    st.integers(-2, V + 1),  # word ids, sometimes out of range
    st.one_of(
        st.floats(width=32, allow_nan=True, allow_infinity=True),
        st.sampled_from([0.0, -0.0, 0.5, 1.0, 2.0]),
    ),
)


def _naive_canonical(rows: list[list[tuple[int, float]]]) -> list[list[tuple[int, float]]] | None:
    """The canonical rows (sorted by id, zeros dropped), or None when the batch must be refused."""
    out = []
    for row in rows:
        ids = [i for i, _ in row]
        values = [np.float32(v) for _, v in row]
        if any(not 0 <= i < V for i in ids) or any(not math.isfinite(v) or v < 0 for v in values):
            return None
        if len(set(ids)) != len(ids):
            return None
        out.append(sorted((i, float(v)) for i, v in zip(ids, values) if v > 0))
    return out


@SETTINGS
@given(rows=st.lists(st.lists(entries, max_size=6), max_size=6))
def test_canonical_csr_equals_a_naive_reference(rows: list[list[tuple[int, float]]]) -> None:
    indptr = np.cumsum([0] + [len(r) for r in rows])
    indices = np.array([i for r in rows for i, _ in r], np.int64)
    values = np.array([v for r in rows for _, v in r], np.float32)
    expected = _naive_canonical(rows)
    try:
        ip, ix, vals = canonical_csr(indptr, indices, values, V, "batch")
    except LexVLAError:
        assert expected is None, rows
        return
    assert expected is not None, rows
    got = [
        list(zip(ix[ip[r] : ip[r + 1]].tolist(), vals[ip[r] : ip[r + 1]].tolist()))
        for r in range(len(rows))
    ]
    assert got == expected
    assert ip.dtype == np.int64 and ix.dtype == np.int32 and vals.dtype == np.float32


@SETTINGS
@given(
    indptr=st.lists(st.integers(-3, 8), min_size=0, max_size=5),
    nnz=st.integers(0, 6),
)
def test_canonical_csr_refuses_bad_row_pointers(indptr: list[int], nnz: int) -> None:
    valid = bool(indptr) and indptr[0] == 0 and indptr[-1] == nnz
    valid = valid and all(a <= b for a, b in zip(indptr, indptr[1:]))
    try:
        ip, _, _ = canonical_csr(indptr, np.arange(nnz) % V, np.ones(nnz), V, "batch")
    except LexVLAError:
        assert not valid
        return
    assert valid and ip.tolist() == indptr


def _mutate(data: bytes, kind: str, position: int, byte: int) -> bytes:
    if not data:
        return b"x"
    position %= len(data)
    if kind == "flip":
        return data[:position] + bytes([data[position] ^ byte]) + data[position + 1 :]
    if kind == "truncate":
        return data[:position]
    return data + bytes([byte]) * (position % 7 + 1)  # appended junk


corruption = st.tuples(
    st.sampled_from(["flip", "truncate", "append"]), st.integers(0, 10**6), st.integers(1, 255)
)


def _shards(root: Path) -> None:
    init_shard_dir(root, VOCAB, {"model": "m"})
    meta = [{"key": f"d{i}", "path": f"{i}.png", "caption": f"doc {i} ü"} for i in range(4)]
    write_shard(root, "s0", [0, 2, 3, 3, 5], [1, 4, 2, 0, 11], [0.5, 1, 2, 0.25, 3], meta)


@SETTINGS
@given(
    name=st.sampled_from(["s0.npz", "s0.jsonl", "manifest.json", "vocab.json"]),
    change=corruption,
    verify=st.booleans(),
)
# Found by a deeper search: a flipped bit in a zip header's version field (zipfile: NotImplementedError).
@example(name="s0.npz", change=("flip", 897, 64), verify=False)
def test_shard_reader_refuses_or_reads_consistent_data(name: str, change, verify: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp, no_fsync():
        root = Path(tmp)
        _shards(root)
        original = read_shard(root, "s0")
        path = root / name
        path.write_bytes(_mutate(path.read_bytes(), *change))
        try:
            shard = read_shard(root, "s0", verify=verify)
        except LexVLAError:
            return
        # Accepted: a canonical shard of the manifest's size (e.g. a flipped weight when not
        # verifying, or a manifest change JSON ignores, like one whitespace for another).
        assert shard.num_rows == original.num_rows and len(shard.metadata) == shard.num_rows
        assert shard.indices.dtype == np.int32 and shard.indices.max(initial=0) < V
        if verify and name in ("s0.npz", "s0.jsonl"):
            raise AssertionError(f"a changed {name} passed the checksum")


def _index_files(gen: Path) -> list[str]:
    return sorted(p.name for p in gen.iterdir())


@SETTINGS
@given(file_number=st.integers(0, 100), change=corruption, verify=st.booleans())
def test_index_reader_refuses_or_searches_safely(file_number: int, change, verify: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp, no_fsync():
        root = Path(tmp)
        _shards(root / "lex")
        build_index(root / "lex", root / "index", dense_fraction=0.5)
        gen = root / "index" / "generations" / (root / "index" / "CURRENT").read_text().strip()
        name = _index_files(gen)[file_number % len(_index_files(gen))]
        data = (gen / name).read_bytes()
        (gen / name).write_bytes(_mutate(data, *change))
        changed = (gen / name).read_bytes() != data
        try:
            index = SparseIndex.open(root / "index", verify=verify)
        except LexVLAError:
            return
        assert not (verify and changed and name != "manifest.json"), f"{name} passed the checksum"
        for terms in ([0], [1, 4], list(range(V))):  # reading never fails otherwise
            try:
                ids, scores = index.search_ids(terms, np.ones(len(terms)), 3)
                assert len(ids) == len(scores) <= 3 and set(ids.tolist()) <= set(range(4))
            except LexVLAError:
                pass
        for doc in range(index.num_docs):
            try:
                assert isinstance(index.document(doc), dict)
                index.doc_id(f"d{doc}")
            except LexVLAError:
                pass


@pytest.mark.parametrize("key", ["vocab_sha256", "vocab_size", "num_dense_terms", "files"])
def test_index_reader_refuses_a_manifest_missing_a_key(tmp_path: Path, key: str) -> None:
    # Found by the property above: one flipped bit renamed "vocab_sha256" and the reader raised
    # KeyError instead of refusing the index.
    with no_fsync():
        _shards(tmp_path / "lex")
        build_index(tmp_path / "lex", tmp_path / "index", dense_fraction=0.5)
    gen = tmp_path / "index" / "generations" / (tmp_path / "index" / "CURRENT").read_text().strip()
    manifest = json.loads((gen / "manifest.json").read_text())
    manifest[key + "_"] = manifest.pop(key)
    (gen / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LexVLAError, match="manifest.json"):
        SparseIndex.open(tmp_path / "index", verify=False)


# ---------------------------------------------------------------------------------- config parser
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=8,
)  # fmt: skip


def _paths(node: dict, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for key, value in node.items():
        found.append((*prefix, key))
        if isinstance(value, dict) and key != "arch":
            found.extend(_paths(value, (*prefix, key)))
    return found


PATHS = _paths(to_dict(ExperimentConfig()))


def _holds(full: object, given: object) -> bool:
    """`full` holds every value of `given` (a section given as a partial dict keeps defaults)."""
    if isinstance(given, dict) and isinstance(full, dict):
        return all(k in full and _holds(full[k], v) for k, v in given.items())
    return full == given


@SETTINGS
@given(path=st.sampled_from(PATHS), value=json_values, extra_key=st.booleans())
def test_from_dict_accepts_right_types_and_refuses_the_rest(path, value, extra_key: bool) -> None:
    data = to_dict(ExperimentConfig())
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1] + ("_typo" if extra_key else "")] = value
    try:
        cfg = from_dict(ExperimentConfig, json.loads(json.dumps(data)))
    except LexVLAError:
        return
    assert not extra_key
    assert _holds(to_dict(cfg), data)  # stored as given (ints as floats, lists as tuples)
    assert from_dict(ExperimentConfig, to_dict(cfg)) == cfg


@SETTINGS
@given(overrides=st.lists(st.text(max_size=30), max_size=3))
def test_apply_overrides_never_fails_unclearly(overrides: list[str]) -> None:
    try:
        cfg = apply_overrides(ExperimentConfig(), overrides)
    except LexVLAError:
        return
    assert from_dict(ExperimentConfig, to_dict(cfg)) == cfg
