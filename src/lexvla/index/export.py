"""Export an index to the JSON-lines format of Anserini / PISA impact indexes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from lexvla.index import _io
from lexvla.index.sparse import SparseIndex


def export_jsonl(index: SparseIndex, path: str | Path, *, scale: float = 100.0) -> int:
    """Write every active document as `{"id": key, "contents": "", "vector": {word: impact}}`.

    This is the input of Anserini's `JsonVectorCollection` (with `-impact -pretokenized`) and of PISA's
    JSON parsers. Impacts are integers, `round(weight * scale)` (half to even); words whose impact
    rounds to 0 are dropped. The file is written atomically.

    Args:
        index: the index to export.
        path: the output `.jsonl` file.
        scale: the quantisation factor (100 by convention for weights in [0, 1]).

    Returns:
        The number of documents written.
    """
    path = Path(path)
    g = index._gen
    a, words, keys = g.arrays, index.vocab, g.keys()
    indptr, deleted = np.asarray(a["doc_indptr"]), np.asarray(a["deleted"])
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    written = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for doc in np.flatnonzero(~deleted):
                s, e = indptr[doc], indptr[doc + 1]
                impacts = np.rint(a["doc_weights"][s:e].astype(np.float64) * scale).astype(np.int64)
                keep = impacts > 0
                vector = dict(
                    zip([words[t] for t in a["doc_terms"][s:e][keep]], impacts[keep].tolist())
                )
                f.write(
                    json.dumps(
                        {"id": keys[doc], "contents": "", "vector": vector}, ensure_ascii=False
                    )
                )
                f.write("\n")
                written += 1
            f.flush()
            _io.fsync_file(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return written
