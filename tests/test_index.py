"""SparseIndex: search equals dense brute force; explanations; add/delete/commit/reopen; export; errors."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.index import assert_same_topk, brute_force, no_fsync, random_csr
from lexvla.errors import LexVLAError
from lexvla.index import SparseIndex, export_jsonl

V = 64


def _vocab(n: int = V) -> list[str]:
    return [f"w{i}" for i in range(n)]


def _meta(start: int, n: int) -> list[dict]:
    return [{"key": f"d{i}", "path": f"img/{i}.jpg"} for i in range(start, start + n)]


def _index(tmp: Path, docs: sp.csr_matrix, dense_fraction: float | None = 0.125) -> SparseIndex:
    index = SparseIndex.create(
        tmp / "index", _vocab(docs.shape[1]), {"model": "test"}, dense_fraction=dense_fraction
    )
    index.add(docs.indptr, docs.indices, docs.data, _meta(0, docs.shape[0]))
    assert index.commit()
    return index


def _queries(rng: np.random.Generator, n: int, dyadic: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for _ in range(n):
        terms = np.sort(rng.choice(V, size=rng.integers(1, 12), replace=False))
        weights = rng.integers(1, 9, len(terms)) / 8.0 if dyadic else rng.lognormal(size=len(terms))
        out.append((terms, weights.astype(np.float32)))
    return out


@pytest.mark.parametrize("dense_fraction", [None, 0.125, 0.3])
@pytest.mark.parametrize("dyadic", [True, False])
def test_search_equals_brute_force(
    tmp_path: Path, dyadic: bool, dense_fraction: float | None
) -> None:
    rng = np.random.default_rng(1)
    M = random_csr(rng, 300, V, 0.08, dyadic, head_words=4)
    M = sp.vstack([M, M[:40]]).tocsr()  # exact duplicates: ties broken by the lower doc id
    M.indptr = M.indptr.astype(np.int64)
    index = _index(tmp_path, M, dense_fraction)
    dense, deleted = M.toarray(), np.zeros(M.shape[0], bool)
    if dense_fraction is not None:
        assert index.manifest["num_dense_terms"] > 0  # both layouts exercised
    # dyadic weights are exact float16: search reads float16 weights; log-normal float32 ones: float32
    assert index.manifest["search_weights_dtype"] == ("float16" if dyadic else "float32")
    for k in (1, 10, 1000):  # 1000 > N
        for terms, weights in _queries(rng, 20, dyadic):
            ids, scores = index.search_ids(terms, weights, k)
            assert_same_topk(
                ids, scores, brute_force(dense, deleted, terms, weights, k), exact=dyadic
            )


def test_search_batch_equals_single(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    M = random_csr(rng, 200, V, 0.1, dyadic=True)
    index = _index(tmp_path, M)
    queries = _queries(rng, 25, dyadic=True) + [(np.zeros(0, np.int64), np.zeros(0, np.float32))]
    q_indptr = np.cumsum([0] + [len(t) for t, _ in queries])
    q_terms = np.concatenate([t for t, _ in queries])
    q_weights = np.concatenate([w for _, w in queries])
    for threads in (1, 2):
        ids, scores = index.search_batch(q_indptr, q_terms, q_weights, k=7, num_threads=threads)
        assert ids.shape == scores.shape == (len(queries), 7)
        for row, (terms, weights) in enumerate(queries):
            one_ids, one_scores = index.search_ids(terms, weights, 7) if len(terms) else ([], [])
            n = len(one_ids)
            np.testing.assert_array_equal(ids[row, :n], one_ids)
            np.testing.assert_array_equal(scores[row, :n], one_scores)
            assert (ids[row, n:] == -1).all() and (scores[row, n:] == 0).all()


def test_unsorted_float64_queries_are_canonicalised(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    M = random_csr(rng, 100, V, 0.1, dyadic=False)
    index = _index(tmp_path, M)
    terms, weights = np.array([40, 3, 17, 9]), np.array([0.5, 1.5, 0.0, 2.0])
    order = np.argsort(terms)
    a = index.search_ids(terms, weights, 10)
    b = index.search_ids(terms[order].astype(np.int32), weights[order].astype(np.float32), 10)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_explanations_sum_to_score(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    M = random_csr(rng, 150, V, 0.15, dyadic=False)
    index = _index(tmp_path, M)
    for terms, weights in _queries(rng, 10, dyadic=False):
        hits = index.search(terms, weights, k=5, explain=True)
        assert hits
        for hit in hits:
            assert hit.key == f"d{hit.doc}" and hit.metadata["path"] == f"img/{hit.doc}.jpg"
            contributions = [c for _, c in hit.words]
            assert contributions == sorted(contributions, reverse=True)
            assert sum(contributions) == pytest.approx(hit.score, rel=1e-5)
            for word, c in hit.words:  # each contribution is q_w * w_doc of that word
                t = int(word[1:])
                expected = weights[list(terms).index(t)] * M[hit.doc, t]
                assert c == pytest.approx(float(expected), rel=1e-6)
            assert index.explain(hit.doc, terms, weights) == hit.words


def test_empty_query_and_empty_index(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    index = SparseIndex.create(tmp_path / "i", _vocab(), {"model": "x"})
    assert index.search([1, 2], [0.5, 0.5]) == []  # empty index
    M = random_csr(np.random.default_rng(5), 20, V, 0.2, dyadic=True)
    index.add(M.indptr, M.indices, M.data, _meta(0, 20))
    index.commit()
    with caplog.at_level(logging.WARNING, logger="lexvla.index"):
        assert index.search([3, 4], [0.0, 0.0]) == []
        assert index.search([], []) == []
    assert "no active words" in caplog.text
    unmatched = [t for t in range(V) if M[:, t].nnz == 0]
    if unmatched:  # a word no document has: an empty posting list
        assert index.search(unmatched[:1], [1.0]) == []


def test_add_delete_incremental_and_reopen(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    M = random_csr(rng, 240, V, 0.1, dyadic=True, head_words=3)
    index = SparseIndex.create(tmp_path / "i", _vocab(), {"model": "x"}, dense_fraction=0.2)
    reader = SparseIndex.open(tmp_path / "i")
    for start in range(0, 240, 80):  # three incremental commits
        part = M[start : start + 80]
        assert index.add(part.indptr, part.indices, part.data, _meta(start, 80)) == 80
        assert len(index) == start  # staged, not yet visible
        assert index.commit()
    assert len(index) == 240 and len(reader) == 0  # an open reader keeps its generation...
    assert reader.refresh() and len(reader) == 240  # ...until it refreshes
    gone = ["d3", "d100", "d239"]
    assert index.delete(gone + ["missing"]) == 3
    assert index.commit()
    assert index.delete(["d3"]) == 0  # already deleted
    deleted = np.zeros(240, bool)
    deleted[[3, 100, 239]] = True
    reopened = SparseIndex.open(tmp_path / "i")
    assert len(reopened) == 237 and reopened.num_docs == 240 and reopened.is_deleted(100)
    for terms, weights in _queries(rng, 15, dyadic=True):
        ref = brute_force(M.toarray(), deleted, terms, weights, 20)
        assert_same_topk(*reopened.search_ids(terms, weights, 20), ref, exact=True)
    # replace a document: delete its key, add it again with another vector
    new = sp.csr_matrix(([100.0], [5], [0, 1]), shape=(1, V), dtype=np.float32)
    reopened.delete(["d7"])
    reopened.add(new.indptr, new.indices, new.data, [{"key": "d7", "path": "new.jpg"}])
    reopened.commit()
    hit = reopened.search([5], [1.0], k=1)[0]
    assert hit.key == "d7" and hit.metadata["path"] == "new.jpg" and hit.doc == 240
    # compaction drops deleted documents, keeps keys, scores and the order of results
    query = _queries(rng, 1, dyadic=True)[0]
    before = [(h.key, h.score) for h in reopened.search(*query, k=30)]
    assert reopened.commit(compact=True)
    assert reopened.num_docs == len(reopened) == 237
    assert before == [(h.key, h.score) for h in reopened.search(*query, k=30)]


def test_add_refuses_duplicate_keys_and_bad_vectors(tmp_path: Path) -> None:
    index = _index(tmp_path, random_csr(np.random.default_rng(7), 10, V, 0.2, dyadic=True))
    one = sp.csr_matrix(([1.0], [2], [0, 1]), shape=(1, V), dtype=np.float32)
    with pytest.raises(LexVLAError, match="already in the index"):
        index.add(one.indptr, one.indices, one.data, [{"key": "d3"}])
    with pytest.raises(LexVLAError, match="twice in the batch"):
        index.add([0, 1, 2], [1, 2], [1.0, 1.0], [{"key": "a"}, {"key": "a"}])
    with pytest.raises(LexVLAError, match="outside"):
        index.add([0, 1], [V], [1.0], [{"key": "a"}])
    with pytest.raises(LexVLAError, match="negative"):
        index.add([0, 1], [1], [-1.0], [{"key": "a"}])
    with pytest.raises(LexVLAError, match="twice"):
        index.add([0, 2], [4, 4], [1.0, 1.0], [{"key": "a"}])
    with pytest.raises(LexVLAError, match="key"):
        index.add([0, 1], [1], [1.0], [{"path": "x"}])
    with pytest.raises(LexVLAError, match="outside"):
        index.search([V + 3], [1.0])
    with pytest.raises(LexVLAError, match="k must be"):
        index.search([1], [1.0], k=0)
    with pytest.raises(LexVLAError, match="1-D"):
        index.search(np.array([[1, 2]], np.int32), np.array([[1.0, 1.0]], np.float32))
    assert index.pending() == 0


def test_export_jsonl_matches_weights(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    M = random_csr(rng, 30, V, 0.2, dyadic=False)
    M.data[:5] = 0.004  # rounds to impact 0: dropped
    index = _index(tmp_path, M)
    index.delete(["d2"])
    index.commit()
    assert export_jsonl(index, tmp_path / "out.jsonl") == 29
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [f"d{i}" for i in range(30) if i != 2]
    dense = M.toarray()
    for r in records:
        row = dense[int(r["id"][1:])]
        expected = {f"w{t}": int(np.rint(row[t] * 100)) for t in np.flatnonzero(row)}
        assert r["contents"] == "" and r["vector"] == {w: v for w, v in expected.items() if v > 0}


def test_index_never_imports_torch_or_models() -> None:
    code = (
        "import sys, lexvla.index;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft')"
        " or m.startswith('lexvla.models')]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    n=st.integers(0, 30),
    vocab=st.integers(1, 12),
    dense_fraction=st.sampled_from([None, 0.2, 0.5, 1.0]),
)
def test_property_search_equals_brute_force(
    data: st.DataObject, n: int, vocab: int, dense_fraction: float | None
) -> None:
    """Random small corpora with dyadic weights (exact arithmetic, many ties)."""
    import tempfile

    cells = st.lists(st.integers(0, 8), min_size=n * vocab, max_size=n * vocab)
    dense = (
        (np.array(data.draw(cells), dtype=np.float32).reshape(n, vocab) / 4.0)
        if n
        else np.zeros((0, vocab), np.float32)
    )
    deleted = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
    q = (
        np.array(
            data.draw(st.lists(st.integers(0, 8), min_size=vocab, max_size=vocab)), dtype=np.float32
        )
        / 8.0
    )
    k = data.draw(st.integers(1, n + 3))
    M = sp.csr_matrix(dense)
    with tempfile.TemporaryDirectory() as tmp, no_fsync():
        index = SparseIndex.create(
            Path(tmp) / "i", _vocab(vocab), {}, dense_fraction=dense_fraction
        )
        index.add(M.indptr, M.indices, M.data, _meta(0, n))
        index.delete([f"d{i}" for i in np.flatnonzero(deleted)])
        index.commit()
        index = SparseIndex.open(Path(tmp) / "i")
        terms = np.flatnonzero(q)
        ids, scores = index.search_ids(terms, q[terms], k)
        assert_same_topk(ids, scores, brute_force(dense, deleted, terms, q[terms], k), exact=True)
        b_ids, b_scores = index.search_batch([0, len(terms)], terms, q[terms], k)
        np.testing.assert_array_equal(b_ids[0, : len(ids)], ids)
        np.testing.assert_array_equal(b_scores[0, : len(ids)], scores)


def test_metadata_round_trips_exotic_text(tmp_path: Path) -> None:
    """Line and paragraph separators inside captions must not split a metadata line."""
    captions = ["a\u2028b", "c\x85d", 'quote " and \\ slash', "naïve café 🐕", "line\nbreak"]
    docs = sp.csr_matrix(np.eye(5, V, dtype=np.float32))
    index = SparseIndex.create(tmp_path / "i", _vocab(), {})
    meta = [
        {"key": f"k{i}", "path": "p", "caption": c, "extra": [i, None]}
        for i, c in enumerate(captions)
    ]
    index.add(docs.indptr, docs.indices, docs.data, meta)
    index.commit()
    for i in range(5):
        assert index.search([i], [1.0])[0].metadata == meta[i]
        assert SparseIndex.open(tmp_path / "i").document(i) == meta[i]


def test_searches_from_threads_while_refreshing(tmp_path: Path) -> None:
    """Searches in threads (nogil kernels) while the index grows and refreshes under them."""
    import threading

    rng = np.random.default_rng(9)
    docs = random_csr(rng, 400, V, 0.1, dyadic=True, head_words=3)
    index = SparseIndex.create(tmp_path / "i", _vocab(), {})
    queries = _queries(rng, 8, dyadic=True)
    errors: list[BaseException] = []
    stop = threading.Event()

    def searcher() -> None:
        try:
            while not stop.is_set():
                for terms, weights in queries:
                    ids, scores = index.search_ids(terms, weights, 5)
                    assert (np.diff(scores) <= 0).all() and (ids < 400).all()
        except BaseException as err:  # noqa: BLE001 - reported to the main thread
            errors.append(err)

    threads = [threading.Thread(target=searcher) for _ in range(2)]
    for t in threads:
        t.start()
    for start in range(0, 400, 100):  # each commit changes N under the searching threads
        part = docs[start : start + 100]
        index.add(part.indptr, part.indices, part.data, _meta(start, 100))
        index.commit()
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors
    dense = docs.toarray()
    for terms, weights in queries:
        ref = brute_force(dense, np.zeros(400, bool), terms, weights, 5)
        assert_same_topk(*index.search_ids(terms, weights, 5), ref, exact=True)


def _sorted_topk(hs: np.ndarray, hi: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((hi[:n], -hs[:n]))  # the kernels' order: score desc, doc id asc
    return hi[:n][order], hs[:n][order]


def test_blocks_and_doc_ranges_equal_brute_force(tmp_path: Path) -> None:
    """search_range over any doc range, in blocks of any size, is the brute-force top-k of that
    range (list cursors start at the range's first doc; blocks split posting lists and dense runs)."""
    from lexvla.index import _kernels

    rng = np.random.default_rng(10)
    M = random_csr(rng, 500, V, 0.08, dyadic=True, head_words=6)
    index = _index(tmp_path, M, dense_fraction=0.3)
    index.delete(["d7", "d250"])
    index.commit()
    assert index.manifest["num_dense_terms"] >= 4  # runs of 4 dense words exist
    dense, deleted = M.toarray(), np.zeros(500, bool)
    deleted[[7, 250]] = True
    arrays = index._arrays(index._gen)
    k = 8
    hs, hi = np.empty(k, np.float32), np.empty(k, np.int64)
    for terms, weights in _queries(rng, 12, dyadic=True):
        terms = np.concatenate([np.arange(6), terms[terms >= 6]]).astype(np.int32)  # dense first
        weights = rng.integers(1, 9, len(terms)).astype(np.float32) / 8
        for d0, d1 in ((0, 500), (1, 500), (123, 377), (499, 500), (250, 251), (500, 500)):
            outside = np.ones(500, bool)
            outside[d0:d1] = False
            ref = brute_force(dense, deleted | outside, terms, weights, k)
            for block_docs in (1, 5, 64, 1000):
                n = _kernels.search_range(*arrays, terms, weights, d0, d1, k, block_docs, hs, hi)
                assert_same_topk(*_sorted_topk(hs, hi, n), ref, exact=True)


def test_lower_bound_equals_searchsorted() -> None:
    from lexvla.index import _kernels

    rng = np.random.default_rng(11)
    for _ in range(200):
        num_docs = int(rng.integers(1, 5000))
        size = int(rng.integers(0, min(num_docs, 300) + 1))
        skew = rng.choice([1.0, 0.3, 3.0])  # uniform lists, and lists crowded at one end
        docs = np.sort(rng.choice(num_docs, size, replace=False, p=None)).astype(np.int32)
        docs = np.unique((num_docs - 1) * (docs / max(num_docs - 1, 1)) ** skew).astype(np.int32)
        padded = np.concatenate([[-5, -5], docs, [num_docs + 9]]).astype(np.int32)  # other lists
        for doc in rng.integers(0, num_docs, 20):
            got = _kernels._lower_bound(padded, 2, 2 + len(docs), doc, num_docs)
            assert got - 2 == np.searchsorted(docs, doc), (docs, doc)


@pytest.mark.parametrize("dyadic", [True, False])
def test_threaded_search_equals_single_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dyadic: bool
) -> None:
    """Chunks of documents scored by helper threads: the same ids and bit-identical scores."""
    from lexvla.index import _kernels

    monkeypatch.setattr(_kernels, "MIN_CHUNK_DOCS", 37)  # 2-3 threads, 4-6 chunks of 100-150 docs
    rng = np.random.default_rng(12)
    M = random_csr(rng, 600, V, 0.08, dyadic, head_words=4)
    index = _index(tmp_path, M)
    index.delete(["d0", "d36", "d37", "d599"])  # around chunk edges
    index.commit()
    deleted = np.zeros(600, bool)
    deleted[[0, 36, 37, 599]] = True
    for terms, weights in _queries(rng, 15, dyadic):
        single = index.search_ids(terms, weights, 12, threads=1)
        ref = brute_force(M.toarray(), deleted, terms, weights, 12)
        assert_same_topk(*single, ref, exact=dyadic)
        for threads in (2, 3, None):
            ids, scores = index.search_ids(terms, weights, 12, threads=threads)
            np.testing.assert_array_equal(ids, single[0])
            np.testing.assert_array_equal(scores, single[1])
    hits = index.search(terms[::-1].astype(np.int64), weights[::-1], 3, threads=2)  # canonicalised
    assert [h.doc for h in hits] == single[0][:3].tolist()
    assert len(index.search_ids([5, 1], [0.0, 0.0], 3, threads=2)[0]) == 0  # no active words
    with pytest.raises(LexVLAError, match="threads"):
        index.search_ids(terms, weights, 3, threads=0)


def test_threaded_searches_from_several_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python threads searching with helper threads at once share the helpers; results unchanged."""
    import threading

    from lexvla.index import _kernels

    monkeypatch.setattr(_kernels, "MIN_CHUNK_DOCS", 50)
    rng = np.random.default_rng(13)
    index = _index(tmp_path, random_csr(rng, 500, V, 0.1, dyadic=False, head_words=3))
    queries = _queries(rng, 10, dyadic=False)
    expected = [index.search_ids(t, w, 5, threads=1) for t, w in queries]
    errors: list[BaseException] = []

    def searcher() -> None:
        try:
            for _ in range(20):
                for (terms, weights), (ids, scores) in zip(queries, expected):
                    got = index.search_ids(terms, weights, 5, threads=3)
                    np.testing.assert_array_equal(got[0], ids)
                    np.testing.assert_array_equal(got[1], scores)
        except BaseException as err:  # noqa: BLE001 - reported to the main thread
            errors.append(err)

    threads = [threading.Thread(target=searcher) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_searching_thread_scores_chunks_a_stalled_helper_left(tmp_path: Path) -> None:
    """Chunks claimed by helpers that never finish them (stalled or dead) are scored by the
    searching thread itself: same results as a single-threaded search."""
    from lexvla.index import _kernels

    rng = np.random.default_rng(14)
    index = _index(tmp_path, random_csr(rng, 300, V, 0.1, dyadic=False, head_words=3))
    arrays = index._arrays(index._gen)
    for terms, weights in _queries(rng, 8, dyadic=False):
        terms, weights = terms.astype(np.int32), weights.astype(np.float32)
        expected = index.search_ids(terms, weights, 6, threads=1)
        for already_claimed in (7, 3):  # all 7 chunks claimed by helpers, or the first 3
            claimed, done = np.array([already_claimed], np.int64), np.zeros(7, np.int64)
            chunk_ids, chunk_scores = np.empty((7, 6), np.int64), np.empty((7, 6), np.float32)
            chunk_hits = np.zeros(7, np.int64)
            job = (*arrays, terms, weights, 6, 43, claimed, done, chunk_ids, chunk_scores)
            assert _kernels.search_chunks(*job, chunk_hits, True) == 7  # scored all 7 itself
            assert (done == 1).all()
            ids, scores = np.empty(6, np.int64), np.empty(6, np.float32)
            n = _kernels.merge_chunks(chunk_ids, chunk_scores, chunk_hits, 6, ids, scores)
            np.testing.assert_array_equal(ids[:n], expected[0])
            np.testing.assert_array_equal(scores[:n], expected[1])


def test_import_leaves_numba_for_the_first_kernel_call() -> None:
    # numba (the `index` extra) takes seconds to import: `import lexvla.index` must not pay for it
    code = (
        "import sys; import lexvla.index; assert 'numba' not in sys.modules; "
        "from lexvla.index import _kernels; assert 'numba' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
