"""numba kernels of the sparse index: CSR checks, posting-list construction and exact top-k search.

Search is term-at-a-time over blocks of documents: the documents are scored a block at a time
(`search_range`); within a block every query word, in ascending word id order, adds its contributions
`q_w * w_doc` into a float32 score buffer of one slot per document of the block, then one pass over the
buffer feeds a top-k heap and zeroes it for the next block. Measured details that make it fast:

- Unsigned indices. numba wraps negative signed indices (`a[-1]`), which costs a compare per array
  access; indexing with `uint32` / `uint64` values removes it (about 1.5x on long posting lists).
- Software prefetch. Posting lists of a uniform corpus are short (~400 entries) and scattered over a
  100 MB index, so the loop waits on DRAM at the start of every list; `llvm.prefetch` of the lists
  `PREFETCH_AHEAD` words ahead keeps the memory pipeline full (about 2x).
- Dense columns. Words present in at least `dense_min_df` documents (Zipf-distributed corpora have a
  few in most documents) are stored as dense columns instead of posting lists: adding a column
  vectorises (SIMD) and is ~8x cheaper per element than scattering the same number of postings. A run
  of up to 4 dense words that follow each other in the query is added in one pass over the block
  (one load and store of each score instead of four: ~1.4x on the dense words of a Zipf query).
- Fused selection. The heap is fed block by block while the block's scores are still in cache,
  instead of a separate pass over an (N,) buffer.

Multi-threaded single-query search (`search_chunks`, driven by `_threads`) splits the documents into
chunks; threads claim chunks from an atomic counter, each chunk's posting-list cursors start at its
first document (`_lower_bound`), and the chunks' top-k lists are merged (`merge_chunks`).

Search weights are float32, or float16 when every weight is exactly representable in float16 (always
the case for an index built from corpus shards, which store float16): the posting lists and dense
columns then take 6 instead of 8 and 2 instead of 4 bytes per entry, and since search is bound by
memory traffic this is faster. Kernels receive float16 arrays as their uint16 bits and widen each
value exactly (`as_f32`, the F16C instruction); the arithmetic is float32 either way.

Exactness: the score of a document is the float32 sum, in ascending word order, of the float32 products
`q_w * w_doc` (no fused multiply-add, no reordering, no pruning), whichever of the two layouts a word
uses, whatever the block size, chunking or thread count: a document's score is computed by one thread,
in one block, word after word, so the result is bit-identical in every configuration. Ties are broken
by the lower document id (within a block and chunk by visiting documents in ascending order, across
chunks by the merge's (score desc, id asc) order). Only documents with a score > 0 are hits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

try:
    import numba
except ModuleNotFoundError as error:  # the `index` extra
    from lexvla.errors import LexVLAError

    raise LexVLAError(
        "the sparse index needs numba: pip install 'lexvla[index]' (or 'lexvla[all]')"
    ) from error
import numpy as np
from llvmlite import ir
from numba import njit, prange, types, uint32, uint64
from numba.core import cgutils
from numba.extending import intrinsic, overload

PREFETCH_AHEAD = 8  # posting lists prefetched ahead of the one being scattered
PREFETCH_MAX = 1024  # postings prefetched per list (longer lists stream well by themselves)
SELECT_RUN = 64  # documents tested at once against the k-th score in the selection pass
BLOCK_DENSE = 16384  # documents per score block for queries with dense words (64 KB)
BLOCK_SPARSE = 65536  # ... for queries without (256 KB: fewer list segments per query)
MIN_CHUNK_DOCS = 8192  # fewest documents per unit of work of a multi-threaded search
CHUNKS_PER_THREAD = 2  # units of work per thread (each costs ~10 us of list searches on 100k docs)
THREADED_MIN_COST = 150_000  # postings (query_cost) for which a default search uses all threads
DENSE_SPEEDUP = 8  # a dense column costs about as much as num_docs / 8 postings


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


@njit(cache=True, nogil=True)
def query_cost(post_indptr, term_slot, q_terms, q_weights, num_docs):  # noqa: ANN001, ANN201
    """Work of a search, in postings (a dense word counts num_docs / DENSE_SPEEDUP); -1 if the query
    is not canonical (see is_canonical_query)."""
    if not is_canonical_query(q_terms, q_weights, term_slot.shape[0]):
        return -1
    cost = 0
    for j in range(q_terms.shape[0]):
        t = q_terms[j]
        if term_slot[t] >= 0:
            cost += num_docs // DENSE_SPEEDUP
        else:
            cost += post_indptr[t + 1] - post_indptr[t]
    return cost


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
def _prefetch_segment(post_docs, post_weights, start, end, length):  # noqa: ANN001, ANN202
    """Prefetch `length` postings from `start` (not past `end`): one hint per 64-byte line."""
    stop = min(end, start + min(length, uint64(PREFETCH_MAX)))
    p = start
    while p < stop:
        _prefetch(post_docs, p)
        p += uint64(16)  # one line of int32 ids
    step = uint64(64 // post_weights.itemsize)  # one line of float32 or float16 weights
    p = start
    while p < stop:
        _prefetch(post_weights, p)
        p += step


@njit(cache=True, nogil=True)
def _gallop(post_docs, start, end, doc, guess):  # noqa: ANN001, ANN202
    """First position in [start, end) of a doc-sorted posting list whose doc id is >= `doc` (end if
    none), searched from `guess` in [start, end) outwards in doubling steps: a good guess costs a
    few neighbouring cache lines instead of a chain of binary-search misses."""
    if start == end:
        return start
    step = 1
    if post_docs[guess] < doc:  # the answer is in (guess, end]
        lo = guess
        while lo + step < end and post_docs[lo + step] < doc:
            lo += step
            step *= 2
        hi = min(lo + step, end)
    else:  # the answer is in [start, guess]
        hi = guess
        while hi - step >= start and post_docs[hi - step] >= doc:
            hi -= step
            step *= 2
        lo = max(hi - step, start - 1)  # post_docs[lo] < doc, or lo is before the list
    lo += 1  # binary search in [lo, hi) (np.searchsorted on a slice measured ~0.5 us a call)
    while lo < hi:
        mid = (lo + hi) // 2
        if post_docs[mid] < doc:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True, nogil=True)
def _lower_bound(post_docs, start, end, doc, num_docs):  # noqa: ANN001, ANN202
    """_gallop from the interpolated position (doc ids spread over [0, num_docs)), 0 <= doc < N."""
    return _gallop(post_docs, start, end, doc, start + (end - start) * doc // num_docs)


@njit(cache=True, nogil=True)
def _add_dense_run(block, dense, term_slot, q_terms, q_weights, j, b0, nb):  # noqa: ANN001, ANN202
    """block[i] += q_w * dense[w, b0 + i] for the run of up to 4 dense words starting at query word
    j, in one pass over the block: (((acc + p1) + p2) + p3) + p4, the same float32 additions in the
    same order as one pass per word. Returns the index of the next query word."""
    nq = q_terms.shape[0]
    o = uint64(b0)
    c0, w0 = dense[term_slot[q_terms[j]]], q_weights[j]
    run = 1
    while run < 4 and j + run < nq and term_slot[q_terms[j + run]] >= 0:
        run += 1
    if run == 1:
        for i in range(nb):
            block[i] += w0 * as_f32(c0[o + i])
        return j + 1
    c1, w1 = dense[term_slot[q_terms[j + 1]]], q_weights[j + 1]
    if run == 2:
        for i in range(nb):
            block[i] = (block[i] + w0 * as_f32(c0[o + i])) + w1 * as_f32(c1[o + i])
        return j + 2
    c2, w2 = dense[term_slot[q_terms[j + 2]]], q_weights[j + 2]
    if run == 3:
        for i in range(nb):
            a = (block[i] + w0 * as_f32(c0[o + i])) + w1 * as_f32(c1[o + i])
            block[i] = a + w2 * as_f32(c2[o + i])
        return j + 3
    c3, w3 = dense[term_slot[q_terms[j + 3]]], q_weights[j + 3]
    for i in range(nb):
        a = (block[i] + w0 * as_f32(c0[o + i])) + w1 * as_f32(c1[o + i])
        block[i] = (a + w2 * as_f32(c2[o + i])) + w3 * as_f32(c3[o + i])
    return j + 4


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
def _heap_sort(hs, hi, n):  # noqa: ANN001, ANN202
    """Heap of n entries -> sorted best first (move the worst to the end, repeatedly)."""
    for m in range(n - 1, 0, -1):
        ts = hs[0]
        hs[0] = hs[m]
        hs[m] = ts
        ti = hi[0]
        hi[0] = hi[m]
        hi[m] = ti
        _sift_down(hs, hi, 0, m)


@njit(cache=True, nogil=True)
def _select_block(block, b0, nb, deleted, k, hs, hi, n):  # noqa: ANN001, ANN202
    """Push the documents b0 .. b0+nb-1 (scores in block[:nb], score > 0, not deleted) into the
    top-k heap hs/hi holding n entries; zeroes block[:nb]. Returns the new n.

    Documents are visited in ascending id order, so a candidate must beat the current k-th score
    strictly: an equal score already in the heap belongs to a lower id, which wins the tie.
    """
    thr = hs[0] if n == k else np.float32(0.0)
    end = uint64(nb)
    c0 = uint64(0)
    while c0 < end:
        c1 = min(end, c0 + uint64(SELECT_RUN))
        above = 0  # an int sum vectorises; a bool `|=` does not (measured 10x slower)
        for i in range(c0, c1):
            above += np.int32(block[i] > thr)
        if above:
            for i in range(c0, c1):
                s = block[i]
                if s > thr and not deleted[b0 + i]:
                    if n < k:  # push
                        hs[n] = s
                        hi[n] = b0 + i
                        _sift_up(hs, hi, n)
                        n += 1
                    else:  # replace the worst
                        hs[0] = s
                        hi[0] = b0 + i
                        _sift_down(hs, hi, 0, n)
                    if n == k:
                        thr = hs[0]
        for i in range(c0, c1):
            block[i] = 0.0
        c0 = c1
    return n


@njit(cache=True, nogil=True)
def block_size(term_slot, q_terms):  # noqa: ANN001, ANN201
    """Documents per score block for this query: BLOCK_DENSE if it has a dense word, else
    BLOCK_SPARSE (short posting lists gain nothing from L1 blocks and pay per list segment)."""
    for j in range(q_terms.shape[0]):
        if term_slot[q_terms[j]] >= 0:
            return BLOCK_DENSE
    return BLOCK_SPARSE


@njit(cache=True, nogil=True)
def search_range(
    post_indptr, post_docs, post_weights, term_slot, dense, deleted,
    q_terms, q_weights, d0, d1, k, block_docs, hs, hi,
):  # noqa: ANN001, ANN201  # fmt: skip
    """Top k of the documents [d0, d1) into the heap hs/hi (unsorted); returns the number of hits.

    The range is scored in blocks of `block_docs` documents: for each block, every query word in
    ascending order adds its contributions (dense columns a run at a time, posting lists from a
    per-word cursor), then the block's hits enter the heap. Per document this adds the same products
    in the same order as a whole-range pass.
    """
    nq = q_terms.shape[0]
    N = deleted.shape[0]
    if d0 >= d1:  # an empty range (e.g. a last chunk past N)
        return 0
    block_docs = max(1, min(block_docs, d1 - d0))
    cursor = np.empty(nq, np.uint64)  # next posting of each sparse word
    end = np.empty(nq, np.uint64)
    ahead = np.empty(nq, np.uint64)  # postings of each word expected in one block (prefetched)
    if d0 > 0:  # the lines around where the lists' searches start (see _lower_bound), all at once
        for j in range(nq):
            s, e = post_indptr[q_terms[j]], post_indptr[q_terms[j] + 1]
            guess = s + (e - s) * d0 // N
            for p in range(max(s, guess - 48), min(e, guess + 49), 16):
                _prefetch(post_docs, uint64(p))
    for j in range(nq):
        t = q_terms[j]
        s, e = post_indptr[t], post_indptr[t + 1]
        if d0 > 0:
            s = _lower_bound(post_docs, s, e, d0, N)
        cursor[j], end[j] = s, e
        ahead[j] = uint64((e - s) * block_docs // (N - d0) + 16)  # postings s:e cover docs d0:N
    # allocated here, not passed in: measured faster (LLVM then knows nothing aliases it)
    block = np.zeros(block_docs, np.float32)  # (block_docs,) scores of the current block
    n = 0
    for b0 in range(d0, d1, block_docs):
        b1 = min(b0 + block_docs, d1)
        nb = uint64(b1 - b0)
        ub0, ub1 = uint32(b0), uint32(b1)
        for j in range(min(PREFETCH_AHEAD, nq)):
            _prefetch_segment(post_docs, post_weights, cursor[j], end[j], ahead[j])
        j = 0
        while j < nq:
            if j + PREFETCH_AHEAD < nq:
                a = j + PREFETCH_AHEAD
                _prefetch_segment(post_docs, post_weights, cursor[a], end[a], ahead[a])
            t = uint32(q_terms[j])
            if term_slot[t] >= 0:
                j = _add_dense_run(block, dense, term_slot, q_terms, q_weights, j, b0, nb)
                continue
            w = q_weights[j]
            p, e = cursor[j], end[j]
            if b1 == N:  # the last block: all the rest of the list, no test per posting
                while p < e:
                    block[uint32(post_docs[p]) - ub0] += w * as_f32(post_weights[p])
                    p += uint64(1)
            else:  # block[d - b0] += w * weight for the postings with doc d < b1
                while p < e:  # (searching the block's end first measured slower on Zipf queries)
                    d = uint32(post_docs[p])
                    if d >= ub1:
                        break
                    block[d - ub0] += w * as_f32(post_weights[p])
                    p += uint64(1)
            cursor[j] = p
            j += 1
        n = _select_block(block, b0, nb, deleted, k, hs, hi, n)
    return n


@njit(cache=True, nogil=True)
def search_one(
    post_indptr, post_docs, post_weights, term_slot, dense, deleted,
    q_terms, q_weights, k, out_ids, out_scores,
):  # noqa: ANN001, ANN201  # fmt: skip
    """Exact top-k of one query into out_ids/out_scores (best first), on the calling thread.

    Returns:
        The number of hits, or -1 (nothing done) if the query is not canonical (word ids strictly
        ascending in [0, V), weights finite and > 0): the caller canonicalises and calls again. The
        check is folded in here to save a second dispatch from Python (~1 us) per query.
    """
    if not is_canonical_query(q_terms, q_weights, term_slot.shape[0]):
        return -1
    block_docs = block_size(term_slot, q_terms)
    n = search_range(
        post_indptr, post_docs, post_weights, term_slot, dense, deleted,
        q_terms, q_weights, 0, deleted.shape[0], k, block_docs, out_scores, out_ids,
    )  # fmt: skip
    _heap_sort(out_scores, out_ids, n)
    return n


# ------------------------------------------------------------------------ search with helper threads
@intrinsic
def _fetch_add(typingctx, array, index, value):  # noqa: ANN001, ANN202 (numba intrinsic signature)
    """Atomically `array[index] += value` (int64, sequentially consistent); returns the old value."""
    if not (isinstance(array, types.Array) and array.dtype == types.int64):
        return None
    sig = types.int64(array, index, value)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
        val = context.cast(builder, args[2], signature.args[2], types.int64)
        return builder.atomic_rmw("add", ptr, val, "seq_cst")

    return sig, codegen


@intrinsic
def _cycles(typingctx):  # noqa: ANN001, ANN202 (numba intrinsic signature)
    """The CPU's time-stamp counter (`llvm.readcyclecounter`): a cheap clock for short waits."""
    sig = types.uint64()

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        fnty = ir.FunctionType(ir.IntType(64), [])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.readcyclecounter")
        return builder.call(fn, [])

    return sig, codegen


@njit(cache=True, nogil=True)
def _score_chunk(
    post_indptr, post_docs, post_weights, term_slot, dense, deleted,
    q_terms, q_weights, k, chunk_docs, c, done, chunk_ids, chunk_scores, chunk_hits,
):  # noqa: ANN001, ANN202  # fmt: skip
    """Top k of chunk c into row c of chunk_ids/chunk_scores/chunk_hits, then done[c] = 1.

    The heap is built in private buffers and copied when complete: when two threads score the same
    chunk (see search_chunks), both write the same final values, so a reader never sees a half-built
    heap."""
    d0 = c * chunk_docs
    d1 = min(deleted.shape[0], d0 + chunk_docs)
    hs, hi = np.empty(k, np.float32), np.empty(k, np.int64)
    n = search_range(
        post_indptr, post_docs, post_weights, term_slot, dense, deleted,
        q_terms, q_weights, d0, d1, k, block_size(term_slot, q_terms), hs, hi,
    )  # fmt: skip
    chunk_scores[c, :n] = hs[:n]
    chunk_ids[c, :n] = hi[:n]
    chunk_hits[c] = n
    _fetch_add(done, c, 1)  # sequentially consistent: the row is visible before the flag


@njit(cache=True, nogil=True)
def search_chunks(
    post_indptr, post_docs, post_weights, term_slot, dense, deleted,
    q_terms, q_weights, k, chunk_docs, claimed, done, chunk_ids, chunk_scores, chunk_hits,
    searching_thread,
):  # noqa: ANN001, ANN201  # fmt: skip
    """Score the chunks of `chunk_docs` documents of one canonical query, with other threads.

    Called at the same time by the searching thread and by helper threads: each claims the next
    chunk with an atomic counter (claimed[0]) and scores it (`_score_chunk`) until none is left. A
    helper that starts late finds nothing left and returns. The searching thread then makes sure
    every chunk is done: it waits for a chunk a helper is still scoring at most about as long as it
    took itself per chunk, then scores that chunk too (same values), so a helper descheduled by other
    load costs at most about one chunk, never a whole time slice.

    Returns:
        The number of chunks this call scored.
    """
    num_chunks = chunk_hits.shape[0]
    scored = 0
    start = _cycles()
    while True:
        c = _fetch_add(claimed, 0, 1)
        if c >= num_chunks:
            break
        _score_chunk(
            post_indptr, post_docs, post_weights, term_slot, dense, deleted,
            q_terms, q_weights, k, chunk_docs, c, done, chunk_ids, chunk_scores, chunk_hits,
        )  # fmt: skip
        scored += 1
    if not searching_thread:
        return scored
    # cycles per chunk on this thread (0 if the helpers took every chunk: then the first chunk
    # left to check is scored here at once, and timed)
    patience = (_cycles() - start) // uint64(scored) if scored else uint64(0)
    for c in range(num_chunks):
        since = _cycles()
        while _fetch_add(done, c, 0) == 0 and _cycles() - since < patience:
            pass
        if _fetch_add(done, c, 0) == 0:
            _score_chunk(
                post_indptr, post_docs, post_weights, term_slot, dense, deleted,
                q_terms, q_weights, k, chunk_docs, c, done, chunk_ids, chunk_scores, chunk_hits,
            )  # fmt: skip
            if scored == 0:
                patience = _cycles() - since
            scored += 1
    return scored


@njit(cache=True, nogil=True)
def merge_chunks(chunk_ids, chunk_scores, chunk_hits, k, out_ids, out_scores):  # noqa: ANN001, ANN201
    """The top k of the chunks' top-k lists into out_ids/out_scores, best first; returns the count.

    Exact: each chunk's list holds its k best (ties to the lower id), so the k best of the union are
    the k best overall; the heap keeps (score desc, doc id asc) as everywhere else.
    """
    n = 0
    for c in range(chunk_hits.shape[0]):
        for x in range(chunk_hits[c]):
            s, d = chunk_scores[c, x], chunk_ids[c, x]
            if n < k:
                out_scores[n] = s
                out_ids[n] = d
                _sift_up(out_scores, out_ids, n)
                n += 1
            elif s > out_scores[0] or (s == out_scores[0] and d < out_ids[0]):
                out_scores[0] = s
                out_ids[0] = d
                _sift_down(out_scores, out_ids, 0, n)
    _heap_sort(out_scores, out_ids, n)
    return n


# --------------------------------------------------------------------------------------- batches
@njit(cache=True, nogil=True, parallel=True)
def search_many(
    post_indptr, post_docs, post_weights, term_slot, dense, deleted,
    q_indptr, q_terms, q_weights, k, num_chunks, out_ids, out_scores,
):  # noqa: ANN001, ANN201  # fmt: skip
    """search_one for every row of a canonical query CSR, in parallel over chunks of queries.

    Use several chunks per thread (handed out one at a time, see `parallel`): a thread descheduled by
    other load on a shared machine then holds up one small chunk, not a fixed half of the batch. Each
    out_ids (Q, k) int64 and out_scores (Q, k) float32 must be
    pre-filled with -1 and 0 (the padding of queries with fewer than k hits).

    Returns:
        (Q,) number of hits per query.
    """
    Q = q_indptr.shape[0] - 1
    counts = np.zeros(Q, np.int64)
    for c in prange(num_chunks):
        for q in range(c * Q // num_chunks, (c + 1) * Q // num_chunks):
            s, e = q_indptr[q], q_indptr[q + 1]
            if e > s:
                counts[q] = search_one(
                    post_indptr, post_docs, post_weights, term_slot, dense, deleted,
                    q_terms[s:e], q_weights[s:e], k, out_ids[q], out_scores[q],
                )  # fmt: skip
    return counts
