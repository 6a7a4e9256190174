"""The writing half of SparseIndex: staging adds and deletes under the directory lock, committing.

Kept apart from `sparse.py` (reading and search); `SparseIndex` inherits it. Every method works on the
latest published generation and the staged changes on disk, never on the generation this object has
open for reading, so several writer objects or processes can take turns on one index.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from numpy.typing import ArrayLike

from lexvla.errors import LexVLAError
from lexvla.index import _commit, _io, _staging
from lexvla.index._csr import canonical_csr
from lexvla.index._generation import open_generation

logger = logging.getLogger(__name__)


class IndexWriter:
    """Mixin: `add`, `delete`, `pending`, `commit` (needs `path`, `vocab` and `refresh()`)."""

    path: Path
    _lock_depth: int = 0
    _active_cache: tuple[Any, set[str]] | None = None

    @property
    def vocab(self) -> list[str]:  # provided by SparseIndex
        raise NotImplementedError

    def refresh(self, *, verify: bool = True) -> bool:  # provided by SparseIndex
        raise NotImplementedError

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the directory's writer lock (re-entrant within this object)."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        with _io.file_lock(self.path / "LOCK"):
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0

    def _latest_state(self) -> tuple[dict[str, Any], list[_staging.PendingOp]]:
        """(manifest of the latest published generation, staged ops it has not applied)."""
        gen_path = self.path / "generations" / _commit.read_current(self.path)
        manifest = _io.read_json(gen_path / "manifest.json", f"index {self.path}")
        ops = [op for op in _staging.list_ops(self.path) if op.seq > manifest["applied_seq"]]
        return manifest, ops

    def _active_keys(self) -> set[str]:
        """Keys of the active documents once the staged changes are applied (call under lock)."""
        manifest, ops = self._latest_state()
        token = (manifest["generation"], tuple(op.seq for op in ops))
        if self._active_cache is not None and self._active_cache[0] == token:
            return self._active_cache[1]
        g = open_generation(
            self.path / "generations" / f"gen-{manifest['generation']:06d}", verify=False
        )
        deleted = g.arrays["deleted"]
        active = {k for d, k in enumerate(g.keys()) if not deleted[d]}
        for op in ops:
            (active.update if op.kind == "add" else active.difference_update)(op.keys)
        self._active_cache = (token, active)
        return active

    def _next_seq(self) -> int:
        manifest, ops = self._latest_state()
        return max([int(manifest["applied_seq"])] + [op.seq for op in ops]) + 1

    def add(
        self,
        indptr: ArrayLike,
        indices: ArrayLike,
        values: ArrayLike,
        metadata: Sequence[Mapping[str, Any]],
    ) -> int:
        """Stage documents: a CSR batch of lexical vectors and one metadata dict each.

        The documents become searchable after `commit()`. Staged changes are durable: a process killed
        before committing loses nothing (the next `commit()` publishes them).

        Args:
            indptr, indices, values: (n+1,), (nnz,), (nnz,) CSR of n vectors (word ids < V, weights
                >= 0; stored as float32).
            metadata: n dicts, each with a unique non-empty string "key" (not already indexed).

        Returns:
            n, the number of documents staged.
        """
        return self._stage_add(indptr, indices, values, metadata, source=None)

    def _stage_add(
        self,
        indptr: ArrayLike,
        indices: ArrayLike,
        values: ArrayLike,
        metadata: Sequence[Mapping[str, Any]],
        source: dict[str, str] | None,
    ) -> int:
        arrays = canonical_csr(indptr, indices, values, len(self.vocab), "SparseIndex.add")
        lines, keys = _check_metadata(metadata, len(arrays[0]) - 1)
        if not keys:
            return 0
        with self._writing():
            active = self._active_keys()
            clash = next((k for k in keys if k in active), None)
            if clash is not None:
                raise LexVLAError(
                    f"key {clash!r} is already in the index; delete it first to replace it"
                )
            _staging.stage_add(self.path, self._next_seq(), arrays, lines, keys, source)
            active.update(keys)
            self._active_cache = None
        _commit.crash_point("staged")
        return len(keys)

    def delete(self, keys: Sequence[str]) -> int:
        """Stage the deletion of documents by key (applied by `commit()`).

        Returns:
            The number of active documents that will be deleted; unknown keys are logged and skipped.
        """
        if isinstance(keys, str):
            keys = [keys]
        with self._writing():
            active = self._active_keys()
            found = list(dict.fromkeys(k for k in keys if k in active))
            missing = len(set(keys)) - len(found)
            if missing:
                logger.warning(
                    "delete: %d of %d keys are not in the index; skipped", missing, len(set(keys))
                )
            if found:
                _staging.stage_delete(self.path, self._next_seq(), found)
                self._active_cache = None
        return len(found)

    def pending(self) -> int:
        """Number of staged, uncommitted changes (adds and deletes)."""
        return len(self._latest_state()[1])

    def commit(self, *, compact: bool = False) -> bool:
        """Publish the staged changes as a new generation (atomically) and switch to it.

        A commit that adds documents rewrites the whole generation (posting lists are rebuilt from the
        doc-major vectors: ~2-4 s per 100k documents here), so stage many adds per commit. A commit
        of deletions only hard-links the previous files and writes a new deletion mask.

        Args:
            compact: also drop deleted documents (renumbers document ids; keys are unchanged).

        Returns:
            True if a new generation was published.
        """
        with self._writing():
            name = _commit.commit(self.path, compact=compact)
            self._active_cache = None
        self.refresh()
        return name is not None


def _check_metadata(
    metadata: Sequence[Mapping[str, Any]], rows: int
) -> tuple[list[str], list[str]]:
    if len(metadata) != rows:
        raise LexVLAError(f"SparseIndex.add: {rows} vectors but {len(metadata)} metadata dicts")
    lines, keys = [], []
    for i, record in enumerate(metadata):
        key = record.get("key") if isinstance(record, Mapping) else None
        if not isinstance(key, str) or not key:
            raise LexVLAError(f"SparseIndex.add: metadata {i} needs a non-empty string 'key'")
        keys.append(key)
        lines.append(_io.jsonable(record, f"SparseIndex.add metadata {i}"))
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        dup = next(k for k in keys if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise LexVLAError(f"SparseIndex.add: key {dup!r} appears twice in the batch")
    return lines, keys
