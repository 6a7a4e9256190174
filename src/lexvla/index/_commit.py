"""Publishing staged changes as a new generation, atomically; pointer file and garbage collection.

Index directory layout::

    CURRENT                       name of the published generation ("gen-000003"), replaced atomically
    LOCK                          flock target: one writer at a time (readers never lock)
    generations/gen-000003/       immutable published generations (see _generation.py)
    pending/<seq>.add/, <seq>.del.json   staged changes (see _staging.py)
    tmp/                          partial writes; whatever a crashed writer left is removed

`commit` writes the new generation under `tmp/`, renames it into `generations/` and only then replaces
`CURRENT`. A crash at any point leaves `CURRENT` naming a complete generation (the old or the new one)
and the staged changes in place; the next commit discards changes the published generation already
applied (`applied_seq`) and redoes the rest.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from lexvla.errors import LexVLAError
from lexvla.index import _io, _staging
from lexvla.index._generation import (
    DocTable,
    Generation,
    link_generation,
    open_generation,
    write_generation,
)

logger = logging.getLogger(__name__)

GEN_RE = re.compile(r"^gen-\d{6}$")


def crash_point(event: str) -> None:
    """No-op hook called at the risky points of a build; tests replace it to SIGKILL the process.

    Events: "staged" (after each staged add), "commit:written" (new generation written, not yet
    published) and "commit:published" (published, staged changes not yet removed).
    """


def read_current(root: Path) -> str:
    try:
        name = (root / "CURRENT").read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise LexVLAError(
            f"{root} is not a sparse index (no CURRENT file); create it with SparseIndex.create"
            " or build_index"
        ) from None
    if not GEN_RE.match(name):
        raise LexVLAError(f"{root / 'CURRENT'} names {name!r}, not a generation: damaged index")
    return name


def publish(root: Path, staged: Path, name: str) -> None:
    """Move a complete generation into place and point CURRENT at it (atomic replace).

    A folder of the same name that CURRENT does not name (a crash or a full disk after the rename,
    before CURRENT was replaced) was never published: it is replaced.
    """
    (root / "generations").mkdir(exist_ok=True)
    final = root / "generations" / name
    if final.exists():
        shutil.rmtree(final)
    os.rename(staged, final)
    _io.fsync_dir(root / "generations")
    try:
        _io.atomic_write_bytes(root / "CURRENT", (name + "\n").encode())
    except (OSError, LexVLAError):  # raised before CURRENT was replaced: `final` is unpublished
        shutil.rmtree(final, ignore_errors=True)
        raise


def _gc(root: Path, keep: set[str]) -> None:
    """Remove generations other than `keep` (readers holding them keep their memory maps)."""
    for p in (root / "generations").iterdir():
        if p.name not in keep and GEN_RE.match(p.name):
            shutil.rmtree(p, ignore_errors=True)


def _line_offsets(docs: bytes, start: int) -> np.ndarray:
    """(rows,) end offsets (shifted by `start`) of the newline-terminated lines of `docs`."""
    ends = np.flatnonzero(np.frombuffer(docs, np.uint8) == 10) + 1
    return ends.astype(np.int64) + start


def _apply(g: Generation, ops: list[_staging.PendingOp]) -> DocTable:
    """The documents of `g` with the staged changes applied in sequence order."""
    t = g.doc_table()
    keys = t.keys
    active = {k: d for d, k in enumerate(keys) if not t.deleted[d]}
    indptr, terms, weights = [t.doc_indptr], [t.doc_terms], [t.doc_weights]
    offsets, pieces, gone = [t.docs_offsets], list(t.docs_jsonl), []
    nnz, end = len(t.doc_terms), int(t.docs_offsets[-1])
    for op in ops:
        if op.kind == "del":
            gone += [active.pop(k) for k in op.keys if k in active]
            continue
        ip, ix, vals, docs = _staging.load_add(op)
        clash = next((k for k in op.keys if k in active), None)
        if clash is not None:
            raise LexVLAError(
                f"staged change {op.path} adds key {clash!r}, which is already indexed; remove {op.path}"
            )
        active.update((k, len(keys) + i) for i, k in enumerate(op.keys))
        keys = keys + op.keys
        indptr.append(ip[1:] + nnz)
        terms.append(ix)
        weights.append(vals)
        offsets.append(_line_offsets(docs, end))
        pieces.append(docs)
        nnz, end = nnz + len(ix), end + len(docs)
    deleted = np.zeros(len(keys), bool)
    deleted[: len(t.deleted)] = t.deleted
    deleted[gone] = True
    cat = np.concatenate
    return DocTable(cat(indptr), cat(terms), cat(weights), deleted, pieces, cat(offsets), keys)


def _compact(t: DocTable) -> DocTable:
    """The same documents without the deleted ones (ids renumbered in order)."""
    keep = ~t.deleted
    lengths = np.diff(t.doc_indptr)
    row_keep = np.repeat(keep, lengths)
    indptr = np.concatenate([[0], np.cumsum(lengths[keep])]).astype(np.int64)
    docs = b"".join(bytes(p) for p in t.docs_jsonl)
    off = t.docs_offsets
    lines = [docs[off[d] : off[d + 1]] for d in np.flatnonzero(keep)]
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in lines], dtype=np.int64)]).astype(
        np.int64
    )
    keys = [k for k, kept in zip(t.keys, keep) if kept]
    return DocTable(
        indptr,
        t.doc_terms[row_keep],
        t.doc_weights[row_keep],
        np.zeros(len(keys), bool),
        lines,
        offsets,
        keys,
    )


def commit(root: Path, *, compact: bool = False) -> str | None:
    """Apply the staged changes to the published generation and publish the result (hold LOCK).

    Returns:
        The new generation's name, or None when there was nothing to do.
    """
    _staging.clear_tmp(root)
    current = read_current(root)
    g = open_generation(root / "generations" / current, verify=True)
    applied = int(g.manifest["applied_seq"])
    ops = _staging.list_ops(root)
    for op in (op for op in ops if op.seq <= applied):
        _staging.remove_op(op)  # a crash after publishing left it behind: already applied
    ops = [op for op in ops if op.seq > applied]
    if not ops and not (compact and g.manifest["num_deleted"]):
        return None
    number = int(g.manifest["generation"]) + 1
    name = f"gen-{number:06d}"
    sources = dict(g.manifest["sources"])
    sources.update((op.source["name"], op.source["sha256"]) for op in ops if op.source)
    info: dict[str, Any] = {
        "generation": number,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": g.manifest["model"],
        "dense_fraction": g.manifest["dense_fraction"],
        "applied_seq": max([applied] + [op.seq for op in ops]),
        "sources": sources,
    }
    staged = root / "tmp" / name
    table = _apply(g, ops)
    try:
        if all(op.kind == "del" for op in ops) and not compact:
            link_generation(staged, g.path, table.deleted, info)
        else:
            write_generation(
                staged, _compact(table) if compact else table, g.vocab, info, link_from=g.path
            )
        crash_point("commit:written")
        publish(root, staged, name)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)  # a full disk gets its space back
        raise
    crash_point("commit:published")
    for op in ops:
        _staging.remove_op(op)
    _gc(root, keep={name, current})
    logger.info("published %s (%d staged changes applied, compact=%s)", name, len(ops), compact)
    return name
