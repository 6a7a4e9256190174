"""`encode_corpus`: images -> sparse lexical shard files, resumable and shardable across processes.

Each input shard (a WebDataset tar, or a fixed-size chunk of a folder's sorted image list) becomes one
shard file set under `out_dir` (written by :mod:`lexvla.index.shards`: CSR int32 word ids and float16
weights plus JSON-lines metadata). A finished shard is never redone, so a killed run resumes where it
stopped; rank r of `world_size` processes takes every world_size-th shard (torchrun sets RANK and
WORLD_SIZE, `srun` SLURM_PROCID and SLURM_NTASKS). Images that cannot be decoded are skipped and
listed in the encode report.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lexvla._atomic import atomic_write_text
from lexvla._fingerprint import weights_fingerprint
from lexvla._launch import launcher_env
from lexvla.data.prefetch import prefetched
from lexvla.data.transforms import load_image
from lexvla.errors import LexVLAError
from lexvla.search.corpus import CorpusShard, folder_key, iter_items, list_shards

if TYPE_CHECKING:
    from lexvla.models.lexvla import LexVLA

logger = logging.getLogger(__name__)

FAILED_DIR = "failed"  # per-shard lists of images that could not be decoded (JSON)


def model_reference(model: LexVLA, name: str | None = None) -> dict[str, Any]:
    """What an index records about the model that encoded it (enough to load it and check it)."""
    if name is not None and Path(name).exists():
        name = str(Path(name).resolve())
    return {
        "name": name,
        "vocab_size": model.vocab.size,
        "vocab_fingerprint": model.vocab.fingerprint(),
        "sparsify": model.cfg.lexical.sparsify,
        "index_max_words": model.cfg.lexical.index_max_words,
        "weights_sha256": trained_weights_fingerprint(model),
    }


def trained_weights_fingerprint(model: LexVLA) -> str:
    """The exact fingerprint of the trainable tensors (sorted by name): it changes when the model is
    retrained, so vectors of an older model are never mixed into a corpus folder."""
    return weights_fingerprint(sorted(model.trainable_parameters().items()), exact=True)


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values, else the launcher's (:func:`lexvla._launch.launcher_env`: torchrun's RANK /
    WORLD_SIZE, else SLURM's SLURM_PROCID / SLURM_NTASKS), else (0, 1)."""
    env_rank, env_world_size, _ = launcher_env()
    rank = env_rank if rank is None else rank
    world_size = env_world_size if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise LexVLAError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")
    return rank, world_size


def encode_corpus(
    model: LexVLA,
    images: str | Path | list[str | Path],
    out_dir: str | Path,
    *,
    batch_size: int = 16,
    chunk_size: int = 1000,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    max_words: int | None = None,
    model_name: str | None = None,
    image_dtype: str | None = None,
) -> dict[str, Any]:
    """Encode a corpus of images into sparse lexical shard files (idempotent, resumable).

    Args:
        model: the LexVLA model to encode with.
        images: a folder of images (chunked by `chunk_size`), a folder of .tar shards, a glob, or a
            list of WebDataset .tar files.
        out_dir: the shard directory (`<shard>.npz` + `<shard>.jsonl`, `manifest.json`, `vocab.json`;
            conventionally `lex_emb/`), the input of `lexvla index build --from`.
        batch_size: images per forward pass.
        chunk_size: images per shard for a plain folder.
        rank, world_size: this process takes shards `rank, rank + world_size, ...`; default from
            torchrun's RANK / WORLD_SIZE, else SLURM's SLURM_PROCID / SLURM_NTASKS, else 0 / 1.
        progress: show a progress bar with images/s.
        max_words: cap on words per image (default `model.cfg.lexical.index_max_words`).
        model_name: how the index should name the model (a preset, run or checkpoint folder), so
            that `SearchEngine.open` can build it again.
        image_dtype: the backbone's precision, "float32" | "bfloat16" | "auto" (bf16 where native);
            default: the model's `model.vision.inference_dtype`.

    Returns:
        The encode report (also written to `out_dir/encode_report[-rank<r>].json`): shards encoded and
        skipped, images encoded, images that failed to decode (key, source, error), images/s.
    """
    from lexvla.index import shards as shard_files

    if batch_size < 1:
        raise LexVLAError(f"batch_size must be >= 1, got {batch_size}")
    if image_dtype is not None:
        model.set_image_inference_dtype(image_dtype)
    rank, world_size = resolve_rank(rank, world_size)
    cap = model.cfg.lexical.index_max_words if max_words is None else max_words
    out_dir = Path(out_dir)
    mine = list_shards(images, chunk_size)[rank::world_size]
    shard_files.init_shard_dir(out_dir, model.vocab.words, model_reference(model, model_name))
    report: dict[str, Any] = {"encoded": [], "skipped": [], "images": 0, "failed": []}
    start = time.perf_counter()
    model.eval()
    with _progress_bar(mine, progress, rank) as bar:
        for shard in mine:
            if shard_files.shard_finished(out_dir, shard.name):
                _check_unchanged(out_dir, shard)
                report["skipped"].append(shard.name)
                report["failed"].extend(_read_failures(out_dir, shard.name))
                continue
            count, failures = _encode_shard(model, shard, out_dir, batch_size, cap, bar)
            report["encoded"].append(shard.name)
            report["images"] += count
            report["failed"].extend(failures)
    seconds = time.perf_counter() - start
    report.update(
        rank=rank,
        world_size=world_size,
        shards=len(mine),
        seconds=round(seconds, 3),
        images_per_second=round(report["images"] / seconds, 2) if seconds > 0 else 0.0,
        out_dir=str(out_dir),
    )
    name = "encode_report.json" if world_size == 1 else f"encode_report-rank{rank}.json"
    _write_json(out_dir / name, report)
    logger.info(
        "encoded %d images in %d shards (%d skipped as done, %d images failed) at %.1f images/s",
        report["images"],
        len(report["encoded"]),
        len(report["skipped"]),
        len(report["failed"]),
        report["images_per_second"],
    )
    return report


def _encode_shard(
    model: LexVLA, shard: CorpusShard, out_dir: Path, batch_size: int, cap: int, bar: Any
) -> tuple[int, list[dict[str, str]]]:
    """Encode one shard and write it; returns (images encoded, failures). The next batch is decoded
    and preprocessed in a background thread while the model encodes the current one."""
    from lexvla.index import shards as shard_files

    failures: list[dict[str, str]] = []
    metadata: list[dict[str, object]] = []
    rows: list[tuple[np.ndarray, np.ndarray]] = []
    for batch_meta, pixels in prefetched(_decoded_batches(model, shard, batch_size, failures)):
        rows.extend(_encode_batch(model, pixels, cap))
        metadata.extend(batch_meta)
        bar.update(len(batch_meta))
    # The failure list first, the shard last: the shard file is what marks the shard as done.
    _write_json(out_dir / FAILED_DIR / f"{shard.name}.json", failures)
    lengths = np.array([len(ids) for ids, _ in rows], dtype=np.int64)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    indices = np.concatenate([ids for ids, _ in rows] or [np.zeros(0)]).astype(np.int32)
    values = np.concatenate([v for _, v in rows] or [np.zeros(0)]).astype(np.float16)
    shard_files.write_shard(out_dir, shard.name, indptr, indices, values, metadata)
    if failures:
        logger.warning("%s: %d images could not be decoded (skipped)", shard.name, len(failures))
    return len(metadata), failures


def _decoded_batches(
    model: LexVLA, shard: CorpusShard, batch_size: int, failures: list[dict[str, str]]
) -> Iterator[tuple[list[dict[str, object]], torch.Tensor]]:
    """(metadata, (B, 3, S, S) pixels) per `batch_size` decodable images of `shard`; an image that
    cannot be decoded is appended to `failures` and skipped."""
    batch: list[tuple[dict[str, object], Any]] = []
    for item in iter_items(shard):
        source = str(item.metadata.get("path") or item.metadata.get("tar"))
        if item.data is None:
            failures.append({"key": item.key, "source": source, "error": item.metadata["error"]})
            continue
        try:
            batch.append((item.metadata, load_image(item.data)))
        except LexVLAError as err:
            failures.append(
                {"key": item.key, "source": source, "error": clean_error(err, item.key)}
            )
            continue
        if len(batch) == batch_size:
            yield [meta for meta, _ in batch], model.preprocess([image for _, image in batch])
            batch = []
    if batch:
        yield [meta for meta, _ in batch], model.preprocess([image for _, image in batch])


def _encode_batch(
    model: LexVLA, pixels: torch.Tensor, cap: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(word ids, weights) of each image of a (B, 3, S, S) batch, at most `cap` words each."""
    with torch.no_grad():
        weights = model.encode_image(pixels).image_weights  # (B, V)
        sparse = model.to_sparse(weights.float(), max_words=cap)
    indptr = sparse.indptr.cpu().numpy()
    indices = sparse.indices.cpu().numpy()
    values = sparse.values.float().cpu().numpy()
    return [(indices[lo:hi], values[lo:hi]) for lo, hi in zip(indptr[:-1], indptr[1:])]


def clean_error(err: Exception, name: str) -> str:
    """A decode error message naming `name` instead of PIL's in-memory buffer."""
    message = str(err).replace("<bytes>", name)
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", message)


def _check_unchanged(out_dir: Path, shard: CorpusShard) -> None:
    """A finished folder chunk must still hold the same files (else its chunks have shifted)."""
    if shard.tar is not None:
        return
    from lexvla.index import shards as shard_files

    done = {m["key"] for m in shard_files.read_shard(out_dir, shard.name, verify=False).metadata}
    done |= {f["key"] for f in _read_failures(out_dir, shard.name)}
    now = {folder_key(shard, p) for p in shard.files}
    if done != now:
        raise LexVLAError(
            f"the image folder changed since {out_dir} was written (shard {shard.name} held other "
            "files): encode into a new --out folder, or put new images in WebDataset tars"
        )


def _read_failures(out_dir: Path, shard: str) -> list[dict[str, str]]:
    path = out_dir / FAILED_DIR / f"{shard}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return []


def _write_json(path: Path, data: object) -> None:
    """Atomic, durable write, so a kill never leaves half a file (a full disk: DiskFullError)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1))


def _progress_bar(shards: list[CorpusShard], enabled: bool, rank: int) -> Any:
    from tqdm.auto import tqdm

    hints = [s.size_hint for s in shards]
    total = sum(h for h in hints if h is not None) if None not in hints else None
    return tqdm(
        total=total,
        unit="img",
        desc=f"encode (rank {rank})" if rank else "encode",
        disable=not enabled,
        dynamic_ncols=True,
    )
