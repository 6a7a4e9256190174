"""Validation and canonical form of CSR batches of lexical vectors (rows = vectors, columns = words).

Canonical form: `indptr` int64 (n+1,) from 0, `indices` int32 strictly ascending within each row,
`values` finite and > 0 (explicit zeros dropped). Every writer of the index and of corpus shards goes
through `canonical_csr`, so readers and kernels can rely on it.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from lexvla.errors import LexVLAError

_PROBLEMS = {
    1: "indptr is not a valid CSR row pointer (it must start at 0, never decrease and end at"
    " len(indices) == len(values))",
    2: "a word id is outside [0, vocab_size)",
    3: "a weight is negative, NaN or infinite (lexical weights are finite and >= 0)",
}


def _as_1d(array: ArrayLike, kind: str, name: str, what: str) -> np.ndarray:
    out = np.asarray(array)
    if out.ndim != 1 or (out.size and out.dtype.kind not in kind):
        raise LexVLAError(
            f"{what}: {name} must be a 1-D array of {'integers' if kind == 'iu' else 'floats'}"
        )
    return out


def canonical_csr(
    indptr: ArrayLike,
    indices: ArrayLike,
    values: ArrayLike,
    vocab_size: int,
    what: str,
    values_dtype: type = np.float32,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check a CSR batch and return it in canonical form.

    Args:
        indptr: (n+1,) row pointer.
        indices: (nnz,) word ids of each row's non-zeros.
        values: (nnz,) their weights; converted to `values_dtype` before the checks (so a value that
            overflows it is refused and one that underflows to 0 is dropped).
        vocab_size: V; word ids must lie in [0, V).
        what: names the input in error messages.
        values_dtype: float32 (index) or float16 (corpus shards).

    Returns:
        (indptr int64 (n+1,), indices int32 (nnz',), values values_dtype (nnz',)), rows sorted by
        word id, zeros dropped.

    Raises:
        LexVLAError: on a malformed pointer, a word id out of range, a negative or non-finite weight
            or a word present twice in one row.
    """
    from lexvla.index import _kernels  # numba, imported on first use

    indptr = _as_1d(indptr, "iu", "indptr", what).astype(np.int64, copy=False)
    indices = _as_1d(indices, "iu", "indices", what).astype(np.int64, copy=False)
    with np.errstate(over="ignore"):
        values = _as_1d(values, "fiu", "values", what).astype(values_dtype, copy=False)
    if indptr.size == 0:
        raise LexVLAError(f"{what}: indptr is empty; a batch of n rows has n+1 pointers")
    code, row, is_sorted = _kernels.check_csr(
        indptr, indices, values.astype(np.float32, copy=False), vocab_size
    )
    if code:
        where = f" (row {row})" if row >= 0 else ""
        raise LexVLAError(f"{what}: {_PROBLEMS[code]}{where}")
    if not is_sorted:
        rows = np.repeat(np.arange(indptr.size - 1), np.diff(indptr))
        order = np.lexsort((indices, rows))
        indices, values = indices[order], values[order]
        dup = _kernels.has_duplicates(indptr, indices)
        if dup >= 0:
            raise LexVLAError(
                f"{what}: row {dup} holds the same word id twice; sum or dedupe first"
            )
    indices = indices.astype(np.int32)
    keep = values > 0
    if not keep.all():
        kept = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
        indptr, indices, values = kept[indptr], indices[keep], values[keep]
    return np.ascontiguousarray(indptr), indices, np.ascontiguousarray(values)
