"""SparseIndex: an embedded, exact, memory-mapped inverted index of lexical vectors.

    index = SparseIndex.create("runs/x/index", vocab_words, {"model": "runs/x"})
    index.add(indptr, indices, values, [{"key": "img1", "path": "a.jpg"}, ...])   # staged
    index.commit()                                                               # published
    hits = SparseIndex.open("runs/x/index").search(q_indices, q_values, k=10, explain=True)

Scores are exact inner products with the stored (float32) weights; see `_kernels` for the summation
order and the tie rule (lower document id first). The on-disk format and the crash-safety argument are
described in `_generation` and `_commit`.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from lexvla.errors import LexVLAError
from lexvla.index import _commit, _io, _threads
from lexvla.index._csr import canonical_csr
from lexvla.index._generation import DocTable, Generation, open_generation, write_generation
from lexvla.index._writer import IndexWriter

logger = logging.getLogger(__name__)

DEFAULT_DENSE_FRACTION = 0.125


@dataclass(frozen=True, slots=True)
class Hit:
    """One search result.

    Attributes:
        doc: document id (row of the index; stable until a `commit(compact=True)`).
        key: the document's unique key.
        score: inner product of the query with the document (> 0).
        metadata: the document's metadata dict (includes "key").
        words: with `explain=True`, (word, query weight x document weight) for every shared word,
            largest first; the contributions sum to `score`.
    """

    doc: int
    key: str
    score: float
    metadata: dict[str, Any]
    words: list[tuple[str, float]] | None = None


class SparseIndex(IndexWriter):
    """A directory holding published generations of an inverted index, plus staged changes.

    Reading (`search*`, `explain`, `document`) uses the generation that was current when the index was
    opened (or last committed/refreshed by this object). Writing (`add`, `delete`, `commit`) holds an
    exclusive lock on the directory and always applies to the latest published generation.
    """

    def __init__(self, root: Path, generation: Generation) -> None:
        self.path = root
        self._gen = generation
        self._lock_depth = 0
        self._active_cache: tuple[Any, set[str]] | None = None

    # ---------------------------------------------------------------------------------- lifecycle
    @classmethod
    def create(
        cls,
        path: str | Path,
        vocab: Sequence[str],
        model_ref: Mapping[str, Any],
        *,
        dense_fraction: float | None = DEFAULT_DENSE_FRACTION,
    ) -> SparseIndex:
        """Create an empty index at `path` (a new or empty directory).

        Args:
            path: the index directory.
            vocab: the V words of the lexical vocabulary, in dimension order.
            model_ref: an opaque JSON-able dict naming the encoder, e.g. `{"model": "runs/x"}`.
            dense_fraction: words present in at least this fraction of the documents are stored as
                dense columns (faster to add up); None stores every word as a posting list.
        """
        root = Path(path)
        words = _io.check_vocab(vocab, f"SparseIndex.create({root})")
        model = json.loads(_io.jsonable(dict(model_ref), "model_ref"))
        if dense_fraction is not None and not 0.0 < dense_fraction <= 1.0:
            raise LexVLAError(f"dense_fraction must be in (0, 1] or None, got {dense_fraction}")
        root.mkdir(parents=True, exist_ok=True)
        with _io.file_lock(root / "LOCK"):
            if (root / "CURRENT").exists():
                raise LexVLAError(f"{root} already holds an index; open it with SparseIndex.open")
            for leftover in ("tmp", "pending", "generations"):  # of a create that crashed
                shutil.rmtree(root / leftover, ignore_errors=True)
            empty = DocTable(
                np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32),
                np.zeros(0, bool), [], np.zeros(1, np.int64), [],
            )  # fmt: skip
            info = {
                "generation": 0,
                "model": model,
                "dense_fraction": dense_fraction,
                "applied_seq": 0,
                "sources": {},
            }
            write_generation(root / "tmp" / "gen-000000", empty, words, info)
            _commit.publish(root, root / "tmp" / "gen-000000", "gen-000000")
        return cls.open(root)

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True) -> SparseIndex:
        """Open the published generation of an index (arrays memory-mapped).

        Args:
            path: the index directory.
            verify: check the sha256 of every file (reads them once). Without it, sizes, shapes and
                id bounds are still checked, so truncated files are refused rather than searched.
        """
        root = Path(path)
        return cls(root, cls._open_current(root, verify))

    @staticmethod
    def _open_current(root: Path, verify: bool) -> Generation:
        for _ in range(3):  # a concurrent commit may remove the generation we are opening
            name = _commit.read_current(root)
            try:
                return open_generation(root / "generations" / name, verify=verify)
            except LexVLAError:
                if _commit.read_current(root) == name:
                    raise
        raise LexVLAError(f"{root} keeps changing while being opened; retry")

    def refresh(self, *, verify: bool = True) -> bool:
        """Switch to the latest published generation if another writer published one."""
        if _commit.read_current(self.path) == self._gen.path.name:
            return False
        self._gen = self._open_current(self.path, verify)
        return True

    # --------------------------------------------------------------------------------- properties
    @property
    def vocab(self) -> list[str]:
        return self._gen.vocab

    @property
    def vocab_hash(self) -> str:
        return str(self._gen.manifest["vocab_sha256"])

    @property
    def model_ref(self) -> dict[str, Any]:
        return dict(self._gen.manifest["model"])

    @property
    def manifest(self) -> dict[str, Any]:
        return dict(self._gen.manifest)

    @property
    def generation(self) -> int:
        return int(self._gen.manifest["generation"])

    @property
    def num_docs(self) -> int:
        """Documents in the index, deleted ones included (doc ids are 0..num_docs-1)."""
        return self._gen.num_docs

    def __len__(self) -> int:
        """Active (not deleted) documents."""
        return self._gen.num_docs - int(self._gen.manifest["num_deleted"])

    def __repr__(self) -> str:
        return f"SparseIndex({str(self.path)!r}, generation={self.generation}, docs={len(self)})"

    # ------------------------------------------------------------------------------------ reading
    def document(self, doc: int) -> dict[str, Any]:
        """Metadata of document `doc`."""
        self._check_doc(doc)
        return self._gen.metadata(doc)

    def vector(self, doc: int) -> tuple[np.ndarray, np.ndarray]:
        """(word ids (n,) int32 ascending, weights (n,) float32) of document `doc`."""
        self._check_doc(doc)
        a = self._gen.arrays
        s, e = a["doc_indptr"][doc], a["doc_indptr"][doc + 1]
        return np.array(a["doc_terms"][s:e]), np.array(a["doc_weights"][s:e])

    def is_deleted(self, doc: int) -> bool:
        self._check_doc(doc)
        return bool(self._gen.arrays["deleted"][doc])

    def doc_id(self, key: str) -> int | None:
        """The active document with this key, or None."""
        keys, deleted = self._gen.keys(), self._gen.arrays["deleted"]
        lookup = getattr(self._gen, "_key_lookup", None)
        if lookup is None:
            lookup = {k: d for d, k in enumerate(keys) if not deleted[d]}
            self._gen._key_lookup = lookup  # type: ignore[attr-defined]
        return lookup.get(key)

    def _check_doc(self, doc: int) -> None:
        if not 0 <= doc < self._gen.num_docs:
            raise LexVLAError(f"document id {doc} is out of range [0, {self._gen.num_docs})")

    # ------------------------------------------------------------------------------------- search
    def _query(self, indices: ArrayLike, values: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """Canonical query: (word ids int32 ascending, weights float32 > 0)."""
        terms, weights = np.asarray(indices), np.asarray(values)
        if terms.ndim != 1 or weights.ndim != 1:
            raise LexVLAError("query: indices and values must be 1-D arrays of equal length")
        indptr = np.array([0, terms.size], np.int64)
        _, terms, weights = canonical_csr(indptr, terms, weights, len(self.vocab), "query")
        return terms, weights

    @staticmethod
    def _thread_count(g: Generation, threads: int | None, cost: int) -> int:
        """Threads for a search of `cost` postings (`_kernels.query_cost`): `threads`, or by default
        all of numba's (all cores unless NUMBA_NUM_THREADS says otherwise) for queries of at least
        THREADED_MIN_COST postings; at most one per MIN_CHUNK_DOCS documents."""
        from lexvla.index import _kernels  # numba, imported on first use

        if threads is None:
            threads = _kernels.get_num_threads() if cost >= _kernels.THREADED_MIN_COST else 1
        return max(1, min(threads, g.num_docs // _kernels.MIN_CHUNK_DOCS))

    @staticmethod
    def _arrays(g: Generation) -> tuple[np.ndarray, ...]:
        a = g.arrays
        return (
            a["post_indptr"],
            a["post_docs"],
            a["post_weights"],
            g.term_slot,
            a["dense"],
            a["deleted"],
        )

    def search_ids(
        self,
        query_indices: ArrayLike,
        query_values: ArrayLike,
        k: int = 10,
        *,
        threads: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k document ids and scores of one query (no metadata: the fast path).

        Args:
            query_indices: (n,) word ids of the query's non-zeros.
            query_values: (n,) their weights (>= 0; zeros are ignored).
            k: number of results wanted (>= 1).
            threads: threads scoring this query, each a share of the documents (same results for
                any count). None: all cores for a query costly enough to gain from it (at least
                150,000 postings to add; a frequent word stored as a dense column counts 1/8 of
                the documents), else 1; never more than one per 8,192 documents. On a machine busy
                with other work, or when searching from several Python threads at once, 1 uses the
                CPU best.

        Returns:
            (ids (m,) int64, scores (m,) float32), best first, m = min(k, documents scoring > 0);
            ties go to the lower document id.
        """
        return self._top(self._gen, query_indices, query_values, k, threads)

    def _top(
        self,
        g: Generation,
        query_indices: ArrayLike,
        query_values: ArrayLike,
        k: int,
        threads: int | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """search_ids on generation `g`: one snapshot of the arrays for the whole search, so a
        concurrent refresh() can never mix two generations."""
        from lexvla.index import _kernels  # numba, imported on first use

        if k < 1:
            raise LexVLAError(f"k must be >= 1, got {k}")
        if threads is not None and threads < 1:
            raise LexVLAError(f"threads must be >= 1 or None, got {threads}")
        terms, weights = np.asarray(query_indices), np.asarray(query_values)
        kk = min(k, max(g.num_docs, 1))
        ids, scores = np.empty(kk, np.int64), np.empty(kk, np.float32)
        arrays = self._arrays(g)
        if threads == 1 or g.num_docs < 2 * _kernels.MIN_CHUNK_DOCS:
            n = self._top_one(arrays, terms, weights, ids, scores)
        else:
            n = self._top_threaded(g, arrays, terms, weights, threads, ids, scores)
        return ids[:n], scores[:n]

    def _canonical(self, terms: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The query sorted, cast, validated (raises on bad input), zeros dropped; warns if empty."""
        terms, weights = self._query(terms, weights)
        if len(terms) == 0:
            logger.warning("query has no active words (no positive weights): no hits")
        return terms, weights

    @staticmethod
    def _fast(terms: np.ndarray, weights: np.ndarray) -> bool:
        """Arrays the kernels take as they are (the kernels still check they are canonical)."""
        return bool(
            terms.ndim == 1
            and terms.size
            and terms.dtype == np.int32
            and weights.dtype == np.float32
            and terms.shape == weights.shape
        )

    def _top_one(
        self,
        arrays: tuple[np.ndarray, ...],
        terms: np.ndarray,
        weights: np.ndarray,
        ids: np.ndarray,
        scores: np.ndarray,
    ) -> int:
        """One thread, one kernel call for a canonical query (the common case)."""
        from lexvla.index import _kernels  # numba, imported on first use

        n = -1
        if self._fast(terms, weights):
            n = _kernels.search_one(*arrays, terms, weights, len(ids), ids, scores)
        if n < 0:  # not canonical
            terms, weights = self._canonical(terms, weights)
            if len(terms) == 0:
                return 0
            n = _kernels.search_one(*arrays, terms, weights, len(ids), ids, scores)
        return n

    def _top_threaded(
        self,
        g: Generation,
        arrays: tuple[np.ndarray, ...],
        terms: np.ndarray,
        weights: np.ndarray,
        threads: int | None,
        ids: np.ndarray,
        scores: np.ndarray,
    ) -> int:
        """Top k of a query scored by several threads in chunks of documents (if worth it)."""
        from lexvla.index import _kernels  # numba, imported on first use

        cost = -1
        if self._fast(terms, weights):
            cost = _kernels.query_cost(arrays[0], arrays[3], terms, weights, g.num_docs)
        if cost < 0:  # not canonical
            terms, weights = self._canonical(terms, weights)
            if len(terms) == 0:
                return 0
            cost = _kernels.query_cost(arrays[0], arrays[3], terms, weights, g.num_docs)
        num_threads = self._thread_count(g, threads, cost)
        if num_threads == 1:
            return _kernels.search_one(*arrays, terms, weights, len(ids), ids, scores)
        k = len(ids)
        most = _kernels.CHUNKS_PER_THREAD * num_threads
        num_chunks = max(1, min(most, g.num_docs // _kernels.MIN_CHUNK_DOCS))
        chunk_docs = -(-g.num_docs // num_chunks)
        claimed, done = np.zeros(1, np.int64), np.zeros(num_chunks, np.int64)
        chunk_ids = np.empty((num_chunks, k), np.int64)
        chunk_scores = np.empty((num_chunks, k), np.float32)
        chunk_hits = np.zeros(num_chunks, np.int64)
        job = (*arrays, terms, weights, k, chunk_docs, claimed, done)
        _threads.run((*job, chunk_ids, chunk_scores, chunk_hits), num_threads)
        return _kernels.merge_chunks(chunk_ids, chunk_scores, chunk_hits, k, ids, scores)

    def search(
        self,
        query_indices: ArrayLike,
        query_values: ArrayLike,
        k: int = 10,
        *,
        explain: bool = False,
        threads: int | None = None,
    ) -> list[Hit]:
        """Exact top-k hits of one query, with metadata and (optionally) per-word explanations.

        Args:
            query_indices, query_values: (n,) word ids and weights of the query.
            k: number of hits wanted.
            explain: fill `Hit.words` with each shared word's contribution.
            threads: threads scoring the query (see `search_ids`).
        """
        g = self._gen
        ids, scores = self._top(g, query_indices, query_values, k, threads)
        terms, weights = self._query(query_indices, query_values) if explain else (None, None)
        hits = []
        for doc, score in zip(ids.tolist(), scores.tolist()):
            meta = g.metadata(doc)
            words = self._explain(g, doc, terms, weights) if explain else None
            hits.append(Hit(doc, str(meta.get("key")), score, meta, words))
        return hits

    def explain(
        self, doc: int, query_indices: ArrayLike, query_values: ArrayLike
    ) -> list[tuple[str, float]]:
        """(word, contribution) of every word shared by the query and document `doc`, largest first.

        The contributions are the float32 products q_w * w_doc that the score adds up.
        """
        self._check_doc(doc)
        terms, weights = self._query(query_indices, query_values)
        return self._explain(self._gen, doc, terms, weights)

    @staticmethod
    def _explain(
        g: Generation, doc: int, terms: np.ndarray, weights: np.ndarray
    ) -> list[tuple[str, float]]:
        a = g.arrays
        s, e = a["doc_indptr"][doc], a["doc_indptr"][doc + 1]
        d_terms, d_weights = a["doc_terms"][s:e], a["doc_weights"][s:e]
        common, qi, di = np.intersect1d(terms, d_terms, assume_unique=True, return_indices=True)
        contrib = weights[qi] * d_weights[di]  # (m,) float32, as in the kernel
        order = np.argsort(-contrib, kind="stable")
        return [(g.vocab[int(common[i])], float(contrib[i])) for i in order]

    def search_batch(
        self,
        q_indptr: ArrayLike,
        q_indices: ArrayLike,
        q_values: ArrayLike,
        k: int = 10,
        *,
        num_threads: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k of many queries given as a CSR batch, in parallel over queries.

        Args:
            q_indptr, q_indices, q_values: (Q+1,), (nnz,), (nnz,) CSR of Q queries.
            k: results per query.
            num_threads: numba threads (default: numba's current setting, i.e. all cores). numba's
                thread count is process-wide: do not run search_batch from several Python threads
                at once with different num_threads. (search / search_ids are thread-safe.)

        Returns:
            ids (Q, k) int64 and scores (Q, k) float32, best first; rows with fewer than k hits are
            padded with id -1 and score 0.
        """
        from lexvla.index import _kernels  # numba, imported on first use

        if k < 1:
            raise LexVLAError(f"k must be >= 1, got {k}")
        ip, ix, vals = canonical_csr(q_indptr, q_indices, q_values, len(self.vocab), "query batch")
        Q = len(ip) - 1
        ids, scores = np.full((Q, k), -1, np.int64), np.zeros((Q, k), np.float32)
        g = self._gen
        if g.num_docs == 0 or Q == 0:
            return ids, scores
        threads = _kernels.get_num_threads() if num_threads is None else num_threads
        chunks = 1 if threads <= 1 else min(Q, 4 * threads)
        with _kernels.parallel(threads, chunksize=1):
            kk = min(k, g.num_docs)
            _kernels.search_many(*self._arrays(g), ip, ix, vals, kk, chunks, ids, scores)
        empty = int((np.diff(ip) == 0).sum())
        if empty:
            logger.warning("%d of %d queries have no active words: no hits for them", empty, Q)
        return ids, scores
