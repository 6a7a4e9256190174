"""Naive references and data makers shared by the index tests (dense brute force, no index code).

Used by the test_index*.py files and some reliability tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp

from lexvla import _atomic


def random_csr(
    rng: np.random.Generator,
    n: int,
    vocab_size: int,
    density: float,
    dyadic: bool,
    head_words: int = 0,
) -> sp.csr_matrix:
    """n random non-negative vectors over V words; the first `head_words` words are in half of them.

    dyadic=True draws weights from multiples of 1/4 in [0.25, 2]: every product with a dyadic query
    weight and every sum of them is exact in float32, so ties are exact and ids must match exactly.
    """
    shape = (n, vocab_size)
    mask = rng.random(shape) < np.where(np.arange(vocab_size) < head_words, 0.5, density)
    w = rng.integers(1, 9, size=shape) / 4.0 if dyadic else rng.lognormal(0.0, 1.0, size=shape)
    return sp.csr_matrix(np.where(mask, w, 0.0).astype(np.float32))


def brute_force(
    docs: np.ndarray, deleted: np.ndarray, q_terms: np.ndarray, q_weights: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k by dense float64 scores: score > 0, not deleted, ties to the lower doc id.

    Args:
        docs: (N, V) dense document weights.
        deleted: (N,) bool.
        q_terms, q_weights: the query's word ids and weights (float32 like the index's queries).

    Returns:
        (top ids (m,), their scores (m,), all scores (N,)).
    """
    q = np.zeros(docs.shape[1])
    np.add.at(q, np.asarray(q_terms, int), np.asarray(q_weights, np.float32).astype(np.float64))
    scores = docs.astype(np.float64) @ q  # (N,)
    cand = np.flatnonzero((scores > 0) & ~deleted)
    order = cand[np.lexsort((cand, -scores[cand]))][:k]
    return order, scores[order], scores


def assert_same_topk(
    ids: np.ndarray,
    scores: np.ndarray,
    ref: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    exact: bool,
    rtol: float = 1e-5,
) -> None:
    """The index's top-k equals the brute-force one.

    exact=True (dyadic data, exact arithmetic): ids identical, ties included. Otherwise scores agree
    to `rtol`, every hit's true score matches, and ids agree exactly except inside groups of reference
    scores closer than `rtol` (float32 rounding may order those either way), compared as sets.
    """
    ref_ids, ref_scores, all_scores = ref
    assert len(ids) == len(ref_ids), (ids, ref_ids)
    assert len(set(ids.tolist())) == len(ids)
    if exact:
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_array_equal(scores, ref_scores.astype(np.float32))
        return
    np.testing.assert_allclose(scores, ref_scores, rtol=rtol)
    np.testing.assert_allclose(all_scores[ids], ref_scores, rtol=rtol)
    i = 0
    while i < len(ref_ids):
        j = i + 1
        while j < len(ref_ids) and ref_scores[i] - ref_scores[j] <= rtol * ref_scores[i]:
            j += 1
        if j - i == 1:
            assert ids[i] == ref_ids[i], (i, ids, ref_ids)
        elif j < len(ref_ids):  # a near-tie group inside the list: same members
            assert set(ids[i:j].tolist()) == set(ref_ids[i:j].tolist()), (i, ids, ref_ids)
        i = j


@contextlib.contextmanager
def no_fsync() -> Iterator[None]:
    """Skip fsync inside the block: for tests that create hundreds of tiny indexes."""
    old, _atomic.FSYNC = _atomic.FSYNC, False
    try:
        yield
    finally:
        _atomic.FSYNC = old
