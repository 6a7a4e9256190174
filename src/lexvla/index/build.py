"""build_index: build or extend a SparseIndex from a directory of corpus shards (resumable)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lexvla.errors import LexVLAError
from lexvla.index.shards import ShardManifest, read_shard, read_shard_manifest, read_shard_vocab
from lexvla.index.sparse import DEFAULT_DENSE_FRACTION, SparseIndex

logger = logging.getLogger(__name__)


def build_index(
    from_dir: str | Path,
    out: str | Path,
    *,
    dense_fraction: float | None = DEFAULT_DENSE_FRACTION,
    check_model: bool = True,
) -> SparseIndex:
    """Index every finished shard of `from_dir` that `out` does not hold yet, then commit.

    Each shard is staged durably before the next is read, and the index records which shards (name and
    checksum) it holds, so a build that is killed can simply be run again: shards already indexed or
    staged are skipped, the rest are added, nothing is duplicated or lost. Until the final commit the
    previously published index stays searchable.

    Args:
        from_dir: a shard directory (see `lexvla.index.shards`), e.g. `runs/x/lex_emb`.
        out: the index directory; created (with the shards' vocabulary and model) if it does not exist.
        dense_fraction: for a new index, see `SparseIndex.create`.
        check_model: refuse shards whose model reference differs from the index's.

    Returns:
        The index, opened on the newly published generation.

    Raises:
        LexVLAError: if the shards' vocabulary (hash) or model differs from the index's, or a shard
            already indexed has changed since.
    """
    src, root = Path(from_dir), Path(out)
    shards = read_shard_manifest(src)
    if (root / "CURRENT").exists():
        index = SparseIndex.open(root)
    else:
        index = SparseIndex.create(
            root, read_shard_vocab(src), shards.model, dense_fraction=dense_fraction
        )
    with index._writing():
        latest, ops = index._latest_state()
        check_compatible(latest, shards, src, f"the index {root}", check_model)
        done = dict(latest["sources"])
        done.update((op.source["name"], op.source["sha256"]) for op in ops if op.source)
        added = 0
        for info in shards.shards:
            if info.name in done:
                if done[info.name] != info.npz_sha256:
                    raise LexVLAError(
                        f"shard {info.name} in {src} changed since it was indexed in {root};"
                        " delete its documents and rebuild, or build a new index"
                    )
                continue
            shard = read_shard(src, info.name)
            source = {"name": info.name, "sha256": info.npz_sha256}
            added += index._stage_add(
                shard.indptr, shard.indices, shard.values, shard.metadata, source
            )
            logger.info("staged shard %s (%d documents)", info.name, shard.num_rows)
        index.commit()
    logger.info("index %s: %d documents (%d added)", root, len(index), added)
    return index


def check_compatible(
    latest: Mapping[str, Any], shards: ShardManifest, src: Path, target: str, check_model: bool
) -> None:
    """Refuse shards over another vocabulary than `latest` (an index manifest or a Milvus collection's
    property, named `target` in messages), or (if `check_model`) from another model."""
    if latest["vocab_sha256"] != shards.vocab_sha256:
        raise LexVLAError(
            f"{src} was encoded over another vocabulary (sha256 {shards.vocab_sha256[:12]}) than"
            f" {target} ({latest['vocab_sha256'][:12]}); build a new index for it"
        )
    if check_model and latest["model"] != shards.model:
        raise LexVLAError(
            f"{src} was encoded by {shards.model}, {target} by {latest['model']};"
            " build a new index, or pass check_model=False if they are the same model"
        )
