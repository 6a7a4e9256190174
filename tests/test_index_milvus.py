"""MilvusIndex against a `milvus-lite server` started here: results equal SparseIndex on the same data."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from lexvla.errors import LexVLAError
from lexvla.index import SparseIndex
from test_index_helpers import random_csr

pytest.importorskip(
    "pymilvus", reason="the milvus extra is not installed: pip install 'lexvla[milvus]'"
)
pytest.importorskip(
    "milvus_lite", reason="milvus-lite is not installed: pip install 'lexvla[milvus]'"
)

from lexvla.index.milvus import MilvusIndex  # noqa: E402

V = 64
VOCAB = [f"w{i}" for i in range(V)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Milvus Lite gRPC server on a free loopback port, for the whole module."""
    exe = shutil.which("milvus-lite", path=str(Path(sys.executable).parent)) or shutil.which(
        "milvus-lite"
    )
    if exe is None:
        pytest.skip("the milvus-lite command is not installed (pip install 'lexvla[milvus]')")
    port = _free_port()
    data = tmp_path_factory.mktemp("milvus")
    log = open(data / "server.log", "wb")  # noqa: SIM115
    cmd = [
        exe,
        "server",
        "--data-dir",
        str(data / "db"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log_text = (data / "server.log").read_text()[-2000:]
                    raise RuntimeError(f"milvus-lite server did not start: {log_text}") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _corpus(n: int = 160) -> tuple:
    m = random_csr(np.random.default_rng(21), n, V, 0.12, dyadic=False, head_words=4)
    meta = [{"key": f"d{i}", "path": f"img/{i}.jpg", "caption": f"caption {i}"} for i in range(n)]
    return m, meta


def _queries(count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(3)
    out = []
    for _ in range(count):
        terms = np.sort(rng.choice(V, rng.integers(1, 10), replace=False))
        out.append((terms, rng.lognormal(size=len(terms)).astype(np.float32)))
    return out


def _same(sparse_hits: list, milvus_hits: list) -> None:
    assert [h.key for h in milvus_hits] == [h.key for h in sparse_hits]
    np.testing.assert_allclose(
        [h.score for h in milvus_hits], [h.score for h in sparse_hits], rtol=1e-5
    )
    assert [h.metadata for h in milvus_hits] == [h.metadata for h in sparse_hits]


def test_milvus_matches_sparse_index(server: str, tmp_path: Path) -> None:
    m, meta = _corpus()
    sparse = SparseIndex.create(tmp_path / "sparse", VOCAB, {"model": "t"})
    sparse.add(m.indptr, m.indices, m.data, meta)
    sparse.commit()
    milvus = MilvusIndex.create(server, VOCAB, {"model": "t"}, collection="match")
    assert milvus.add(m.indptr, m.indices, m.data, meta) == m.shape[0] and len(milvus) == m.shape[0]
    queries = _queries(12)
    for terms, weights in queries:
        for k in (1, 10, 500):  # 500 > N
            _same(sparse.search(terms, weights, k), milvus.search(terms, weights, k))
        for hit in milvus.search(terms, weights, 5, explain=True):
            assert sum(c for _, c in hit.words) == pytest.approx(hit.score, rel=1e-5)
            sparse_doc = sparse.doc_id(hit.key)
            assert hit.words == sparse.explain(
                sparse_doc, terms, weights
            )  # the same float32 products
    # deletions and re-adding a key
    gone = [f"d{i}" for i in range(0, 160, 7)] + ["missing"]
    assert milvus.delete(gone) == sparse.delete(gone) == len(gone) - 1
    sparse.commit()
    for terms, weights in queries:
        _same(sparse.search(terms, weights, 20), milvus.search(terms, weights, 20))
    # batches: same keys row by row, -1 padding in the same places
    q_indptr = np.cumsum([0] + [len(t) for t, _ in queries])
    q_terms, q_weights = (
        np.concatenate([t for t, _ in queries]),
        np.concatenate([w for _, w in queries]),
    )
    s_ids, s_scores = sparse.search_batch(q_indptr, q_terms, q_weights, k=8)
    m_ids, m_scores = milvus.search_batch(q_indptr, q_terms, q_weights, k=8)
    np.testing.assert_array_equal(m_ids == -1, s_ids == -1)
    np.testing.assert_allclose(m_scores, s_scores, rtol=1e-5)
    reopened = MilvusIndex.open(server, VOCAB, collection="match")
    assert len(reopened) == len(sparse) and reopened.model_ref == {"model": "t"}


def test_milvus_errors_and_empty_queries(server: str, caplog: pytest.LogCaptureFixture) -> None:
    m, meta = _corpus(20)
    index = MilvusIndex.create(server, VOCAB, {}, collection="errors")
    index.add(m.indptr, m.indices, m.data, meta)
    with pytest.raises(LexVLAError, match="already in the index"):
        index.add(m.indptr[:2], m.indices[: m.indptr[1]], m.data[: m.indptr[1]], meta[:1])
    with pytest.raises(LexVLAError, match="already exists"):
        MilvusIndex.create(server, VOCAB, {}, collection="errors")
    with pytest.raises(LexVLAError, match="another vocabulary"):
        MilvusIndex.open(server, VOCAB[::-1], collection="errors")
    with pytest.raises(LexVLAError, match="no Milvus collection"):
        MilvusIndex.open(server, VOCAB, collection="nothing_here")
    with pytest.raises(LexVLAError, match="outside"):
        index.search([V + 1], [1.0])
    assert index.search([3], [0.0]) == []
    assert "no active words" in caplog.text


def test_milvus_lite_local_file(tmp_path: Path) -> None:
    """A local `.db` URI: pymilvus starts Milvus Lite by itself."""
    m, meta = _corpus(30)
    index = MilvusIndex.create(str(tmp_path / "lex.db"), VOCAB, {"model": "t"})
    index.add(m.indptr, m.indices, m.data, meta)
    sparse = SparseIndex.create(tmp_path / "sparse", VOCAB, {"model": "t"})
    sparse.add(m.indptr, m.indices, m.data, meta)
    sparse.commit()
    terms, weights = _queries(1)[0]
    _same(sparse.search(terms, weights, 10), index.search(terms, weights, 10))
    index.close()
