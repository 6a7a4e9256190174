"""Sparse lexical index and search (arrays in, ids and scores out; never imports models or torch).

- `SparseIndex`: embedded exact inverted index on disk (memory-mapped, atomic commits, deletions).
- `build_index`: build or extend an index from a directory of corpus shards (resumable).
- `shards`: the corpus shard format written by batch encoding (`write_shard`, `read_shard`, ...).
- `LexicalIndex`: the interface the search engine and server use; `SparseIndex` and `MilvusIndex`
  (`lexvla.index.milvus`, the `milvus` extra) implement it.
- `export_index`: Anserini / PISA JSON lines (integer impacts), Elasticsearch / OpenSearch bulk NDJSON,
  Qdrant sparse-vector points.

numba (the `index` extra) compiles the kernels every index operation runs (`_kernels`: CSR checks,
posting lists, search); it is imported on the first such call, not by `import lexvla.index`.
"""

from __future__ import annotations

from lexvla.index._io import vocab_hash
from lexvla.index.build import build_index
from lexvla.index.export import EXPORT_FORMATS, export_index, export_jsonl
from lexvla.index.protocol import LexicalIndex
from lexvla.index.shards import (
    Shard,
    ShardInfo,
    ShardManifest,
    init_shard_dir,
    iter_shards,
    read_shard,
    read_shard_manifest,
    read_shard_vocab,
    shard_finished,
    write_shard,
)
from lexvla.index.sparse import Hit, SparseIndex

__all__ = [
    "EXPORT_FORMATS",
    "Hit",
    "LexicalIndex",
    "Shard",
    "ShardInfo",
    "ShardManifest",
    "SparseIndex",
    "build_index",
    "export_index",
    "export_jsonl",
    "init_shard_dir",
    "iter_shards",
    "read_shard",
    "read_shard_manifest",
    "read_shard_vocab",
    "shard_finished",
    "vocab_hash",
    "write_shard",
]
