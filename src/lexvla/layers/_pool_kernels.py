"""numba kernels of the fused lexical max-pool on the CPU: the bf16 search's arg-max, and the sparse
parts in float32.

The bf16 search's arg-max: the (B, P, c) bf16 scores of a vocabulary chunk reduced over patches to the
first maximal patch of every (image, word). `torch.max(dim=1)` over the middle dimension with indices
measured 15 ms per 4k-word chunk on this machine (75 ms of a 0.55 s training step); this loop, which
compares the bf16 bit patterns as integers ordered like the floats, takes about 1 ms.

After the arg-max patch of every (image, word) is known, three things remain, each touching one patch
row and one codebook row per (image, word):

    selected score   out[b, v]             = hidden[b, argmax[b, v]] · Z[v]
    codebook grad    grad_Z[v]             = Σ_b grad_out[b, v] · hidden[b, argmax[b, v]]
    hidden grad      grad_hidden[b, p]    += grad_out[b, v] · Z[v]        (p = argmax[b, v])

That is B·V·D multiply-adds each (0.4 G at B=32, V=21k, D=576). In torch they need a gathered
(B, V, D) copy or sparse COO products, which are bound by memory traffic: measured about 1.6 s for the
selected scores on one core of this machine, against 28 ms here. The loops walk the words in the
outer loop, so each codebook row is read once and the patch rows (B·P·D floats, a few MB) stay in cache.

Every kernel runs on numba's threads (`numba.set_num_threads`; the caller matches torch's count). The
words are split between threads in fixed contiguous ranges, and the hidden gradient sums one buffer
per thread in thread order, so for a given thread count the results are the same on every call.
Arithmetic is float32; the score's dot product may be reassociated (so it vectorises), the gradients
are summed in word and image order: results equal the torch path's up to float32 rounding order.
"""

from __future__ import annotations

import numpy as np
from numba import config, get_num_threads, njit, prange, set_num_threads


def use_threads(count: int) -> int:
    """Run the kernels on `count` threads (at most numba's pool size), e.g. torch's intra-op count;
    returns the count used."""
    set_num_threads(max(1, min(count, config.NUMBA_NUM_THREADS)))
    return get_num_threads()


@njit(nogil=True, cache=True, parallel=True)
def first_max_index_bf16(scores, out):  # noqa: ANN001, ANN201
    """out[b, v] = the first p maximising scores[b, p, v], for bf16 scores given as their int16 bits.

    A bf16 pattern x, read as a signed integer, orders like its float once the magnitude bits of a
    negative one are flipped (x ^ 0x7FFF when x < 0). The only difference from the float order: -0
    ranks below +0 (torch treats them as equal and keeps the first)."""
    batch, patches, words = scores.shape
    for b in prange(batch):
        best = np.empty(words, np.int32)
        for v in range(words):
            x = np.int32(scores[b, 0, v])
            best[v] = x ^ ((x >> 31) & 0x7FFF)
            out[b, v] = 0
        for p in range(1, patches):
            for v in range(words):
                x = np.int32(scores[b, p, v])
                key = x ^ ((x >> 31) & 0x7FFF)
                if key > best[v]:
                    best[v] = key
                    out[b, v] = p


@njit(nogil=True, cache=True, parallel=True, fastmath={"reassoc", "contract"})
def selected_scores(hidden, codebook, argmax, out):  # noqa: ANN001, ANN201
    """out[b, v] = hidden[b, argmax[b, v]] · codebook[v] for every word v of `codebook`."""
    batch = hidden.shape[0]
    words, dim = codebook.shape
    for v in prange(words):
        for b in range(batch):
            row = hidden[b, argmax[b, v]]
            acc = np.float32(0.0)
            for d in range(dim):
                acc += row[d] * codebook[v, d]
            out[b, v] = acc


@njit(nogil=True, cache=True, parallel=True)
def codebook_grad(hidden, argmax, grad_out, grad_codebook):  # noqa: ANN001, ANN201
    """grad_codebook[v] = Σ_b grad_out[b, v] · hidden[b, argmax[b, v]] for every word v."""
    batch = hidden.shape[0]
    words, dim = grad_codebook.shape
    for v in prange(words):
        for d in range(dim):
            grad_codebook[v, d] = 0.0
        for b in range(batch):
            g = grad_out[b, v]
            if g == 0.0:
                continue
            row = hidden[b, argmax[b, v]]
            for d in range(dim):
                grad_codebook[v, d] += g * row[d]


@njit(nogil=True, cache=True, parallel=True)
def hidden_grad(codebook, argmax, grad_out, partial, grad_hidden):  # noqa: ANN001, ANN201
    """grad_hidden[b, argmax[b, v]] += grad_out[b, v] · codebook[v] for every word v.

    `partial` is zeros of shape (T, B, P, D): the T ranges of words (T = the thread count) are added
    into one buffer each, in parallel, and the buffers are then summed in order (per image)."""
    batch = grad_out.shape[0]
    words, dim = codebook.shape
    threads = partial.shape[0]
    for t in prange(threads):
        target = partial[t]
        for v in range(t * words // threads, (t + 1) * words // threads):
            for b in range(batch):
                g = grad_out[b, v]
                if g == 0.0:
                    continue
                row = target[b, argmax[b, v]]
                for d in range(dim):
                    row[d] += g * codebook[v, d]
    for b in prange(batch):
        for t in range(threads):
            grad_hidden[b] += partial[t, b]
