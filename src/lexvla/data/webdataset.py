"""Streaming image-caption shards in img2dataset's WebDataset layout, without the webdataset package.

A shard is a `.tar` (or gzipped `.tar.gz` / `.tgz`) whose members are grouped into samples by key:
`000000012.jpg` (or `.png`, `.webp`), `000000012.txt` (the caption; one caption per non-empty line) and
optionally `000000012.json` (`caption` / `captions`, `key`, `words`). The key is the member name up to
the first dot of its file name.

Tars are read with :mod:`tarfile` in streaming mode (`r|*`, gzip allowed) and never extracted: members
are read into memory one by one. Member names that could escape a folder (absolute, `..`) and anything
that is not a regular file are ignored. A shard that cannot be read (garbage, truncated) is logged and
counted, and the samples read before the damage are kept; an undecodable image skips its sample.

:class:`ShardDataset` is an `IterableDataset`: the shard list is shuffled by `(seed, epoch)` (same order
on every rank), shard position i goes to rank `i % world_size`, and a rank's shards are dealt to the
DataLoader workers the same way, so every shard is read exactly once per epoch.
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from lexvla._atomic import atomic_file
from lexvla.data.sample import Sample, SkipCounter, utf8_text
from lexvla.data.transforms import load_image
from lexvla.errors import LexVLAError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
MAX_MEMBER_BYTES = 64 * 2**20  # a larger member is no image-caption data: skipped
_BRACE = re.compile(r"\{([^{}]*)\}")


# ------------------------------------------------------------------------------ shard lists
def expand_braces(pattern: str) -> list[str]:
    """Expand `{a,b}` lists and `{000..009}` ranges (zero padding kept), left to right."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        lo, hi = span.group(1), span.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [out for item in items for out in expand_braces(head + item + tail)]


def expand_shards(spec: str | Path | Iterable[str | Path]) -> list[str]:
    """Shard paths of a directory (its `*.tar`), a glob, a brace pattern, a file, or a list of these.

    Raises:
        LexVLAError: nothing matches.
    """
    if not isinstance(spec, str | Path):
        return [s for item in spec for s in expand_shards(item)]
    text = str(spec)
    if Path(text).is_dir():
        folder = Path(text)
        shards = sorted(str(p) for ext in ("*.tar", "*.tar.gz", "*.tgz") for p in folder.glob(ext))
    else:
        shards = []
        for pattern in expand_braces(text):
            if any(c in pattern for c in "*?["):
                shards.extend(sorted(glob.glob(pattern)))
            elif Path(pattern).is_file():
                shards.append(pattern)
    if not shards:
        raise LexVLAError(
            f"no .tar shards found for {text}: give a folder of .tar files, a glob "
            "(shards/*.tar) or a brace pattern (shards/{00000..00009}.tar)"
        )
    return shards


# ------------------------------------------------------------------------------ reading one tar
def safe_member(member: tarfile.TarInfo) -> bool:
    """True for a regular file whose name stays inside the archive root."""
    if not member.isfile():
        return False
    name = member.name.replace("\\", "/")
    parts = PurePosixPath(name).parts
    return bool(parts) and not name.startswith("/") and ".." not in parts and ":" not in parts[0]


def truncated_tar(path: str | Path) -> tarfile.ReadError | None:
    """An error if an uncompressed tar is cut short (its size is not a multiple of 512 bytes).

    tarfile reads a header cut in the middle as the end of the archive, silently.
    """
    if str(path).endswith(".tar") and os.path.getsize(path) % tarfile.BLOCKSIZE:
        return tarfile.ReadError("the file is truncated (not a whole number of 512-byte blocks)")
    return None


def _split_name(name: str) -> tuple[str, str]:
    """`dir/0001.seg.jpg` -> (`dir/0001`, `seg.jpg`): key up to the file name's first dot."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_tar_groups(
    source: str | Path, skips: SkipCounter | None = None
) -> Iterator[dict[str, Any]]:
    """Yield `{"__key__": key, ext: bytes, ...}` per sample of one tar, in archive order.

    A shard that cannot be opened or breaks midway is recorded in `skips` (the partial sample at the
    break is dropped); unsafe or oversized members are ignored.
    """
    group: dict[str, Any] | None = None
    try:
        with open(source, "rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
            for member in tar:
                if not safe_member(member):
                    if not member.isdir():
                        logger.debug("%s: ignoring member %r", source, member.name)
                    continue
                if member.size > MAX_MEMBER_BYTES:
                    logger.warning("%s: ignoring oversized member %s", source, member.name)
                    continue
                key, ext = _split_name(member.name)
                file = tar.extractfile(member)
                data = file.read() if file is not None else b""
                if group is not None and group["__key__"] != key:
                    yield group
                    group = None
                group = group or {"__key__": key}
                group[ext] = data
            truncated = truncated_tar(source)
            if truncated is not None:
                raise truncated
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        if skips is not None:
            skips.add(str(source), f"unreadable shard ({type(err).__name__}: {err})")
        else:
            logger.warning("skipping the rest of unreadable shard %s: %s", source, err)
        return
    if group is not None:
        yield group


def decode_group(
    group: dict[str, Any], shard: str, skips: SkipCounter | None = None
) -> Sample | None:
    """Turn one member group into a :class:`Sample` (None, counted, if it has no usable image/caption)."""
    key = group["__key__"]
    name = f"{shard}:{key}"
    meta: dict[str, Any] = {}
    if "json" in group:
        try:
            meta = json.loads(group["json"].decode("utf-8"))
            meta = meta if isinstance(meta, dict) else {}
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            meta = {}
    captions = _captions(group, meta)
    ext = next((e for e in IMAGE_EXTENSIONS if e in group), None)
    reason = "no image member" if ext is None else "no caption" if not captions else ""
    if not reason:
        try:
            image = load_image(group[ext])
        except LexVLAError as err:
            reason = str(err).replace("<bytes>", f"{key}.{ext}")
    if reason:
        if skips is not None:
            skips.add(name, reason)
        return None
    words = meta.get("words")
    return Sample(
        str(meta.get("key") or key), image, captions, name, list(words) if words else None
    )


def _captions(group: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    if "txt" in group:
        text = group["txt"].decode("utf-8", errors="replace")
        lines = [line.strip() for line in text.splitlines()]
        if any(lines):
            return [line for line in lines if line]
    found = meta.get("captions") or ([meta["caption"]] if meta.get("caption") else [])
    found = found if isinstance(found, list) else [found]
    return [utf8_text(str(c).strip()) for c in found if str(c).strip()]


# ------------------------------------------------------------------------------ dataset
class _NoRandomAccess:
    """Hides `Dataset.__getitem__` so `hasattr(ds, "__getitem__")` tells streaming data apart."""

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        raise AttributeError("a ShardDataset streams: it has no random access (__getitem__)")


class ShardDataset(IterableDataset):
    """Stream samples from tar shards, split across distributed ranks and DataLoader workers.

    Args:
        shards: directory, glob, brace pattern, file or list (see :func:`expand_shards`).
        rank, world_size: this process's share; default: torch.distributed if initialised, else 0/1.
        seed: shard shuffling seed (same on every rank).
        shuffle: shuffle the shard order by `(seed, epoch)`; False keeps the sorted order.
    """

    def __init__(
        self,
        shards: str | Path | Iterable[str | Path],
        *,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        self.shards = expand_shards(shards)
        dist_rank, dist_world = _distributed_rank()
        self.rank = dist_rank if rank is None else rank
        self.world_size = dist_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise LexVLAError(f"rank {self.rank} is outside world size {self.world_size}")
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0
        self.skips = SkipCounter()
        if len(self.shards) < self.world_size:
            logger.warning(
                "%d shards for %d ranks: some ranks get no data", len(self.shards), self.world_size
            )

    __getitem__ = _NoRandomAccess()

    def set_epoch(self, epoch: int) -> None:
        """Choose the shard order of the next iteration (call before each epoch, on every rank)."""
        self.epoch = epoch

    def shard_order(self) -> list[str]:
        """All shards in this epoch's order (identical on every rank)."""
        if not self.shuffle:
            return list(self.shards)
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))
        return [self.shards[i] for i in perm]

    def local_shards(self) -> list[str]:
        """Shards of this rank and this DataLoader worker."""
        mine = self.shard_order()[self.rank :: self.world_size]
        info = get_worker_info()
        if info is not None:
            mine = mine[info.id :: info.num_workers]
        return mine

    def __iter__(self) -> Iterator[Sample]:
        for shard in self.local_shards():
            for group in iter_tar_groups(shard, self.skips):
                sample = decode_group(group, shard, self.skips)
                if sample is not None:
                    yield sample

    def __repr__(self) -> str:
        return (
            f"ShardDataset(shards={len(self.shards)}, rank={self.rank}/{self.world_size}, "
            f"epoch={self.epoch})"
        )


def _distributed_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# ------------------------------------------------------------------------------ writing
def write_shards(
    samples: Iterable[Sample | None],
    out_dir: str | Path,
    shard_size: int = 1000,
    *,
    image_format: str = "png",
    prefix: str = "",
) -> list[Path]:
    """Write samples as img2dataset-style shards `out_dir/{prefix}{00000..}.tar`; returns their paths.

    Member keys are 9-digit running numbers (`000000012.png/.txt/.json`); the sample's own key, path
    and words go into the `.json`. Captions are the `.txt`, one per line. Files are written under a
    temporary name and renamed, so a reader never sees half a shard. None items are skipped.
    """
    if shard_size <= 0:
        raise LexVLAError(f"shard_size must be positive, got {shard_size}")
    fmt = image_format.lower().lstrip(".")
    pil_format = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}.get(fmt)
    if pil_format is None:
        raise LexVLAError(f"image_format {image_format!r}: choose jpg, png or webp")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    kept = (sample for sample in samples if sample is not None)
    count = 0
    while (first := next(kept, None)) is not None:
        paths.append(out / f"{prefix}{count // shard_size:05d}.tar")
        with atomic_file(paths[-1]) as tmp, tarfile.open(tmp, "w") as tar:
            for sample in itertools.chain([first], itertools.islice(kept, shard_size - 1)):
                _add_sample(tar, f"{count:09d}", sample, fmt, pil_format)
                count += 1
    return paths


def _add_sample(tar: tarfile.TarFile, key: str, sample: Sample, fmt: str, pil_format: str) -> None:
    buffer = io.BytesIO()
    sample.image.save(buffer, format=pil_format, **({"quality": 95} if fmt != "png" else {}))
    meta = {"key": sample.key, "path": sample.path, "captions": sample.captions}
    if sample.words is not None:
        meta["words"] = sample.words
    _add(tar, f"{key}.{fmt}", buffer.getvalue())
    _add(tar, f"{key}.txt", "\n".join(c.replace("\n", " ") for c in sample.captions).encode())
    _add(tar, f"{key}.json", json.dumps(meta).encode())


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))
