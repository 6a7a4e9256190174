"""Products whose rows do not depend on what else is in the batch (tensors in, tensors out).

A BLAS picks its kernel, blocking and split of the reduction by the matrix's shape, so one row of
`x · Wᵀ` can round differently when it is computed alone (M = 1: a matrix-vector kernel) than inside
a batch of 16 (measured on MKL: different last bits for M < 16 on one thread, M < 4 on two). A
search server that batches concurrent queries then answers a query slightly differently from the
same query sent alone. :func:`tiled_linear` always multiplies tiles of exactly `tile` rows (the last
one padded with zeros), so every row meets the same kernel at the same shape whatever the batch.
The text tower uses it off the CPU; on a CPU with oneDNN its packed float32 products are
row-independent by themselves and faster (`models.text_inference.InferenceProducts`).

Element-wise functions have the same trap: a vectorised loop computes the tensor's last few elements
(those after the last full vector) with scalar code, whose `exp` rounds differently, so the last word
of a (1, V) row can differ from the same row inside (8, V) when V is not a multiple of the vector
width. :func:`rowwise` applies such a function to each row as a tensor of its own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

ROW_TILE = 16


def tiled_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, tile: int = ROW_TILE
) -> Tensor:
    """`F.linear(x, weight, bias)` computed in tiles of exactly `tile` rows: (..., K) -> (..., N).

    Each output row depends only on its input row (and the thread count), not on the other rows or
    their number. Differentiable, but meant for inference (the padding costs up to `tile - 1` rows).
    """
    if tile < 1:
        raise ValueError(f"tile must be a positive number of rows, got {tile}")
    flat = x.reshape(-1, x.shape[-1])  # (M, K)
    rows = flat.shape[0]
    padded = -(-rows // tile) * tile
    if padded != rows:
        flat = torch.cat([flat, flat.new_zeros(padded - rows, flat.shape[1])])
    out = torch.cat([F.linear(part, weight, bias) for part in flat.split(tile)])[:rows]  # (M, N)
    return out.view(*x.shape[:-1], weight.shape[0])


def rowwise(function: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """`function` (element-wise) applied to each row of (B, V) `x` as its own (V,) tensor: every row
    meets the same loop at the same shape whatever B is. For inference (B calls of a few µs each)."""
    return torch.stack([function(row) for row in x.unbind(0)]) if x.shape[0] > 1 else function(x)
