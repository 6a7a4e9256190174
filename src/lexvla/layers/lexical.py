"""The lexical mapper: activation, max-pool over patches, normalisation and sparsification.

Tensors in, tensors out. The LexVLA mapper is `normalize(max_p elu(H_p · Zᵀ) + 1)`. Because `elu + 1` is
monotone, max-then-activate equals activate-then-max, so pooling works on the raw logits and the
activated (B, P, V) tensor is never needed (:func:`lexical_max_pool`).
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lexvla.config import POOL_SEARCH_DTYPES, POOLING_IMPLS


def lexical_activation(logits: Tensor) -> Tensor:
    """`elu(x) + 1`: strictly positive, monotone, ≈ x + 1 for x > 0 and → 0 for x → -∞."""
    return F.elu(logits) + 1.0


class LogitAffine(nn.Module):
    """A learnt scale and offset on one modality's lexical logits: `exp(log_scale) · x + offset`.

    The scale is positive, so the map is monotone and commutes with the max over patches. With an
    offset well below zero most words fall into the exponential part of `elu + 1` (weight ≈ e^x ≈ 0)
    and only the words whose logits stand out stay active: this is what lets a model become sparse
    (docs/method.md, "What makes the vectors sparse"). Identity at `scale=1, offset=0`.
    """

    def __init__(self, scale: float = 1.0, offset: float = 0.0) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"the logit scale must be positive, got {scale}")
        self.log_scale = nn.Parameter(torch.full((1,), math.log(scale)))
        self.offset = nn.Parameter(torch.full((1,), float(offset)))

    def forward(self, logits: Tensor) -> Tensor:
        return logits * self.log_scale.exp().to(logits.dtype) + self.offset.to(logits.dtype)


def lexical_weights(logits: Tensor) -> Tensor:
    """Activate then L2-normalise over the vocabulary (last) dimension: `(..., V) -> (..., V)`."""
    return F.normalize(lexical_activation(logits), dim=-1)


def naive_lexical_max_pool(hidden: Tensor, codebook: Tensor) -> Tensor:
    """Reference max-pool: materialises the (B, P, V) patch logits. Kept for tests and benchmarks.

    Args:
        hidden: patch features after the adapter, (B, P, D).
        codebook: image codebook, (V, D).

    Returns:
        max over patches of `hidden · codebookᵀ`, (B, V).
    """
    patch_logits = hidden @ codebook.t()  # (B, P, V)
    return patch_logits.max(dim=1).values  # (B, V)


def native_bf16_matmul(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively on `device` (CUDA with bf16, CPUs with AVX512-BF16/AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, may go away
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def wants_bf16(name: str, device: torch.device) -> bool:
    """Whether a precision choice means bf16 on `device`: "bfloat16", or "auto" where bf16 is native."""
    return name == "bfloat16" or (name == "auto" and native_bf16_matmul(device))


def bf16_autocast(name: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when the precision choice `name` means bf16 there
    (:func:`wants_bf16`), else a no-op."""
    if not wants_bf16(name, device):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def pool_search_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The arg-max search dtype of the fused pool: None (exact, the inputs' dtype) for "float32",
    bf16 for "bfloat16", and for "auto" bf16 where it is native on `device`, else exact."""
    if name not in POOL_SEARCH_DTYPES:
        raise ValueError(
            f"unknown pool search dtype {name!r}: use one of {list(POOL_SEARCH_DTYPES)}"
        )
    return torch.bfloat16 if wants_bf16(name, device) else None


def lexical_max_pool(
    hidden: Tensor,
    codebook: Tensor,
    *,
    impl: str = "fused",
    chunk_size: int = 4096,
    search_dtype: str = "float32",
) -> Tensor:
    """Max over patches of the patch logits `hidden · codebookᵀ`: (B, P, D), (V, D) -> (B, V).

    `impl="fused"` computes it in vocabulary chunks and keeps only the arg-max patch per (image, word)
    for the backward pass; `impl="naive"` is the reference. Both give the same values and gradients.
    `search_dtype="bfloat16"` (fused only) searches the arg-max patch in bf16 and recomputes its value
    exactly: faster where bf16 matmuls are native, may pick another patch on near-ties; "auto" does
    so only where bf16 is native (:func:`pool_search_dtype`).
    """
    search = pool_search_dtype(search_dtype, hidden.device)
    if impl == "naive":
        return naive_lexical_max_pool(hidden, codebook)
    if impl == "fused":
        from lexvla.layers.fused_pool import fused_lexical_max_pool

        return fused_lexical_max_pool(hidden, codebook, chunk_size, search_dtype=search)
    raise ValueError(f"unknown pooling impl {impl!r}: use one of {list(POOLING_IMPLS)}")


def default_threshold(vocab_size: int) -> float:
    """The paper's sparsification threshold `1 / sqrt(V)`.

    For an L2-normalised vector, entries below it can be at most V of them and carry little mass.
    """
    return 1.0 / math.sqrt(vocab_size)


def sparsify_threshold(weights: Tensor, threshold: float | None = None) -> Tensor:
    """Zero entries below `threshold` (default `1/sqrt(V)`); not re-normalised. (..., V) -> (..., V)."""
    if threshold is None:
        threshold = default_threshold(weights.shape[-1])
    return torch.where(weights >= threshold, weights, torch.zeros_like(weights))


def sparsify_topk(weights: Tensor, k: int) -> Tensor:
    """Keep the `k` largest entries of each vector (ties: lowest index first); not re-normalised."""
    k = min(k, weights.shape[-1])
    # Stable sort so ties resolve to the lowest word id, identically on every device.
    order = torch.sort(weights, dim=-1, descending=True, stable=True).indices[..., :k]
    mask = torch.zeros_like(weights, dtype=torch.bool).scatter_(-1, order, True)
    return torch.where(mask, weights, torch.zeros_like(weights))


def sparsify(
    weights: Tensor, mode: str, *, threshold: float = 0.0, top_k: int = 512, max_words: int = 0
) -> Tensor:
    """Apply the configured sparsification (`lexvla.config.SPARSIFY_MODES`: "threshold", "topk" or
    "none"), then cap at `max_words`."""
    if mode == "threshold":
        weights = sparsify_threshold(weights, threshold if threshold > 0 else None)
    elif mode == "topk":
        weights = sparsify_topk(weights, top_k)
    elif mode != "none":
        raise ValueError(f"unknown sparsify mode {mode!r}: use 'threshold', 'topk' or 'none'")
    if max_words > 0:
        weights = sparsify_topk(weights, max_words)
    return weights


class SparseLexical(NamedTuple):
    """A batch of sparse lexical vectors in CSR form (one row per vector)."""

    indptr: Tensor  # (B + 1,) int64
    indices: Tensor  # (nnz,) int64 word ids, increasing within a row
    values: Tensor  # (nnz,) weights
    vocab_size: int

    def to_dense(self) -> Tensor:
        """(B, V) dense tensor."""
        rows = torch.repeat_interleave(
            torch.arange(len(self.indptr) - 1, device=self.indptr.device), self.indptr.diff()
        )
        dense = torch.zeros(
            len(self.indptr) - 1,
            self.vocab_size,
            dtype=self.values.dtype,
            device=self.values.device,
        )
        dense[rows, self.indices] = self.values
        return dense


def to_sparse(weights: Tensor) -> SparseLexical:
    """CSR form of the non-zero entries of (B, V) `weights`."""
    nonzero = weights != 0
    rows, cols = nonzero.nonzero(as_tuple=True)  # row-major order: cols increase within a row
    counts = nonzero.sum(dim=1)
    indptr = torch.zeros(weights.shape[0] + 1, dtype=torch.long, device=weights.device)
    indptr[1:] = counts.cumsum(0)
    return SparseLexical(indptr, cols, weights[rows, cols], weights.shape[-1])
