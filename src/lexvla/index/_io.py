"""File helpers shared by the shard format and the index: checksums, locks, safe loads.

Every file is written with the atomic, fsynced writes of `lexvla._atomic` (a temporary name in the
destination directory, flushed to disk, then moved into place with `os.replace`), so a reader sees
either the old file or the complete new one, never a partial write; a full disk is a `DiskFullError`
naming the file. numpy files are always read with `allow_pickle=False`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import tokenize
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lexvla._atomic import atomic_write_bytes as atomic_write_bytes  # re-exported for the index
from lexvla._atomic import fsync_dir as fsync_dir
from lexvla._atomic import fsync_file as fsync_file
from lexvla._atomic import reporting_full_disk
from lexvla.errors import LexVLAError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def vocab_hash(words: Sequence[str]) -> str:
    """sha256 (hex) of the vocabulary's word list, in order: vectors are comparable iff hashes match."""
    payload = json.dumps(list(words), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def check_vocab(words: Sequence[str], what: str) -> list[str]:
    """Validate a vocabulary: a non-empty list of unique, non-empty strings."""
    words = list(words)
    if not words or not all(isinstance(w, str) and w for w in words):
        raise LexVLAError(f"{what}: the vocabulary must be a non-empty list of non-empty strings")
    if len(set(words)) != len(words):
        seen: set[str] = set()
        dup = next(w for w in words if w in seen or seen.add(w))  # type: ignore[func-returns-value]
        raise LexVLAError(
            f"{what}: the vocabulary has the word {dup!r} twice; words must be unique"
        )
    return words


def check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise LexVLAError(
            f"invalid {what} name {name!r}: use letters, digits, '.', '_' or '-' (no '/'),"
            " starting with a letter or digit"
        )
    return name


def json_bytes(obj: Any, indent: int | None = None) -> bytes:
    """UTF-8 JSON of `obj`; lone surrogates in its strings are written as \\u escapes (see jsonable)."""
    try:
        return json.dumps(obj, indent=indent, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, indent=indent).encode("utf-8")


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj, indent=1) + b"\n")


def write_npy(path: Path, array: np.ndarray) -> str:
    """Write `array` as `.npy` and fsync it (not atomic: used inside a staging directory).

    Returns:
        The sha256 (hex) of the file's bytes, computed from memory (no read back).
    """
    array = np.ascontiguousarray(array)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    data = memoryview(array.reshape(-1).view(np.uint8))
    digest = hashlib.sha256(header.getvalue())
    digest.update(data)
    with reporting_full_disk(path), open(path, "wb") as f:
        f.write(header.getvalue())
        f.write(data)
        f.flush()
        fsync_file(f.fileno())
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LexVLAError(f"{what}: {path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise LexVLAError(
            f"{what}: {path} is not valid JSON ({err}); the file is corrupt"
        ) from None


# What np.load raises on a damaged file: a damaged header fails numpy's literal_eval of it with
# SyntaxError or tokenize.TokenError, not only ValueError.
NPY_ERRORS = (ValueError, OSError, EOFError, SyntaxError, tokenize.TokenError)


def load_npy(
    path: Path, dtype: str, shape: Sequence[int] | None, *, mmap: bool, what: str
) -> np.ndarray:
    """Load a `.npy` file with `allow_pickle=False`, checking its dtype and (optional) shape.

    Raises:
        LexVLAError: naming the file, when it is missing, truncated, pickled or of the wrong type.
    """
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise LexVLAError(f"{what}: {path} is missing; rebuild the index") from None
    except NPY_ERRORS as err:
        raise LexVLAError(
            f"{what}: {path} cannot be read ({err}); it is truncated, corrupt or holds pickled"
            " objects (refused). Rebuild it."
        ) from None
    if array.dtype != np.dtype(dtype) or (shape is not None and tuple(array.shape) != tuple(shape)):
        raise LexVLAError(
            f"{what}: {path} holds {array.dtype}{list(array.shape)}, expected {dtype}"
            f"{list(shape) if shape is not None else ''}; the file is corrupt. Rebuild it."
        )
    return array


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX flock) held for the duration of the block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def jsonable(obj: Mapping[str, Any], what: str) -> str:
    """One-line JSON of a metadata dict (raises LexVLAError if it cannot be serialised).

    Text is kept as UTF-8, except in a record holding lone surrogates (an undecodable file name, a
    "\\ud800" JSON escape), which is written with \\u escapes: still one valid UTF-8 line that reads
    back to the same strings.
    """
    try:
        line = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        if not line.isascii():
            try:
                line.encode("utf-8")
            except UnicodeEncodeError:
                line = json.dumps(obj, separators=(",", ":"), allow_nan=False)
        return line
    except (TypeError, ValueError, RecursionError) as err:
        raise LexVLAError(f"{what}: metadata is not JSON-serialisable ({err})") from None
