"""Staged (not yet committed) changes of an index: durable, ordered, applied by `commit`.

Each `add` becomes a directory `pending/<seq>.add/` (CSR arrays, metadata lines, `info.json` with the
keys, the source shard and per-file sha256), written under `tmp/` and renamed into place, so it exists
completely or not at all. Each `delete` becomes `pending/<seq>.del.json`. Sequence numbers order them;
a generation records the last sequence number it applied (`applied_seq`), so operations left behind by
a crash after publishing are recognised and discarded instead of being applied twice.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lexvla._atomic import reporting_full_disk
from lexvla.errors import LexVLAError
from lexvla.index import _io

_ADD_ARRAYS = {"indptr": "int64", "indices": "int32", "values": "float32"}


@dataclass(frozen=True)
class PendingOp:
    """A staged add (`kind == "add"`, rows > 0) or delete (`kind == "del"`)."""

    seq: int
    kind: str
    path: Path
    keys: list[str]
    source: dict[str, str] | None = None  # {"name": shard name, "sha256": its npz checksum}
    info: dict[str, Any] = field(default_factory=dict)


def list_ops(root: Path) -> list[PendingOp]:
    """Staged operations in sequence order (unreadable leftovers raise LexVLAError)."""
    ops = []
    pending = root / "pending"
    if not pending.is_dir():
        return ops
    for p in pending.iterdir():
        seq_text, _, kind = p.name.partition(".")
        if not seq_text.isdigit() or kind not in ("add", "del.json"):
            continue
        what = f"staged change {p}"
        if kind == "add":
            info = _io.read_json(p / "info.json", what)
            ops.append(
                PendingOp(int(seq_text), "add", p, list(info["keys"]), info.get("source"), info)
            )
        else:
            ops.append(PendingOp(int(seq_text), "del", p, list(_io.read_json(p, what)["keys"])))
    return sorted(ops, key=lambda op: op.seq)


def _op_name(seq: int, kind: str) -> str:
    return f"{seq:010d}.{kind}"


def stage_add(
    root: Path,
    seq: int,
    arrays: tuple[np.ndarray, np.ndarray, np.ndarray],
    lines: list[str],
    keys: list[str],
    source: dict[str, str] | None,
) -> PendingOp:
    """Durably stage an add of canonical CSR `arrays` (indptr, indices, values) with metadata `lines`."""
    tmp = root / "tmp" / f"add-{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    try:
        info = _write_add(tmp, seq, arrays, lines, keys, source)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk gets its space back
        raise
    final = root / "pending" / _op_name(seq, "add")
    final.parent.mkdir(exist_ok=True)
    os.rename(tmp, final)
    _io.fsync_dir(final.parent)
    return PendingOp(seq, "add", final, keys, source, info)


def _write_add(
    tmp: Path,
    seq: int,
    arrays: tuple[np.ndarray, np.ndarray, np.ndarray],
    lines: list[str],
    keys: list[str],
    source: dict[str, str] | None,
) -> dict[str, Any]:
    """The files of a staged add, fsynced, into folder `tmp`; returns its info.json content."""
    files = {}
    for (name, dtype), array in zip(_ADD_ARRAYS.items(), arrays):
        files[f"{name}.npy"] = _io.write_npy(tmp / f"{name}.npy", array.astype(dtype, copy=False))
    docs = "".join(line + "\n" for line in lines).encode("utf-8")
    with reporting_full_disk(tmp / "docs.jsonl"), open(tmp / "docs.jsonl", "wb") as f:
        f.write(docs)
        f.flush()
        _io.fsync_file(f.fileno())
    files["docs.jsonl"] = _io.sha256_file(tmp / "docs.jsonl")
    info = {"seq": seq, "rows": len(keys), "keys": keys, "source": source, "files": files}
    _io.atomic_write_json(tmp / "info.json", info)
    _io.fsync_dir(tmp)
    return info


def stage_delete(root: Path, seq: int, keys: list[str]) -> PendingOp:
    path = root / "pending" / _op_name(seq, "del.json")
    path.parent.mkdir(exist_ok=True)
    _io.atomic_write_json(path, {"seq": seq, "keys": keys})
    return PendingOp(seq, "del", path, keys)


def load_add(op: PendingOp) -> tuple[np.ndarray, np.ndarray, np.ndarray, bytes]:
    """The staged arrays and metadata bytes of an add, checked against their sha256."""
    for name, sha in op.info["files"].items():
        if _io.sha256_file(op.path / name) != sha:
            raise LexVLAError(
                f"staged change {op.path / name} is corrupt (sha256 mismatch); remove {op.path}"
                " and add those documents again"
            )
    what = f"staged change {op.path}"
    a = [
        _io.load_npy(op.path / f"{n}.npy", d, None, mmap=False, what=what)
        for n, d in _ADD_ARRAYS.items()
    ]
    docs = (op.path / "docs.jsonl").read_bytes()
    if len(a[0]) != len(op.keys) + 1 or docs.count(b"\n") != len(op.keys):
        raise LexVLAError(f"{what} is inconsistent (row counts differ); remove it and add again")
    return a[0], a[1], a[2], docs


def remove_op(op: PendingOp) -> None:
    if op.kind == "add":
        shutil.rmtree(op.path, ignore_errors=True)
    else:
        op.path.unlink(missing_ok=True)


def clear_tmp(root: Path) -> None:
    """Remove partial writes of crashed writers (call under the writer lock)."""
    tmp = root / "tmp"
    if tmp.is_dir():
        for p in tmp.iterdir():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
