"""numba kernels of the sparse index: CSR checks, posting-list construction and exact top-k search.

Search is term-at-a-time: for each query word (ascending word id), its posting list is scattered into a
dense float32 score buffer of one slot per document (`acc[doc] += q_w * w_doc`), then one pass over the
buffer selects the top k and zeroes it for the next query. Two measured details make it fast:

- Unsigned indices. numba wraps negative signed indices (`a[-1]`), which costs a compare per array
  access; indexing with `uint32` / `uint64` values removes it (about 1.5x on long posting lists).
- Software prefetch. Posting lists of a uniform corpus are short (~400 entries) and scattered over a
  100 MB index, so the loop waits on DRAM at the start of every list; `llvm.prefetch` of the lists
  `PREFETCH_AHEAD` words ahead keeps the memory pipeline full (about 2x).

Words present in at least `dense_min_df` documents (Zipf-distributed corpora have a few in most
documents) are stored as dense columns instead of posting lists: adding a dense column vectorises
(SIMD) and is ~8x cheaper per element than scattering the same number of postings.

Search weights are float32, or float16 when every weight is exactly representable in float16 (always
the case for an index built from corpus shards, which store float16): the posting lists and dense
columns then take 6 instead of 8 and 2 instead of 4 bytes per entry, and since search is bound by
memory traffic this is faster. Kernels receive float16 arrays as their uint16 bits and widen each
value exactly (`as_f32`, the F16C instruction); the arithmetic is float32 either way.

Exactness: the score of a document is the float32 sum, in ascending word order, of the float32 products
`q_w * w_doc` (no fused multiply-add, no reordering, no pruning), whichever of the two layouts a word
uses. Ties are broken by the lower document id. Only documents with a score > 0 are hits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types, uint32, uint64
from numba.core import cgutils
from numba.extending import intrinsic, overload

PREFETCH_AHEAD = 8  # posting lists prefetched ahead of the one being scattered
PREFETCH_MAX = 1024  # postings prefetched per list (longer lists stream well by themselves)
CHUNK = 64  # documents per block of the selection pass


@intrinsic
def _prefetch(typingctx, array, index):  # noqa: ANN001, ANN202 (numba intrinsic signature)
    """`llvm.prefetch(&array[index], read, locality 2)`: a hint, never a fault.

    Locality 2 (prefetcht1, into L2 rather than L1) with 8 lists ahead measured ~15% faster than
    locality 3 with 4 lists ahead: more lines can be in flight, and L1 is not polluted.
    """
    sig = types.void(array, index)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(2), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _half_to_float(typingctx, bits):  # noqa: ANN001, ANN202 (numba intrinsic signature)
    """The float32 value of IEEE half-precision bits (uint16): exact, subnormals included (F16C)."""
    if not (isinstance(bits, types.Integer) and bits.bitwidth == 16):
        return None
    sig = types.float32(bits)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


def as_f32(x):  # noqa: ANN001, ANN201
    """A stored weight as float32: float32 as is, uint16 read as float16 bits (numba only)."""
    raise NotImplementedError("as_f32 is only callable from numba kernels")


@overload(as_f32)
def _as_f32(x):  # noqa: ANN001, ANN202
    if isinstance(x, types.Integer) and x.bitwidth == 16:
        return lambda x: _half_to_float(x)
    if isinstance(x, types.Float):
        return lambda x: x
    return None


# ------------------------------------------------------------------------------------- CSR checks
@njit(cache=True, nogil=True)
def check_csr(indptr, indices, values, vocab_size):  # noqa: ANN001, ANN201
    """Validate a CSR matrix of lexical vectors.

    Returns:
        (code, row, sorted): code 0 = valid, 1 = bad indptr, 2 = word id out of range,
        3 = negative or non-finite weight, 4 = a word twice in a row; `row` is the offending row
        (or -1); `sorted` tells whether every row's word ids are strictly ascending.
    """
    n = indptr.shape[0] - 1
    if n < 0 or indptr[0] != 0 or indptr[n] != indices.shape[0] or indptr[n] != values.shape[0]:
        return 1, -1, False
    is_sorted = True
    for r in range(n):
        s, e = indptr[r], indptr[r + 1]
        if e < s:
            return 1, r, False
        for p in range(s, e):
            t = indices[p]
            if t < 0 or t >= vocab_size:
                return 2, r, False
            v = values[p]
            if not (v >= 0.0 and v < np.inf):
                return 3, r, False
            if p > s and t <= indices[p - 1]:
                is_sorted = False
    if not is_sorted:
        return 0, -1, False
    return 0, -1, True


@njit(cache=True, nogil=True)
def has_duplicates(indptr, indices):  # noqa: ANN001, ANN201
    """First row holding a word id twice, for rows already sorted ascending; -1 if none."""
    for r in range(indptr.shape[0] - 1):
        for p in range(indptr[r] + 1, indptr[r + 1]):
            if indices[p] == indices[p - 1]:
                return r
    return -1


@njit(cache=True, nogil=True)
def is_canonical_query(terms, weights, vocab_size):  # noqa: ANN001, ANN201
    """True if word ids strictly ascend within [0, V) and every weight is finite and > 0."""
    prev = -1
    for j in range(terms.shape[0]):
        t = terms[j]
        w = weights[j]
        if t <= prev or t >= vocab_size or not (w > 0.0 and w < np.inf):
            return False
        prev = t
    return True


def get_num_threads() -> int:
    return int(numba.get_num_threads())


@contextlib.contextmanager
def parallel(threads: int, chunksize: int) -> Iterator[None]:
    """Run numba parallel kernels with `threads` threads (clamped to numba's maximum), handing out
    `prange` iterations in chunks of `chunksize`, inside the block."""
    old = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
    old_chunk = numba.set_parallel_chunksize(chunksize)
    try:
        yield
    finally:
        numba.set_parallel_chunksize(old_chunk)
        numba.set_num_threads(old)


# ------------------------------------------------------------------------------------ build postings
@njit(cache=True, nogil=True)
def document_frequency(doc_terms, vocab_size):  # noqa: ANN001, ANN201
    df = np.zeros(vocab_size, np.int64)
    for p in range(doc_terms.shape[0]):
        df[doc_terms[p]] += 1
    return df


@njit(cache=True, nogil=True)
def build_postings(doc_indptr, doc_terms, doc_weights, term_slot, post_indptr, num_dense):  # noqa: ANN001, ANN201
    """Term-major copy of a doc-major CSR (a counting sort: doc ids ascend within each list).

    Words with `term_slot[t] >= 0` go to row `term_slot[t]` of a dense (num_dense, N) block instead of
    a posting list. `post_indptr` (V+1,) must already hold the sparse lists' offsets.

    Returns:
        post_docs (nnz_sparse,) int32, post_weights (nnz_sparse,) float32, dense (H, N) float32.
    """
    N = doc_indptr.shape[0] - 1
    nnz = post_indptr[post_indptr.shape[0] - 1]
    post_docs = np.empty(nnz, np.int32)
    post_weights = np.empty(nnz, np.float32)
    dense = np.zeros((num_dense, N), np.float32)
    fill = post_indptr[:-1].copy()
    for d in range(N):
        for p in range(doc_indptr[d], doc_indptr[d + 1]):
            t = doc_terms[p]
            slot = term_slot[t]
            if slot >= 0:
                dense[slot, d] = doc_weights[p]
            else:
                q = fill[t]
                post_docs[q] = d
                post_weights[q] = doc_weights[p]
                fill[t] = q + 1
    return post_docs, post_weights, dense


# ------------------------------------------------------------------------------------------ search
@njit(cache=True, nogil=True)
def _prefetch_list(post_indptr, post_docs, post_weights, t):  # noqa: ANN001, ANN202
    s = uint64(post_indptr[t])
    e = min(uint64(post_indptr[t + 1]), s + uint64(PREFETCH_MAX))
    p = s
    while p < e:
        _prefetch(post_docs, p)
        p += uint64(16)  # one 64-byte line of int32 ids
    step = uint64(64 // post_weights.itemsize)  # one line of float32 or float16 weights
    while s < e:
        _prefetch(post_weights, s)
        s += step


@njit(cache=True, nogil=True)
def accumulate(post_indptr, post_docs, post_weights, term_slot, dense, q_terms, q_weights, acc):  # noqa: ANN001, ANN201
    """acc[d] += q_w * w[t, d] for every query word t, in the given (ascending) order. acc: (N,)."""
    nq = q_terms.shape[0]
    N = uint64(acc.shape[0])
    for j in range(min(PREFETCH_AHEAD, nq)):
        _prefetch_list(post_indptr, post_docs, post_weights, q_terms[j])
    for j in range(nq):
        if j + PREFETCH_AHEAD < nq:
            _prefetch_list(post_indptr, post_docs, post_weights, q_terms[j + PREFETCH_AHEAD])
        t = uint32(q_terms[j])
        w = q_weights[j]
        slot = term_slot[t]
        if slot >= 0:
            column = dense[slot]
            for i in range(N):
                acc[i] += w * as_f32(column[i])
        else:
            s = uint64(post_indptr[t])
            e = uint64(post_indptr[t + uint32(1)])
            while s < e:
                acc[uint32(post_docs[s])] += w * as_f32(post_weights[s])
                s += uint64(1)


# Heap entries are ranked by (score desc, doc id asc); the root is the worst entry. The comparisons are
# written out in place: a small numba helper returning `a < b or (...)` measured 30-80x slower.
@njit(cache=True, nogil=True)
def _sift_down(hs, hi, i, n):  # noqa: ANN001, ANN202
    while True:
        m = i
        left = 2 * i + 1
        right = left + 1
        if left < n and (hs[left] < hs[m] or (hs[left] == hs[m] and hi[left] > hi[m])):
            m = left
        if right < n and (hs[right] < hs[m] or (hs[right] == hs[m] and hi[right] > hi[m])):
            m = right
        if m == i:
            return
        ts = hs[i]
        hs[i] = hs[m]
        hs[m] = ts
        ti = hi[i]
        hi[i] = hi[m]
        hi[m] = ti
        i = m


@njit(cache=True, nogil=True)
def _sift_up(hs, hi, x):  # noqa: ANN001, ANN202
    while x > 0:
        par = (x - 1) // 2
        if not (hs[x] < hs[par] or (hs[x] == hs[par] and hi[x] > hi[par])):
            return
        ts = hs[x]
        hs[x] = hs[par]
        hs[par] = ts
        ti = hi[x]
        hi[x] = hi[par]
        hi[par] = ti
        x = par


@njit(cache=True, nogil=True)
def select_topk(acc, deleted, k, out_ids, out_scores):  # noqa: ANN001, ANN201
    """Top k (score > 0, not deleted) of `acc` into out_ids/out_scores, best first; zeroes `acc`.

    Documents are visited in ascending id order, so a candidate must beat the current k-th score
    strictly: an equal score already in the heap belongs to a lower id, which wins the tie.

    Returns:
        The number of hits n <= k; out_ids[:n], out_scores[:n] are filled.
    """
    N = uint64(acc.shape[0])
    hs = out_scores
    hi = out_ids
    n = 0
    thr = np.float32(0.0)
    c0 = uint64(0)
    while c0 < N:
        c1 = min(N, c0 + uint64(CHUNK))
        above = 0  # an int sum vectorises; a bool `|=` does not (measured 10x slower)
        for i in range(c0, c1):
            above += np.int32(acc[i] > thr)
        if above:
            for i in range(c0, c1):
                s = acc[i]
                if s > thr and not deleted[i]:
                    if n < k:  # push
                        hs[n] = s
                        hi[n] = i
                        _sift_up(hs, hi, n)
                        n += 1
                    else:  # replace the worst
                        hs[0] = s
                        hi[0] = i
                        _sift_down(hs, hi, 0, n)
                    if n == k:
                        thr = hs[0]
        for i in range(c0, c1):
            acc[i] = 0.0
        c0 = c1
    # heap sort: move the worst to the end, repeatedly -> best first
    for m in range(n - 1, 0, -1):
        ts = hs[0]
        hs[0] = hs[m]
        hs[m] = ts
        ti = hi[0]
        hi[0] = hi[m]
        hi[m] = ti
        _sift_down(hs, hi, 0, m)
    return n


@njit(cache=True, nogil=True)
def search_one(
    post_indptr,
    post_docs,
    post_weights,
    term_slot,
    dense,
    deleted,
    q_terms,
    q_weights,
    k,
    acc,
    out_ids,
    out_scores,
):  # noqa: ANN001, ANN201, E501
    """Exact top-k of one query into out_ids/out_scores (best first).

    Returns:
        The number of hits, or -1 (nothing done) if the query is not canonical (word ids strictly
        ascending in [0, V), weights finite and > 0): the caller canonicalises and calls again. The
        check is folded in here to save a second dispatch from Python (~1 us) per query.
    """
    if not is_canonical_query(q_terms, q_weights, term_slot.shape[0]):
        return -1
    accumulate(post_indptr, post_docs, post_weights, term_slot, dense, q_terms, q_weights, acc)
    return select_topk(acc, deleted, k, out_ids, out_scores)


@njit(cache=True, nogil=True, parallel=True)
def search_many(
    post_indptr,
    post_docs,
    post_weights,
    term_slot,
    dense,
    deleted,
    q_indptr,
    q_terms,
    q_weights,
    k,
    num_chunks,
    out_ids,
    out_scores,
):  # noqa: ANN001, ANN201, E501
    """search_one for every row of a canonical query CSR, in parallel over chunks of queries.

    Use several chunks per thread (handed out one at a time, see `parallel`): a thread descheduled by
    other load on a shared machine then holds up one small chunk, not a fixed half of the batch. Each
    chunk has its own (N,) score buffer. out_ids (Q, k) int64 and out_scores (Q, k) float32 must be
    pre-filled with -1 and 0 (the padding of queries with fewer than k hits).

    Returns:
        (Q,) number of hits per query.
    """
    Q = q_indptr.shape[0] - 1
    counts = np.zeros(Q, np.int64)
    for c in prange(num_chunks):
        acc = np.zeros(deleted.shape[0], np.float32)
        for q in range(c * Q // num_chunks, (c + 1) * Q // num_chunks):
            s, e = q_indptr[q], q_indptr[q + 1]
            if e > s:
                counts[q] = search_one(
                    post_indptr, post_docs, post_weights, term_slot, dense, deleted,
                    q_terms[s:e], q_weights[s:e], k, acc, out_ids[q], out_scores[q],
                )  # fmt: skip
    return counts
