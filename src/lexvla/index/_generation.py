"""One immutable, published version ("generation") of a sparse index: write it, open it, check it.

Files of a generation directory (arrays are `.npy`, memory-mapped read-only on open):

- manifest.json: format, version, counts, vocabulary hash, model reference, sources (shard name ->
  checksum), `applied_seq`, and the sha256 + size (+ shape) of every other file;
- vocab.json: the V words, in dimension order;
- doc_indptr.npy int64 (N+1,), doc_terms.npy int32 (nnz,), doc_weights.npy float32 (nnz,): doc-major CSR
  (word ids ascending within a document);
- post_indptr.npy int64 (V+1,), post_docs.npy int32 (P,), post_weights.npy float32 or float16 (P,):
  term-major posting lists (doc ids ascending; empty for dense words);
- dense_terms.npy int32 (H,), dense.npy float32 or float16 (H, N): the words present in >= dense_min_df
  documents, stored as dense columns. The two search-weight arrays are float16 when every weight is
  exactly a float16 (manifest "search_weights_dtype"), which halves what a search reads;
- deleted.npy bool (N,): the deletion mask;
- docs.jsonl + docs_offsets.npy int64 (N+1,): one JSON metadata object per document, and the byte
  offset of each line;
- keys.json: the N document keys (also in the metadata), for key lookups without parsing metadata.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lexvla._atomic import reporting_full_disk
from lexvla.errors import LexVLAError
from lexvla.index import _io

logger = logging.getLogger(__name__)

INDEX_FORMAT = "lexvla-sparse-index"
INDEX_VERSION = 1
ARRAYS = {
    "doc_indptr": "int64",
    "doc_terms": "int32",
    "doc_weights": "float32",
    "post_indptr": "int64",
    "post_docs": "int32",
    "post_weights": "float32",
    "dense_terms": "int32",
    "dense": "float32",
    "deleted": "bool",
    "docs_offsets": "int64",
}
BLOBS = ("vocab.json", "docs.jsonl", "keys.json")
SEARCH_WEIGHTS = ("post_weights", "dense")  # float32 or float16 (manifest "search_weights_dtype")
_DECODER = (
    json.JSONDecoder()
)  # decode() directly: json.loads(bytes) adds encoding detection per call


@dataclass
class DocTable:
    """Everything a generation is derived from: doc-major vectors, metadata, deletions."""

    doc_indptr: np.ndarray  # (N+1,) int64
    doc_terms: np.ndarray  # (nnz,) int32, ascending within a document
    doc_weights: np.ndarray  # (nnz,) float32, > 0
    deleted: np.ndarray  # (N,) bool
    docs_jsonl: list[bytes | memoryview]  # pieces whose concatenation is docs.jsonl
    docs_offsets: np.ndarray  # (N+1,) int64 byte offsets of each line in docs.jsonl
    keys: list[str]  # (N,)


def dense_min_df(dense_fraction: float | None, num_docs: int) -> int:
    """Words in at least this many documents are stored dense (never below 1; N+1 = disabled)."""
    if dense_fraction is None:
        return num_docs + 1
    return max(1, int(np.ceil(dense_fraction * num_docs)))


def _postings(t: DocTable, vocab_size: int, min_df: int) -> dict[str, np.ndarray]:
    from lexvla.index import _kernels  # numba, imported on first use

    df = _kernels.document_frequency(t.doc_terms, vocab_size)  # (V,)
    dense_terms = np.flatnonzero(df >= min_df).astype(np.int32)  # (H,)
    term_slot = np.full(vocab_size, -1, np.int32)
    term_slot[dense_terms] = np.arange(len(dense_terms), dtype=np.int32)
    post_indptr = np.zeros(vocab_size + 1, np.int64)
    np.cumsum(np.where(term_slot >= 0, 0, df), out=post_indptr[1:])
    post_docs, post_weights, dense = _kernels.build_postings(
        t.doc_indptr, t.doc_terms, t.doc_weights, term_slot, post_indptr, len(dense_terms)
    )
    return {
        "post_indptr": post_indptr,
        "post_docs": post_docs,
        "post_weights": post_weights,
        "dense_terms": dense_terms,
        "dense": dense,
    }


def search_weights_dtype(post_weights: np.ndarray, dense: np.ndarray) -> str:
    """ "float16" if every search weight is exactly a float16 (half the bytes to read), else "float32"."""
    for x in (post_weights, dense):
        with np.errstate(over="ignore"):
            if not np.array_equal(x.astype(np.float16).astype(np.float32), x):
                return "float32"
    return "float16"


def _dtype(name: str, manifest: Mapping[str, Any]) -> str:
    """On-disk dtype of an array: the search weights follow the manifest's search_weights_dtype."""
    if name in SEARCH_WEIGHTS:
        dtype = manifest.get("search_weights_dtype", "float32")
        if dtype not in ("float16", "float32"):
            raise LexVLAError(f"manifest: search_weights_dtype {dtype!r} is not float16 or float32")
        return str(dtype)
    return ARRAYS[name]


def write_generation(
    out: Path,
    table: DocTable,
    vocab: list[str],
    info: Mapping[str, Any],
    link_from: Path | None = None,
) -> dict[str, Any]:
    """Write a complete generation into the (new, empty) directory `out`; manifest.json last.

    Args:
        out: the staging directory (renamed into place by the caller).
        table: the documents.
        vocab: the V words.
        info: manifest fields set by the caller (generation, model, applied_seq, sources, dense_fraction).
        link_from: a generation whose identical files (vocab.json) are hard-linked, not rewritten.

    Returns:
        The manifest written.
    """
    out.mkdir(parents=True)
    N, V = len(table.deleted), len(vocab)
    min_df = dense_min_df(info["dense_fraction"], N)
    arrays = {
        "doc_indptr": table.doc_indptr,
        "doc_terms": table.doc_terms,
        "doc_weights": table.doc_weights,
        "deleted": table.deleted,
        "docs_offsets": table.docs_offsets,
        **_postings(table, V, min_df),
    }
    dtypes = {"search_weights_dtype": search_weights_dtype(arrays["post_weights"], arrays["dense"])}
    files = _write_files(
        out, arrays, {n: _dtype(n, dtypes) for n in arrays}, table, vocab, link_from
    )
    manifest = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        **info,
        **dtypes,
        "vocab_size": V,
        "vocab_sha256": _io.vocab_hash(vocab),
        "num_docs": N,
        "num_deleted": int(table.deleted.sum()),
        "nnz": len(table.doc_terms),
        "dense_min_df": min_df,
        "num_dense_terms": len(arrays["dense_terms"]),
        "files": files,
    }
    _io.atomic_write_json(out / "manifest.json", manifest)
    _io.fsync_dir(out)
    return manifest


def _write_files(
    out: Path,
    arrays: dict[str, np.ndarray],
    dtypes: dict[str, str],
    t: DocTable,
    vocab: list[str],
    link_from: Path | None,
) -> dict[str, dict[str, Any]]:
    """Write the arrays and blobs of a generation; returns {file name: sha256, bytes (, shape)}."""
    files: dict[str, dict[str, Any]] = {}
    for name, array in arrays.items():
        sha = _io.write_npy(out / f"{name}.npy", array.astype(dtypes[name], copy=False))
        size = (out / f"{name}.npy").stat().st_size
        files[f"{name}.npy"] = {"sha256": sha, "bytes": size, "shape": list(array.shape)}
    _write_blob(out / "docs.jsonl", t.docs_jsonl)
    _write_blob(out / "keys.json", [_io.json_bytes(t.keys)])
    if link_from is not None and (link_from / "vocab.json").is_file():
        os.link(link_from / "vocab.json", out / "vocab.json")
    else:
        _write_blob(out / "vocab.json", [_io.json_bytes(vocab)])
    for name in BLOBS:
        files[name] = {"sha256": _io.sha256_file(out / name), "bytes": (out / name).stat().st_size}
    return files


def _write_blob(path: Path, pieces: list[bytes | memoryview]) -> None:
    with reporting_full_disk(path), open(path, "wb") as f:
        for piece in pieces:
            f.write(piece)
        f.flush()
        _io.fsync_file(f.fileno())


def link_generation(
    out: Path, src: Path, deleted: np.ndarray, info: Mapping[str, Any]
) -> dict[str, Any]:
    """A generation equal to `src` except its deletion mask: hard-link every other file."""
    out.mkdir(parents=True)
    manifest = json.loads((src / "manifest.json").read_text(encoding="utf-8"))
    for name in manifest["files"]:
        if name != "deleted.npy":
            os.link(src / name, out / name)
    sha = _io.write_npy(out / "deleted.npy", deleted)
    manifest["files"]["deleted.npy"] = {
        "sha256": sha,
        "bytes": (out / "deleted.npy").stat().st_size,
        "shape": [len(deleted)],
    }
    manifest.update(info, num_deleted=int(deleted.sum()))
    _io.atomic_write_json(out / "manifest.json", manifest)
    _io.fsync_dir(out)
    return manifest


@dataclass
class Generation:
    """An opened generation: memory-mapped arrays, the vocabulary and the metadata lines."""

    path: Path
    manifest: dict[str, Any]
    vocab: list[str]
    arrays: dict[str, np.ndarray]
    term_slot: np.ndarray  # (V,) int32: row of `dense` for dense words, else -1
    docs: bytes | mmap.mmap

    @property
    def num_docs(self) -> int:
        return int(self.manifest["num_docs"])

    def metadata(self, doc: int) -> dict[str, Any]:
        off = self.arrays["docs_offsets"]
        try:
            meta = _DECODER.decode(self.docs[off[doc] : off[doc + 1]].decode("utf-8"))
        except (ValueError, RecursionError):  # not UTF-8 or not JSON: opened with verify=False
            meta = None
        if not isinstance(meta, dict):
            raise LexVLAError(
                f"{self.path / 'docs.jsonl'}: the metadata of document {doc} is damaged; rebuild"
            )
        return meta

    def keys(self) -> list[str]:
        """Key of every document (parsed on first use)."""
        cached = getattr(self, "_keys", None)
        if cached is None:
            cached = _io.read_json(self.path / "keys.json", f"index generation {self.path}")
            if not isinstance(cached, list) or len(cached) != self.num_docs:
                raise LexVLAError(
                    f"{self.path / 'keys.json'} does not list {self.num_docs} keys; rebuild"
                )
            self._keys = cached
        return cached

    def doc_table(self) -> DocTable:
        """The documents as a DocTable (arrays memory-mapped; the deletion mask copied)."""
        a = self.arrays
        docs = memoryview(self.docs) if len(self.docs) else b""
        return DocTable(
            a["doc_indptr"],
            a["doc_terms"],
            a["doc_weights"],
            np.array(a["deleted"]),
            [docs],
            a["docs_offsets"],
            list(self.keys()),
        )


def _check_files(path: Path, manifest: Mapping[str, Any], verify: bool) -> None:
    files = manifest["files"]
    expected = {f"{n}.npy" for n in ARRAYS} | set(BLOBS)
    if set(files) != expected:
        raise LexVLAError(
            f"{path / 'manifest.json'} lists files {sorted(files)}, expected {sorted(expected)}"
        )
    for name, entry in files.items():
        f = path / name
        try:
            size = f.stat().st_size
        except FileNotFoundError:
            raise LexVLAError(
                f"index file {f} is missing; the index is damaged, rebuild it"
            ) from None
        if size != entry["bytes"]:
            raise LexVLAError(
                f"index file {f} has {size} bytes, the manifest says {entry['bytes']}: truncated or damaged, rebuild it"
            )
        if verify and _io.sha256_file(f) != entry["sha256"]:
            raise LexVLAError(
                f"index file {f} does not match its sha256 in manifest.json: corrupt, rebuild it"
            )


def _shapes(m: Mapping[str, Any], post_nnz: int) -> dict[str, tuple[int, ...]]:
    N, V, H, nnz = m["num_docs"], m["vocab_size"], m["num_dense_terms"], m["nnz"]
    return {
        "doc_indptr": (N + 1,), "doc_terms": (nnz,), "doc_weights": (nnz,), "post_indptr": (V + 1,),
        "post_docs": (post_nnz,), "post_weights": (post_nnz,), "dense_terms": (H,), "dense": (H, N),
        "deleted": (N,), "docs_offsets": (N + 1,),
    }  # fmt: skip


def _check_structure(
    path: Path, m: Mapping[str, Any], a: dict[str, np.ndarray], docs_bytes: int
) -> None:
    """Pointers are monotone with the right ends and every id is in range.

    Always run, checksums or not: a checksum only proves the file is what some writer wrote, while the
    kernels index memory with these ids unchecked. Costs one pass over the id arrays (~30 ms / 100k docs).
    """
    N, V = m["num_docs"], m["vocab_size"]
    problems = []
    for ptr, end in (
        ("doc_indptr", m["nnz"]),
        ("post_indptr", len(a["post_docs"])),
        ("docs_offsets", docs_bytes),
    ):
        p = a[ptr]
        if p[0] != 0 or p[-1] != end or (len(p) > 1 and np.diff(p).min() < 0):
            problems.append(ptr)
    for ids, bound in (("doc_terms", V), ("post_docs", N), ("dense_terms", V)):
        x = a[ids]
        if len(x) and (x.min() < 0 or x.max() >= bound):
            problems.append(ids)
    if problems:
        raise LexVLAError(
            f"index generation {path} is inconsistent ({', '.join(problems)}): damaged, rebuild it"
        )


def open_generation(path: Path, *, verify: bool = True) -> Generation:
    """Open a generation read-only (arrays memory-mapped).

    Args:
        path: the generation directory.
        verify: check every file's sha256 (reads everything once). Without it, sizes, shapes, pointers
            and id bounds are still checked, so a truncated or damaged file is refused, not searched.

    Raises:
        LexVLAError: naming the file, if anything is missing, truncated, corrupt or inconsistent.
    """
    m = _io.read_json(path / "manifest.json", f"index generation {path}")
    if (
        not isinstance(m, dict)
        or m.get("format") != INDEX_FORMAT
        or m.get("version") != INDEX_VERSION
    ):
        raise LexVLAError(
            f"{path / 'manifest.json'} is not a {INDEX_FORMAT} v{INDEX_VERSION} manifest"
        )
    try:
        _check_files(path, m, verify)
        post_nnz = int(m["files"]["post_docs.npy"]["shape"][0])
        shapes = _shapes(m, post_nnz)
    except (KeyError, TypeError, IndexError, ValueError) as err:
        raise LexVLAError(
            f"{path / 'manifest.json'} is malformed ({err!r}); rebuild the index"
        ) from None
    what = f"index generation {path}"
    # plain ndarray views of the memory maps: numba dispatches np.memmap arguments ~3x slower
    arrays = {
        n: np.asarray(
            _io.load_npy(path / f"{n}.npy", _dtype(n, m), shapes[n], mmap=True, what=what)
        )
        for n in ARRAYS
    }
    for n in SEARCH_WEIGHTS:  # numba has no float16: kernels read the bits (see _kernels.as_f32)
        if arrays[n].dtype == np.float16:
            arrays[n] = arrays[n].view(np.uint16)
    vocab = _io.read_json(path / "vocab.json", what)
    try:  # the manifest's other fields: a damaged key or value is refused, not a traceback
        if (
            not isinstance(vocab, list)
            or len(vocab) != m["vocab_size"]
            or _io.vocab_hash(vocab) != m["vocab_sha256"]
        ):
            raise LexVLAError(
                f"{path / 'vocab.json'} does not match the manifest's vocabulary hash: rebuild"
            )
        docs_size = m["files"]["docs.jsonl"]["bytes"]
        _check_structure(path, m, arrays, docs_size)
        term_slot = np.full(m["vocab_size"], -1, np.int32)
        term_slot[arrays["dense_terms"]] = np.arange(m["num_dense_terms"], dtype=np.int32)
    except (KeyError, TypeError, IndexError, ValueError) as err:
        raise LexVLAError(
            f"{path / 'manifest.json'} is malformed ({err!r}); rebuild the index"
        ) from None
    docs: bytes | mmap.mmap = b""
    if docs_size:
        with open(path / "docs.jsonl", "rb") as f:
            docs = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return Generation(path, m, vocab, arrays, term_slot, docs)
