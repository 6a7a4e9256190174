"""MilvusIndex: the SparseIndex API (add / delete / search / explain) over a Milvus collection.

    index = MilvusIndex.create("runs/x/milvus.db", vocab_words, {"model": "runs/x"})  # Milvus Lite file
    index = MilvusIndex.create("http://127.0.0.1:19530", vocab_words, {"model": "runs/x"})  # a server
    index.add(indptr, indices, values, metadata)       # inserts, then flush()
    hits = index.search(q_indices, q_values, k=10, explain=True)

The collection holds one row per document: `doc` (INT64 primary key, assigned by Milvus in insertion
order), `key` (VARCHAR), `meta` (JSON metadata) and `vec` (SPARSE_FLOAT_VECTOR, float32 weights) with a
SPARSE_INVERTED_INDEX for the inner product (metric IP). The vocabulary's hash and the model reference
are kept in the collection property "lexvla" and checked on open; the words themselves are passed by the
caller (they come with the model or the shards).

Differences from SparseIndex: Milvus computes the scores (float32, its own summation order, so equal to
SparseIndex's within ~1e-6 relative), breaks exact ties at the k-th place its own way (the returned hits
are then ordered by score, then doc id), `commit()` is `flush()`, and `k` is at most 16,384.
Requires the `milvus` extra (`pymilvus`, and `milvus-lite` for local files).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from lexvla.errors import LexVLAError
from lexvla.index import _io
from lexvla.index._csr import canonical_csr
from lexvla.index._writer import _check_metadata
from lexvla.index.sparse import Hit

try:
    from pymilvus import DataType, MilvusClient
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise LexVLAError(f"MilvusIndex needs pymilvus: pip install 'lexvla[milvus]' ({err})") from None

logger = logging.getLogger(__name__)

FORMAT = "lexvla-milvus"
PROPERTY = "lexvla"  # collection property holding {"format", "vocab_size", "vocab_sha256", "model"}
MAX_K = 16_384  # Milvus's largest top-k
KEY_LENGTH = 1024
INSERT_BATCH = 1_000


def _row_dicts(
    indptr: np.ndarray, indices: np.ndarray, values: np.ndarray
) -> list[dict[int, float]]:
    return [
        dict(zip(indices[s:e].tolist(), values[s:e].tolist()))
        for s, e in zip(indptr[:-1].tolist(), indptr[1:].tolist())
    ]


class MilvusIndex:
    """Lexical vectors in a Milvus collection, searched exactly (inverted index, inner product)."""

    def __init__(
        self, client: MilvusClient, collection: str, vocab: list[str], info: dict[str, Any]
    ) -> None:
        self.client = client
        self.collection = collection
        self._vocab = vocab
        self._info = info

    # ---------------------------------------------------------------------------------- lifecycle
    @classmethod
    def create(
        cls,
        uri: str,
        vocab: Sequence[str],
        model_ref: Mapping[str, Any],
        *,
        collection: str = "lexvla",
        token: str = "",
    ) -> MilvusIndex:
        """Create the collection (refused if it exists).

        Args:
            uri: a local `*.db` file (Milvus Lite) or a server, e.g. `http://127.0.0.1:19530`.
            vocab: the V words of the lexical vocabulary.
            model_ref: an opaque JSON-able dict naming the encoder.
            collection: the collection's name.
            token: credentials for a server (`user:password` or an API key), if it needs them.
        """
        words = _io.check_vocab(vocab, f"MilvusIndex.create({uri})")
        client = _connect(uri, token)
        if client.has_collection(collection):
            raise LexVLAError(
                f"Milvus collection {collection!r} already exists at {uri}; use MilvusIndex.open"
            )
        info = {
            "format": FORMAT,
            "vocab_size": len(words),
            "vocab_sha256": _io.vocab_hash(words),
            "model": dict(model_ref),
        }
        schema = MilvusClient.create_schema(auto_id=True, enable_dynamic_field=False)
        schema.add_field("doc", DataType.INT64, is_primary=True)
        schema.add_field("key", DataType.VARCHAR, max_length=KEY_LENGTH)
        schema.add_field("meta", DataType.JSON)
        schema.add_field("vec", DataType.SPARSE_FLOAT_VECTOR)
        params = client.prepare_index_params()
        params.add_index(field_name="vec", index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
        params.add_index(field_name="key", index_type="INVERTED")
        client.create_collection(collection, schema=schema, index_params=params)
        client.alter_collection_properties(collection, properties={PROPERTY: json.dumps(info)})
        return cls(client, collection, words, info)

    @classmethod
    def open(
        cls, uri: str, vocab: Sequence[str], *, collection: str = "lexvla", token: str = ""
    ) -> MilvusIndex:
        """Open an existing collection, checking that `vocab` is the one it was created with."""
        client = _connect(uri, token)
        if not client.has_collection(collection):
            raise LexVLAError(
                f"no Milvus collection {collection!r} at {uri}; create it with MilvusIndex.create"
            )
        try:
            info = json.loads(client.describe_collection(collection)["properties"][PROPERTY])
            assert info["format"] == FORMAT
        except (ValueError, KeyError, AssertionError, TypeError):
            raise LexVLAError(
                f"Milvus collection {collection!r} at {uri} was not made by MilvusIndex"
            ) from None
        if _io.vocab_hash(list(vocab)) != info["vocab_sha256"]:
            raise LexVLAError(
                f"Milvus collection {collection!r} holds vectors over another vocabulary"
                f" (sha256 {info['vocab_sha256'][:12]}); pass the vocabulary it was built with"
            )
        client.load_collection(collection)
        return cls(client, collection, list(vocab), info)

    def close(self) -> None:
        self.client.close()

    @property
    def vocab(self) -> list[str]:
        return self._vocab

    @property
    def model_ref(self) -> dict[str, Any]:
        return dict(self._info["model"])

    def __len__(self) -> int:
        return int(self.client.get_collection_stats(self.collection)["row_count"])

    # ------------------------------------------------------------------------------------ writing
    def add(
        self,
        indptr: ArrayLike,
        indices: ArrayLike,
        values: ArrayLike,
        metadata: Sequence[Mapping[str, Any]],
    ) -> int:
        """Insert documents (a CSR batch and one metadata dict with a unique "key" each), then flush."""
        ip, ix, vals = canonical_csr(indptr, indices, values, len(self._vocab), "MilvusIndex.add")
        _, keys = _check_metadata(metadata, len(ip) - 1)
        long_key = next((k for k in keys if len(k.encode()) > KEY_LENGTH), None)
        if long_key is not None:
            raise LexVLAError(
                f"MilvusIndex.add: key {long_key[:40]!r}... is longer than {KEY_LENGTH} bytes"
            )
        clash = self._existing(keys)
        if clash:
            raise LexVLAError(
                f"key {next(iter(clash))!r} is already in the index; delete it first to replace it"
            )
        vectors = _row_dicts(ip, ix, vals)
        for s in range(0, len(keys), INSERT_BATCH):
            rows = [
                {"key": k, "meta": dict(m), "vec": v}
                for k, m, v in zip(
                    keys[s : s + INSERT_BATCH],
                    metadata[s : s + INSERT_BATCH],
                    vectors[s : s + INSERT_BATCH],
                )
            ]
            self.client.insert(self.collection, rows)
        self.flush()
        return len(keys)

    def _existing(self, keys: Sequence[str]) -> dict[str, int]:
        """{key: doc} of the given keys present in the collection."""
        found: dict[str, int] = {}
        for s in range(0, len(keys), INSERT_BATCH):
            expr = f"key in {json.dumps(list(keys[s : s + INSERT_BATCH]))}"
            for row in self.client.query(
                self.collection, filter=expr, output_fields=["doc", "key"]
            ):
                found[row["key"]] = int(row["doc"])
        return found

    def delete(self, keys: Sequence[str]) -> int:
        """Delete documents by key, then flush. Returns how many existed (unknown keys are skipped)."""
        keys = [keys] if isinstance(keys, str) else list(dict.fromkeys(keys))
        found = self._existing(keys)
        if len(found) < len(keys):
            logger.warning(
                "delete: %d of %d keys are not in the index; skipped",
                len(keys) - len(found),
                len(keys),
            )
        if found:
            self.client.delete(self.collection, ids=list(found.values()))
            self.flush()
        return len(found)

    def flush(self) -> None:
        """Persist inserts and deletes (Milvus seals the growing segments)."""
        self.client.flush(self.collection)

    def commit(self) -> bool:
        """SparseIndex-compatible name for `flush()`."""
        self.flush()
        return True

    # ------------------------------------------------------------------------------------- search
    def _query_dict(self, query_indices: ArrayLike, query_values: ArrayLike) -> dict[int, float]:
        terms, weights = np.asarray(query_indices), np.asarray(query_values)
        _, t, w = canonical_csr(
            [0, terms.size], terms.reshape(-1), weights.reshape(-1), len(self._vocab), "query"
        )
        return dict(zip(t.tolist(), w.tolist()))

    def _search(
        self, queries: list[dict[int, float]], k: int, fields: list[str]
    ) -> list[list[dict[str, Any]]]:
        if not 1 <= k <= MAX_K:
            raise LexVLAError(f"k must be in [1, {MAX_K}] for Milvus, got {k}")
        res = self.client.search(
            self.collection, data=queries, anns_field="vec", limit=k, output_fields=fields,
            search_params={"metric_type": "IP"},
        )  # fmt: skip
        # only matching documents (score > 0), best first, ties in doc id (= insertion) order
        return [
            sorted((h for h in hits if h["distance"] > 0), key=lambda h: (-h["distance"], h["doc"]))
            for hits in res
        ]

    def search(
        self,
        query_indices: ArrayLike,
        query_values: ArrayLike,
        k: int = 10,
        *,
        explain: bool = False,
    ) -> list[Hit]:
        """Top-k hits of one query (see SparseIndex.search); explain fetches the documents' vectors."""
        query = self._query_dict(query_indices, query_values)
        if not query:
            logger.warning("query has no active words (no positive weights): no hits")
            return []
        fields = ["key", "meta"] + (["vec"] if explain else [])
        hits = []
        for h in self._search([query], k, fields)[0]:
            e = h["entity"]
            words = _explain(query, e["vec"], self._vocab) if explain else None
            hits.append(Hit(int(h["doc"]), e["key"], float(h["distance"]), e["meta"], words))
        return hits

    def search_ids(
        self, query_indices: ArrayLike, query_values: ArrayLike, k: int = 10
    ) -> tuple[np.ndarray, np.ndarray]:
        """(doc ids (m,) int64, scores (m,) float32), best first."""
        hits = self.search(query_indices, query_values, k)
        return np.array([h.doc for h in hits], np.int64), np.array(
            [h.score for h in hits], np.float32
        )

    def search_batch(
        self, q_indptr: ArrayLike, q_indices: ArrayLike, q_values: ArrayLike, k: int = 10
    ) -> tuple[np.ndarray, np.ndarray]:
        """ids (Q, k) int64 and scores (Q, k) float32, padded with -1 / 0 (see SparseIndex.search_batch)."""
        ip, ix, vals = canonical_csr(q_indptr, q_indices, q_values, len(self._vocab), "query batch")
        queries = _row_dicts(ip, ix, vals)
        ids, scores = (
            np.full((len(queries), k), -1, np.int64),
            np.zeros((len(queries), k), np.float32),
        )
        live = [q for q, d in enumerate(queries) if d]
        for s in range(0, len(live), 1024):
            rows = live[s : s + 1024]
            for q, hits in zip(rows, self._search([queries[q] for q in rows], k, [])):
                ids[q, : len(hits)] = [h["doc"] for h in hits]
                scores[q, : len(hits)] = [h["distance"] for h in hits]
        return ids, scores

    def explain(
        self, doc: int, query_indices: ArrayLike, query_values: ArrayLike
    ) -> list[tuple[str, float]]:
        """(word, contribution) of the words shared by the query and document `doc`, largest first."""
        rows = self.client.get(self.collection, ids=[int(doc)], output_fields=["vec"])
        if not rows:
            raise LexVLAError(f"document {doc} is not in Milvus collection {self.collection!r}")
        return _explain(self._query_dict(query_indices, query_values), rows[0]["vec"], self._vocab)


def _explain(
    query: dict[int, float], vec: Mapping[Any, float], vocab: list[str]
) -> list[tuple[str, float]]:
    doc = {int(t): w for t, w in vec.items()}
    words = [
        (vocab[t], float(np.float32(q) * np.float32(doc[t]))) for t, q in query.items() if t in doc
    ]
    return sorted(words, key=lambda x: -x[1])


def _connect(uri: str, token: str) -> MilvusClient:
    try:
        return MilvusClient(uri=uri, token=token)
    except Exception as err:  # pymilvus raises MilvusException and transport errors alike
        raise LexVLAError(f"cannot connect to Milvus at {uri}: {err}") from None
