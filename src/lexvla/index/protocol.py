"""LexicalIndex: what the search engine and the server need from an index, whatever holds the vectors.

Two backends implement it: `SparseIndex` (embedded, one machine) and `MilvusIndex` (a Milvus server or
a Milvus Lite file). Both number documents 0..num_docs-1 in insertion order, so the same shards built
into either give the same document ids, hits, scores (within float32 summation order) and per-word
explanations. Code that holds a `LexicalIndex` never needs to know which backend it is.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import ArrayLike

from lexvla.index.sparse import Hit


@runtime_checkable
class LexicalIndex(Protocol):
    """Exact top-k inner-product search over sparse lexical vectors, with per-word explanations."""

    @property
    def vocab(self) -> list[str]:
        """The V words of the lexical vocabulary, in dimension order."""
        ...

    @property
    def model_ref(self) -> dict[str, Any]:
        """The JSON-able reference of the encoder the vectors came from (`{"name": ...}`)."""
        ...

    @property
    def num_docs(self) -> int:
        """Document ids are 0..num_docs-1 (deleted documents keep their id)."""
        ...

    def __len__(self) -> int:
        """Active (not deleted) documents."""
        ...

    def search(
        self,
        query_indices: ArrayLike,
        query_values: ArrayLike,
        k: int = 10,
        *,
        explain: bool = False,
    ) -> list[Hit]:
        """The k best documents of a query (word ids, weights), best first; ties to the lower id."""
        ...

    def explain(
        self, doc: int, query_indices: ArrayLike, query_values: ArrayLike
    ) -> list[tuple[str, float]]:
        """(word, query weight x document weight) of the shared words, largest first."""
        ...

    def document(self, doc: int) -> dict[str, Any]:
        """The metadata of document `doc` (LexVLAError if it is not in the index)."""
        ...

    def vector(self, doc: int) -> tuple[np.ndarray, np.ndarray]:
        """(word ids (n,) int32 ascending, weights (n,) float32) of document `doc`."""
        ...

    def is_deleted(self, doc: int) -> bool:
        """Whether `doc` (in 0..num_docs-1) was deleted."""
        ...
