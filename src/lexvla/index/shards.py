"""Corpus shards: the on-disk output of batch encoding, the input of `build_index`.

A shard directory (conventionally `lex_emb/`) holds, per input shard `<name>`:

- `<name>.npz`: a CSR batch of lexical vectors, `indptr` int64 (n+1,), `indices` int32 (nnz,) word ids
  (ascending within a row), `values` float16 (nnz,) weights > 0, `vocab_size` int64 scalar;
- `<name>.jsonl`: one JSON object per row, with at least `key` (unique id, str) and `path` (str), and
  optionally `caption` and anything else;

plus, for the directory, `vocab.json` (the word list) and `manifest.json`:
`{"format": "lexvla-shards", "version": 1, "vocab_size", "vocab_sha256", "model": {...},
"shards": [{"name", "rows", "nnz", "npz_sha256", "jsonl_sha256"}, ...]}`.

Both files of a shard are written atomically (temp file + `os.replace`) and the shard is listed in the
manifest (updated atomically, under a lock) only after both exist: a shard is finished iff it is in
the manifest, so an encoder killed mid-shard simply redoes that shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from lexvla.errors import LexVLAError
from lexvla.index import _io
from lexvla.index._csr import canonical_csr

logger = logging.getLogger(__name__)

SHARDS_FORMAT = "lexvla-shards"
SHARDS_VERSION = 1
_ARRAYS = {"indptr": "int64", "indices": "int32", "values": "float16", "vocab_size": "int64"}


@dataclass(frozen=True)
class ShardInfo:
    """One finished shard as listed in the manifest."""

    name: str
    rows: int
    nnz: int
    npz_sha256: str
    jsonl_sha256: str


@dataclass(frozen=True)
class ShardManifest:
    """The manifest of a shard directory."""

    directory: Path
    vocab_size: int
    vocab_sha256: str
    model: dict[str, Any]
    shards: tuple[ShardInfo, ...]

    def get(self, name: str) -> ShardInfo | None:
        return next((s for s in self.shards if s.name == name), None)


@dataclass(frozen=True)
class Shard:
    """A loaded shard: rows of lexical vectors and their metadata."""

    name: str
    indptr: np.ndarray  # (n+1,) int64
    indices: np.ndarray  # (nnz,) int32 word ids
    values: np.ndarray  # (nnz,) float16 weights
    vocab_size: int
    metadata: list[dict[str, Any]]  # n dicts with "key", "path" (and optionally "caption")

    @property
    def num_rows(self) -> int:
        return len(self.indptr) - 1


def _manifest_dict(m: ShardManifest) -> dict[str, Any]:
    return {
        "format": SHARDS_FORMAT,
        "version": SHARDS_VERSION,
        "vocab_size": m.vocab_size,
        "vocab_sha256": m.vocab_sha256,
        "model": m.model,
        "shards": [s.__dict__ for s in m.shards],
    }


def read_shard_manifest(directory: str | Path) -> ShardManifest:
    """Read and check `manifest.json` of a shard directory."""
    directory = Path(directory)
    data = _io.read_json(directory / "manifest.json", f"shard directory {directory}")
    try:
        if data["format"] != SHARDS_FORMAT or data["version"] != SHARDS_VERSION:
            raise LexVLAError(
                f"{directory / 'manifest.json'} is format {data['format']!r} v{data['version']},"
                f" expected {SHARDS_FORMAT!r} v{SHARDS_VERSION}"
            )
        shards = tuple(ShardInfo(**s) for s in data["shards"])
        for info in shards:  # names become file names: none may leave the directory ("../x")
            _io.check_name(info.name, f"shard (listed in {directory / 'manifest.json'})")
        return ShardManifest(
            directory,
            int(data["vocab_size"]),
            str(data["vocab_sha256"]),
            dict(data["model"]),
            shards,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise LexVLAError(f"{directory / 'manifest.json'} is malformed ({err!r})") from None


def read_shard_vocab(directory: str | Path) -> list[str]:
    """The word list of a shard directory (checked against the manifest's hash)."""
    directory = Path(directory)
    manifest = read_shard_manifest(directory)
    words = _io.read_json(directory / "vocab.json", f"shard directory {directory}")
    if not isinstance(words, list) or _io.vocab_hash(words) != manifest.vocab_sha256:
        raise LexVLAError(f"{directory / 'vocab.json'} does not match the manifest's vocab_sha256")
    return words


def init_shard_dir(
    directory: str | Path, vocab: Sequence[str], model_ref: Mapping[str, Any]
) -> ShardManifest:
    """Create a shard directory, or check that an existing one has this vocabulary and model.

    Args:
        directory: e.g. `runs/x/lex_emb`; created if missing.
        vocab: the V words of the lexical vocabulary, in dimension order.
        model_ref: an opaque JSON-able dict naming the encoder (e.g. `{"model": "runs/x"}`).
    """
    directory = Path(directory)
    words = _io.check_vocab(vocab, f"shard directory {directory}")
    model = json.loads(_io.jsonable(dict(model_ref), "model_ref"))
    directory.mkdir(parents=True, exist_ok=True)
    with _io.file_lock(directory / ".lock"):
        if (directory / "manifest.json").exists():
            m = read_shard_manifest(directory)
            if m.vocab_sha256 != _io.vocab_hash(words):
                raise LexVLAError(
                    f"{directory} holds vectors over another vocabulary (sha256 {m.vocab_sha256[:12]});"
                    " use a new directory for this model"
                )
            if m.model != model:
                raise LexVLAError(
                    f"{directory} holds vectors of model {m.model}, not {model}; use a new directory"
                )
            return m
        _io.atomic_write_json(directory / "vocab.json", words)
        m = ShardManifest(directory, len(words), _io.vocab_hash(words), model, ())
        _io.atomic_write_json(directory / "manifest.json", _manifest_dict(m))
        return m


def shard_finished(directory: str | Path, name: str) -> bool:
    """True if shard `name` was completely written (an encoder can skip it on resume)."""
    return read_shard_manifest(directory).get(name) is not None


def _check_metadata(metadata: Sequence[Mapping[str, Any]], rows: int, what: str) -> list[str]:
    if len(metadata) != rows:
        raise LexVLAError(f"{what}: {rows} vectors but {len(metadata)} metadata records")
    lines = []
    for i, record in enumerate(metadata):
        if not isinstance(record, Mapping):
            raise LexVLAError(f"{what}: metadata record {i} is not a dict")
        for field in ("key", "path"):
            if not isinstance(record.get(field), str) or not record[field]:
                raise LexVLAError(f"{what}: metadata record {i} lacks a non-empty string {field!r}")
        lines.append(_io.jsonable(record, f"{what} record {i}"))
    return lines


def write_shard(
    directory: str | Path,
    name: str,
    indptr: ArrayLike,
    indices: ArrayLike,
    values: ArrayLike,
    metadata: Sequence[Mapping[str, Any]],
    *,
    overwrite: bool = False,
) -> ShardInfo:
    """Write one shard (CSR vectors + metadata) atomically and list it in the manifest.

    Args:
        directory: a directory prepared by `init_shard_dir`.
        name: the shard's name (letters, digits, `._-`), e.g. the input shard's stem.
        indptr, indices, values: (n+1,), (nnz,), (nnz,) CSR of n lexical vectors; values are stored
            as float16 (weights that round to 0 are dropped).
        metadata: n dicts with at least "key" and "path".
        overwrite: replace a finished shard of the same name (an index built from the old one will
            then refuse it, since its checksum changed).
    """
    directory = Path(directory)
    name = _io.check_name(name, "shard")
    manifest = read_shard_manifest(directory)
    what = f"shard {name!r} in {directory}"
    ip, ix, vals = canonical_csr(indptr, indices, values, manifest.vocab_size, what, np.float16)
    lines = _check_metadata(metadata, len(ip) - 1, what)
    if manifest.get(name) and not overwrite:
        raise LexVLAError(f"{what} is already finished; pass overwrite=True to replace it")
    buf = io.BytesIO()
    np.savez(buf, indptr=ip, indices=ix, values=vals, vocab_size=np.int64(manifest.vocab_size))
    npz, jsonl = buf.getvalue(), "".join(line + "\n" for line in lines).encode("utf-8")
    _io.atomic_write_bytes(directory / f"{name}.npz", npz)
    _io.atomic_write_bytes(directory / f"{name}.jsonl", jsonl)
    info = ShardInfo(name, len(ip) - 1, len(ix), _sha(npz), _sha(jsonl))
    with _io.file_lock(directory / ".lock"):  # read-modify-write against concurrent encoders
        m = read_shard_manifest(directory)
        shards = tuple(s for s in m.shards if s.name != name) + (info,)
        _io.atomic_write_json(directory / "manifest.json", _manifest_dict(_replace(m, shards)))
    logger.info("wrote shard %s: %d vectors, %d non-zeros", name, info.rows, info.nnz)
    return info


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _replace(m: ShardManifest, shards: tuple[ShardInfo, ...]) -> ShardManifest:
    return ShardManifest(m.directory, m.vocab_size, m.vocab_sha256, m.model, shards)


def _load_npz(path: Path, info: ShardInfo, vocab_size: int) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if set(npz.files) != set(_ARRAYS):
                raise LexVLAError(
                    f"{path} holds arrays {sorted(npz.files)}, expected {sorted(_ARRAYS)}"
                )
            arrays = {k: npz[k] for k in _ARRAYS}
    except LexVLAError:
        raise
    except FileNotFoundError:
        raise LexVLAError(
            f"{path} is missing (listed in the manifest); re-encode shard {info.name}"
        ) from None
    # zipfile raises NotImplementedError for a damaged header's "version" or "compression" field
    except (*_io.NPY_ERRORS, zipfile.BadZipFile, NotImplementedError, zlib.error) as err:
        raise LexVLAError(
            f"{path} cannot be read ({err}); it is corrupt or holds pickled objects (refused)"
        ) from None
    for key, dtype in _ARRAYS.items():
        if arrays[key].dtype != np.dtype(dtype):
            raise LexVLAError(f"{path}: {key} is {arrays[key].dtype}, expected {dtype}")
    if int(arrays["vocab_size"]) != vocab_size:
        raise LexVLAError(
            f"{path}: vocab_size {int(arrays['vocab_size'])} != manifest {vocab_size}"
        )
    return arrays


def read_shard(directory: str | Path, name: str, *, verify: bool = True) -> Shard:
    """Load a finished shard, checking checksums (if `verify`), lengths, word ids and metadata.

    Raises:
        LexVLAError: naming the file, if the shard is unfinished, corrupt or inconsistent.
    """
    directory = Path(directory)
    manifest = read_shard_manifest(directory)
    info = manifest.get(name)
    if info is None:
        raise LexVLAError(f"shard {name!r} is not finished in {directory} (not in manifest.json)")
    npz_path, jsonl_path = directory / f"{name}.npz", directory / f"{name}.jsonl"
    if verify:
        for path, expected in ((npz_path, info.npz_sha256), (jsonl_path, info.jsonl_sha256)):
            if not path.is_file():
                raise LexVLAError(f"{path} is missing (listed in the manifest); re-encode it")
            if _io.sha256_file(path) != expected:
                raise LexVLAError(
                    f"{path} does not match its sha256 in manifest.json: corrupt, re-encode it"
                )
    a = _load_npz(npz_path, info, manifest.vocab_size)
    ip, ix, vals = canonical_csr(
        a["indptr"], a["indices"], a["values"], manifest.vocab_size, str(npz_path), np.float16
    )
    if len(ip) - 1 != info.rows or len(ix) != len(a["indices"]):
        raise LexVLAError(
            f"{npz_path}: {len(ip) - 1} rows / {len(ix)} non-zeros, manifest says {info.rows}"
        )
    metadata = _read_jsonl(jsonl_path, info.rows)
    return Shard(name, ip, ix, vals, manifest.vocab_size, metadata)


def _read_jsonl(path: Path, rows: int) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
        # split on "\n" only: str.splitlines() would also split inside captions at U+0085, U+2028...
        records = [json.loads(line) for line in text.split("\n")[:-1]] if text else []
        if text and not text.endswith("\n"):
            raise json.JSONDecodeError("missing final newline", text, len(text))
    except FileNotFoundError:
        raise LexVLAError(f"{path} is missing (listed in the manifest); re-encode it") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise LexVLAError(f"{path} is not valid JSON lines ({err})") from None
    if len(records) != rows:
        raise LexVLAError(f"{path} has {len(records)} records for {rows} vectors")
    _check_metadata(records, rows, str(path))
    return records


def iter_shards(directory: str | Path, *, verify: bool = True) -> Iterator[Shard]:
    """Every finished shard of a directory, in manifest order."""
    for info in read_shard_manifest(directory).shards:
        yield read_shard(directory, info.name, verify=verify)
