"""Export an index for the engines people already run for learned sparse vectors.

Formats (`export_index(index, path, format)`, `lexvla index export --format`):

- `anserini` / `pisa`: Anserini's `JsonVectorCollection`, which PISA reads too: one line per document,
  `{"id": key, "contents": "", "vector": {word: impact}}` with integer impacts
  `round(weight * scale)` (half to even); words whose impact rounds to 0 are dropped.
- `elasticsearch` / `opensearch`: a `_bulk` request body (NDJSON): per document the action line
  `{"index": {"_id": key}}` and the source line `{"key": key, "meta": {...}, "words": {word: weight}}`,
  for a `words` field mapped as `rank_features` (or Elasticsearch's `sparse_vector`); weights are
  the stored float32 values (> 0, as those field types require).
- `qdrant`: one Qdrant point per line, `{"id": doc, "vector": {"words": {"indices": [word ids],
  "values": [weights]}}, "payload": {...metadata}}`, for a collection with a sparse vector named
  `words` (the word ids are the index's vocabulary positions, `vocab.json`).

Deleted documents are left out. Every file is written atomically (a temporary file, then a rename),
so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lexvla._atomic import atomic_file
from lexvla.errors import LexVLAError
from lexvla.index.sparse import SparseIndex

VECTOR_FIELD = "words"  # the Elasticsearch/OpenSearch field and the Qdrant sparse vector name
ES_MAX_ID_BYTES = 512  # Elasticsearch and OpenSearch refuse longer `_id`s


class _Doc:
    """One active document of the index, as the format writers see it."""

    __slots__ = ("doc", "key", "metadata", "terms", "weights", "words")

    def __init__(
        self,
        doc: int,
        metadata: dict[str, Any],
        terms: np.ndarray,
        weights: np.ndarray,
        vocab: list[str],
    ) -> None:
        self.doc, self.metadata = doc, metadata
        self.key = str(metadata.get("key"))
        self.terms, self.weights = terms, weights
        self.words = [vocab[t] for t in terms.tolist()]


def _float32_values(weights: np.ndarray) -> list[float]:
    """The shortest decimals that read back as the same float32 values."""
    return [float(str(w)) for w in weights.astype(np.float32)]


def _anserini_lines(d: _Doc, scale: float) -> Iterator[dict[str, Any]]:
    impacts = np.rint(d.weights.astype(np.float64) * scale).astype(np.int64)
    vector = {w: int(i) for w, i in zip(d.words, impacts.tolist()) if i > 0}
    yield {"id": d.key, "contents": "", "vector": vector}


def _bulk_lines(d: _Doc, scale: float) -> Iterator[dict[str, Any]]:
    if len(d.key.encode("utf-8")) > ES_MAX_ID_BYTES:
        raise LexVLAError(
            f"key {d.key[:40]!r}... is longer than the {ES_MAX_ID_BYTES} bytes Elasticsearch and"
            " OpenSearch allow in an _id"
        )
    yield {"index": {"_id": d.key}}
    yield {
        "key": d.key,
        "meta": d.metadata,
        VECTOR_FIELD: dict(zip(d.words, _float32_values(d.weights))),
    }


def _qdrant_lines(d: _Doc, scale: float) -> Iterator[dict[str, Any]]:
    sparse = {"indices": d.terms.tolist(), "values": _float32_values(d.weights)}
    yield {"id": d.doc, "vector": {VECTOR_FIELD: sparse}, "payload": d.metadata}


_WRITERS: dict[str, Callable[[_Doc, float], Iterator[dict[str, Any]]]] = {
    "anserini": _anserini_lines,
    "pisa": _anserini_lines,
    "elasticsearch": _bulk_lines,
    "opensearch": _bulk_lines,
    "qdrant": _qdrant_lines,
}
EXPORT_FORMATS = tuple(_WRITERS)


def export_index(
    index: SparseIndex, path: str | Path, format: str = "anserini", *, scale: float = 100.0
) -> int:
    """Write every active document of `index` to `path` in `format` (see the module docstring).

    Args:
        index: the index to export.
        path: the output file (`.jsonl`; `.ndjson` for the bulk formats).
        format: one of EXPORT_FORMATS.
        scale: the quantisation factor of the integer impacts of anserini / pisa (100 by
            convention for weights in [0, 1]).

    Returns:
        The number of documents written.

    Raises:
        LexVLAError: an unknown format or an unusable path (nothing is written).
    """
    writer = _WRITERS.get(format)
    if writer is None:
        raise LexVLAError(
            f"unknown export format {format!r}: use one of {', '.join(EXPORT_FORMATS)}"
        )
    path = Path(path)
    if path.is_dir() or not path.parent.is_dir():
        raise LexVLAError(f"cannot write the export to {path}: give a file in an existing folder")
    written = 0
    with atomic_file(path) as tmp, open(tmp, "x", encoding="utf-8") as f:
        for doc in _active_docs(index):
            for line in writer(doc, scale):
                f.write(json.dumps(line, ensure_ascii=False))
                f.write("\n")
            written += 1
    return written


def export_jsonl(index: SparseIndex, path: str | Path, *, scale: float = 100.0) -> int:
    """Anserini / PISA JSON lines with integer impacts: `export_index(index, path, "anserini")`."""
    return export_index(index, path, "anserini", scale=scale)


def _active_docs(index: SparseIndex) -> Iterator[_Doc]:
    g = index._gen
    a, vocab = g.arrays, index.vocab
    indptr, deleted = np.asarray(a["doc_indptr"]), np.asarray(a["deleted"])
    for doc in np.flatnonzero(~deleted).tolist():
        s, e = indptr[doc], indptr[doc + 1]
        yield _Doc(doc, g.metadata(doc), a["doc_terms"][s:e], a["doc_weights"][s:e], vocab)
