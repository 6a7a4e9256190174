"""MilvusIndex: the `LexicalIndex` interface (add / delete / search / explain) over a Milvus collection.

    index = MilvusIndex.create("runs/x/milvus.db", vocab_words, {"model": "runs/x"})  # Milvus Lite file
    index = MilvusIndex.create("http://127.0.0.1:19530", vocab_words, {"model": "runs/x"})  # a server
    index.add(indptr, indices, values, metadata)       # inserts, then flush()
    hits = index.search(q_indices, q_values, k=10, explain=True)
    build_milvus_index("runs/x/lex_emb", "http://127.0.0.1:19530")   # `lexvla index build --milvus`

The collection holds one row per document: `doc` (INT64 primary key: 0, 1, 2, ... in insertion order,
as in SparseIndex), `key` (VARCHAR), `source` (VARCHAR: the corpus shard a row came from, "" if none),
`meta` (JSON metadata) and `vec` (SPARSE_FLOAT_VECTOR, float32 weights) with a SPARSE_INVERTED_INDEX
for the inner product (metric IP). The collection property "lexvla" keeps the vocabulary's hash, the
model reference and the next document id, and is checked on open; the words themselves are passed by
the caller (they come with the model or the shards).

Differences from SparseIndex: Milvus computes the scores (float32, its own summation order, so equal to
SparseIndex's within ~1e-6 relative), breaks exact ties at the k-th place its own way (the returned hits
are then ordered by score, then doc id), `commit()` is `flush()`, `k` is at most 16,384, and there is
no lock: run one writer at a time (document ids are reserved in the collection property before each
insert, so a writer that dies leaves at most a gap in the ids).
Requires the `milvus` extra (`pymilvus`, and `milvus-lite` for local files). A server that needs
credentials takes them from `token=` or the LEXVLA_MILVUS_TOKEN environment variable.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from lexvla.errors import LexVLAError
from lexvla.index import _io
from lexvla.index._csr import canonical_csr
from lexvla.index._writer import _check_metadata
from lexvla.index.build import check_compatible
from lexvla.index.shards import ShardInfo, read_shard, read_shard_manifest, read_shard_vocab
from lexvla.index.sparse import Hit

try:
    from pymilvus import DataType, MilvusClient
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise LexVLAError(f"MilvusIndex needs pymilvus: pip install 'lexvla[milvus]' ({err})") from None

logger = logging.getLogger(__name__)

FORMAT = "lexvla-milvus"
VERSION = 2  # 2: document ids 0..n-1 given by lexvla, and the `source` field
PROPERTY = "lexvla"  # {"format", "version", "vocab_size", "vocab_sha256", "model", "next_doc"}
DEFAULT_COLLECTION = "lexvla"
TOKEN_ENV = "LEXVLA_MILVUS_TOKEN"
MAX_K = 16_384  # Milvus's largest top-k
KEY_LENGTH = 1024
SOURCE_LENGTH = 512
INSERT_BATCH = 1_000
COLLECTION_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")


class _QuietUnimplemented(logging.Filter):
    """Milvus Lite's in-process server (a `*.db` URI) logs a traceback when pymilvus probes a method
    it lacks (AllocTimestamp, on create_collection); pymilvus then carries on without it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Method not implemented" not in record.getMessage()


logging.getLogger("grpc._server").addFilter(_QuietUnimplemented())


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
        self,
        client: MilvusClient,
        collection: str,
        vocab: list[str],
        info: dict[str, Any],
        where: str,
    ) -> None:
        self.client = client
        self.collection = collection
        self.where = where  # "Milvus collection 'name' at URI", for messages
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
        collection: str = DEFAULT_COLLECTION,
        token: str = "",
    ) -> MilvusIndex:
        """Create the collection (refused if it exists).

        Args:
            uri: a local `*.db` file (Milvus Lite) or a server, e.g. `http://127.0.0.1:19530`.
            vocab: the V words of the lexical vocabulary.
            model_ref: an opaque JSON-able dict naming the encoder.
            collection: the collection's name.
            token: credentials for a server (`user:password` or an API key), if it needs them;
                default: the LEXVLA_MILVUS_TOKEN environment variable.
        """
        words = _io.check_vocab(vocab, f"MilvusIndex.create({uri})")
        model = json.loads(_io.jsonable(dict(model_ref), "model_ref"))
        where = _where(uri, collection)
        client = _connect(uri, token)
        if client.has_collection(collection):
            raise LexVLAError(f"{where} already exists; open it with MilvusIndex.open")
        info = {
            "format": FORMAT,
            "version": VERSION,
            "vocab_size": len(words),
            "vocab_sha256": _io.vocab_hash(words),
            "model": model,
            "next_doc": 0,
        }
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("doc", DataType.INT64, is_primary=True)
        schema.add_field("key", DataType.VARCHAR, max_length=KEY_LENGTH)
        schema.add_field("source", DataType.VARCHAR, max_length=SOURCE_LENGTH)
        schema.add_field("meta", DataType.JSON)
        schema.add_field("vec", DataType.SPARSE_FLOAT_VECTOR)
        params = client.prepare_index_params()
        params.add_index(field_name="vec", index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
        params.add_index(field_name="key", index_type="INVERTED")
        params.add_index(field_name="source", index_type="INVERTED")
        client.create_collection(collection, schema=schema, index_params=params)
        index = cls(client, collection, words, info, where)
        index._save_info()
        return index

    @staticmethod
    def describe(
        uri: str, *, collection: str = DEFAULT_COLLECTION, token: str = ""
    ) -> dict[str, Any]:
        """The collection's lexvla property: vocabulary size and hash, model reference, next id."""
        where = _where(uri, collection)
        client = _connect(uri, token)
        try:
            return _read_info(client, collection, where)
        finally:
            client.close()

    @classmethod
    def open(
        cls,
        uri: str,
        vocab: Sequence[str],
        *,
        collection: str = DEFAULT_COLLECTION,
        token: str = "",
    ) -> MilvusIndex:
        """Open an existing collection, checking that `vocab` is the one it was created with."""
        where = _where(uri, collection)
        client = _connect(uri, token)
        info = _read_info(client, collection, where)
        check_vocab_hash(info, list(vocab), where, "the model's")
        client.load_collection(collection)
        return cls(client, collection, list(vocab), info, where)

    def close(self) -> None:
        self.client.close()

    @property
    def vocab(self) -> list[str]:
        return self._vocab

    @property
    def model_ref(self) -> dict[str, Any]:
        return dict(self._info["model"])

    @property
    def num_docs(self) -> int:
        """Document ids are 0..num_docs-1 (read from the collection: another writer may have added)."""
        self._info = _read_info(self.client, self.collection, self.where)
        return int(self._info["next_doc"])

    def __len__(self) -> int:
        """Active (not deleted) documents."""
        return self._count("")

    def __repr__(self) -> str:
        return f"MilvusIndex({self.where}, docs={len(self)})"

    def _count(self, expr: str) -> int:
        rows = self.client.query(self.collection, filter=expr, output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def _save_info(self) -> None:
        self.client.alter_collection_properties(
            self.collection, properties={PROPERTY: json.dumps(self._info)}
        )

    # ------------------------------------------------------------------------------------ reading
    def _row(self, doc: int, fields: list[str]) -> dict[str, Any] | None:
        if isinstance(doc, bool) or not isinstance(doc, int | np.integer) or doc < 0:
            raise LexVLAError(f"document id must be an integer >= 0, got {doc!r}")
        rows = self.client.get(self.collection, ids=[int(doc)], output_fields=fields)
        return rows[0] if rows else None

    def _present_row(self, doc: int, fields: list[str]) -> dict[str, Any]:
        row = self._row(doc, fields)
        if row is None:
            raise LexVLAError(f"document {doc} is not in {self.where}")
        return row

    def document(self, doc: int) -> dict[str, Any]:
        """Metadata of document `doc`."""
        return dict(self._present_row(doc, ["meta"])["meta"])

    def vector(self, doc: int) -> tuple[np.ndarray, np.ndarray]:
        """(word ids (n,) int32 ascending, weights (n,) float32) of document `doc`."""
        vec = {int(t): w for t, w in self._present_row(doc, ["vec"])["vec"].items()}
        terms = sorted(vec)
        return np.array(terms, np.int32), np.array([vec[t] for t in terms], np.float32)

    def is_deleted(self, doc: int) -> bool:
        """Whether document `doc` (an id below num_docs) is no longer in the collection."""
        if not 0 <= int(doc) < self.num_docs:
            raise LexVLAError(f"document id {doc} is out of range [0, {self.num_docs})")
        return self._row(doc, ["doc"]) is None

    def doc_id(self, key: str) -> int | None:
        """The document with this key, or None."""
        return self._existing([key]).get(key)

    # ------------------------------------------------------------------------------------ writing
    def add(
        self,
        indptr: ArrayLike,
        indices: ArrayLike,
        values: ArrayLike,
        metadata: Sequence[Mapping[str, Any]],
        *,
        source: str = "",
    ) -> int:
        """Insert documents (a CSR batch and one metadata dict with a unique "key" each), then flush.

        They get the next document ids, in order. `source` is stored in every row
        (`build_milvus_index` records the shard there, to resume an interrupted build).
        """
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
        first = self.num_docs  # reserve the ids before inserting: a crash leaves a gap, no clash
        self._info["next_doc"] = first + len(keys)
        self._save_info()
        vectors = _row_dicts(ip, ix, vals)
        for s in range(0, len(keys), INSERT_BATCH):
            rows = [
                {"doc": first + i, "key": keys[i], "source": source, "meta": dict(metadata[i]),
                 "vec": vectors[i]}
                for i in range(s, min(s + INSERT_BATCH, len(keys)))
            ]  # fmt: skip
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
        vec = self._present_row(doc, ["vec"])["vec"]
        return _explain(self._query_dict(query_indices, query_values), vec, self._vocab)


def _explain(
    query: dict[int, float], vec: Mapping[Any, float], vocab: list[str]
) -> list[tuple[str, float]]:
    doc = {int(t): w for t, w in vec.items()}
    words = [
        (vocab[t], float(np.float32(q) * np.float32(doc[t]))) for t, q in query.items() if t in doc
    ]
    return sorted(words, key=lambda x: -x[1])


def _where(uri: str, collection: str) -> str:
    """'Milvus collection NAME at URI', for messages; refuses a name Milvus would not take."""
    if not isinstance(collection, str) or not COLLECTION_RE.match(collection):
        raise LexVLAError(
            f"{collection!r} is not a Milvus collection name: use letters, digits and '_'"
            " (starting with a letter or '_', at most 255 characters), e.g. photos_2024"
        )
    return f"Milvus collection {collection!r} at {uri}"


def _connect(uri: str, token: str) -> MilvusClient:
    try:
        return MilvusClient(uri=uri, token=token or os.environ.get(TOKEN_ENV, ""))
    except Exception as err:  # pymilvus raises MilvusException and transport errors alike
        reason = getattr(err, "message", None) or str(err)  # without pymilvus's <...> wrapping
        raise LexVLAError(
            f"cannot connect to Milvus at {uri}: {reason}. Give a running server "
            "(http://HOST:19530) or a local Milvus Lite file (*.db in an existing folder)"
        ) from None


def _read_info(client: MilvusClient, collection: str, where: str) -> dict[str, Any]:
    if not client.has_collection(collection):
        raise LexVLAError(f"no {where}: build it with `lexvla index build --milvus`")
    try:
        info = json.loads(client.describe_collection(collection)["properties"][PROPERTY])
        if info["format"] != FORMAT or info.get("version") != VERSION:
            raise ValueError(info.get("version"))
    except (ValueError, KeyError, TypeError):
        raise LexVLAError(
            f"{where} was not made by this version of lexvla's MilvusIndex; build a new collection"
        ) from None
    return info


def check_vocab_hash(info: Mapping[str, Any], words: list[str], where: str, what: str) -> None:
    """Refuse vectors over another vocabulary than `words` (named `what` in the message)."""
    theirs, ours = str(info["vocab_sha256"]), _io.vocab_hash(words)
    if theirs != ours:
        raise LexVLAError(
            f"{where} holds vectors over another vocabulary (sha256 {theirs[:12]}, "
            f"{info.get('vocab_size')} words) than {what} (sha256 {ours[:12]}, {len(words)} words):"
            " use the model it was built with, or another collection (--collection NAME)"
        )


# -------------------------------------------------------------------------------------- build
def build_milvus_index(
    from_dir: str | Path,
    uri: str,
    *,
    collection: str = DEFAULT_COLLECTION,
    token: str = "",
    check_model: bool = True,
) -> MilvusIndex:
    """Insert every finished shard of `from_dir` that the collection does not hold yet.

    The collection is created (with the shards' vocabulary and model) if it does not exist; an
    existing one must hold the same vocabulary (and model, if `check_model`), which is checked before
    anything is written. Rows remember their shard (name and checksum), so an interrupted build can be
    run again: whole shards are skipped, a partly inserted one is deleted and inserted again.
    Shards are inserted in manifest order, so the document ids equal `build_index`'s on the same
    shards.

    Raises:
        LexVLAError: the URI is wrong or unreachable, the collection holds another vocabulary or
            model, or a shard already inserted has changed since.
    """
    src = Path(from_dir)
    shards, words = read_shard_manifest(src), read_shard_vocab(src)
    where = _where(uri, collection)
    client = _connect(uri, token)
    if client.has_collection(collection):
        info = _read_info(client, collection, where)
        check_vocab_hash(info, words, where, f"the shards in {src}")
        check_compatible(info, shards, src, where, check_model)
        client.close()
        index = MilvusIndex.open(uri, words, collection=collection, token=token)
    else:
        client.close()
        index = MilvusIndex.create(uri, words, shards.model, collection=collection, token=token)
    added = 0
    for shard_info in shards.shards:
        if _shard_inserted(index, shard_info, src):
            continue
        shard = read_shard(src, shard_info.name)
        added += index.add(
            shard.indptr, shard.indices, shard.values, shard.metadata, source=_source(shard_info)
        )
        logger.info("inserted shard %s (%d documents)", shard_info.name, shard.num_rows)
    logger.info("%s: %d documents (%d added)", where, len(index), added)
    return index


def _source(shard: ShardInfo) -> str:
    return f"{shard.name}:{shard.npz_sha256}"


def _shard_inserted(index: MilvusIndex, shard: ShardInfo, src: Path) -> bool:
    """True if every row of `shard` is in the collection; deletes the rows of a partial insert."""
    source = _source(shard)
    others = f'source >= "{shard.name}:" and source < "{shard.name};" and source != "{source}"'
    if index.client.query(index.collection, filter=others, output_fields=["doc"], limit=1):
        raise LexVLAError(
            f"shard {shard.name} in {src} changed since it was inserted into {index.where};"
            " build a new collection (--collection NAME)"
        )
    present = index._count(f'source == "{source}"')
    if present == shard.rows:
        return True
    if present:
        logger.warning(
            "shard %s: %d of %d rows from an interrupted build; inserting it again",
            shard.name, present, shard.rows,
        )  # fmt: skip
        index.client.delete(index.collection, filter=f'source == "{source}"')
        index.flush()
    return False


# ------------------------------------------------------------------------- a local server for trials
@contextlib.contextmanager
def milvus_lite_server(data_dir: str | Path, port: int, *, timeout: float = 60.0) -> Iterator[str]:
    """Run `milvus-lite server` on 127.0.0.1:`port` (data in `data_dir`) and yield its URI.

    For tests, benchmarks and trying the Milvus path on one machine; the server is stopped on exit.
    Its output goes to `data_dir/server.log`.
    """
    exe = shutil.which("milvus-lite", path=str(Path(sys.executable).parent)) or shutil.which(
        "milvus-lite"
    )
    if exe is None:
        raise LexVLAError("the milvus-lite command is not installed: pip install 'lexvla[milvus]'")
    data = Path(data_dir)
    data.mkdir(parents=True, exist_ok=True)
    cmd = [
        exe,
        "server",
        "--data-dir",
        str(data / "db"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with open(data / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        tail = (data / "server.log").read_text(errors="replace")[-2000:]
                        raise LexVLAError(f"milvus-lite server did not start: {tail}") from None
                    time.sleep(0.2)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
