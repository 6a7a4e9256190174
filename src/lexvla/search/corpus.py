"""Reading an image corpus as shards: a plain folder (fixed-size chunks of its sorted file list) or
WebDataset tar files (one shard per tar).

Every document gets a stable key and metadata that says where its image lives (`path`, or `tar` and
`member`), so the image can be read back later by document id: a server never needs a path from a
request.
"""

from __future__ import annotations

import glob
import json
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lexvla.errors import LexVLAError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")


@dataclass(frozen=True)
class CorpusShard:
    """One unit of encoding work: a WebDataset tar, or a chunk of a folder's image files."""

    name: str
    tar: Path | None = None
    files: tuple[Path, ...] = ()
    root: Path | None = None  # the folder that keys of `files` are relative to

    @property
    def size_hint(self) -> int | None:
        """Number of images when known in advance (folder chunks), else None."""
        return len(self.files) if self.tar is None else None


@dataclass
class CorpusItem:
    """One document before encoding: its key, its metadata and its image bytes."""

    key: str
    metadata: dict[str, object]
    data: bytes | None  # None: the sample has no image (listed as a failure)


def list_shards(
    images: str | Path | Sequence[str | Path], chunk_size: int = 1000
) -> list[CorpusShard]:
    """The shards of a corpus given as a folder, a glob of tars or a list of tar files.

    A folder that holds `*.tar` files and no images is read as a folder of WebDataset shards.

    Raises:
        LexVLAError: nothing to encode, a missing path, or a mix of images and tars.
    """
    if chunk_size < 1:
        raise LexVLAError(f"chunk_size must be >= 1, got {chunk_size}")
    paths = _expand(images)
    if len(paths) == 1 and paths[0].is_dir():
        root = paths[0]
        files = sorted(
            (p for p in root.rglob("*") if p.is_file() and _extension(p.name) in IMAGE_EXTENSIONS),
            key=lambda p: p.relative_to(root).as_posix(),
        )
        if files:
            return [
                CorpusShard(
                    f"chunk-{i // chunk_size:05d}",
                    files=tuple(files[i : i + chunk_size]),
                    root=root,
                )
                for i in range(0, len(files), chunk_size)
            ]
        paths = sorted(p for p in root.iterdir() if p.name.endswith(TAR_EXTENSIONS))
        if not paths:
            raise LexVLAError(
                f"{root} holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no .tar shards"
            )
    return _tar_shards(paths)


def _expand(images: str | Path | Sequence[str | Path]) -> list[Path]:
    items = [images] if isinstance(images, str | Path) else list(images)
    paths: list[Path] = []
    for item in items:
        text = str(item)
        matches = sorted(glob.glob(text)) if any(c in text for c in "*?[") else [text]
        if not matches:
            raise LexVLAError(f"no file matches {text}: check the pattern")
        paths.extend(Path(m) for m in matches)
    if not paths:
        raise LexVLAError("no images given: pass a folder of images or WebDataset .tar shards")
    for path in paths:
        if not path.exists():
            raise LexVLAError(f"{path} does not exist: give a folder of images or .tar shards")
    return paths


def _tar_shards(paths: list[Path]) -> list[CorpusShard]:
    shards: list[CorpusShard] = []
    names: set[str] = set()
    for path in paths:
        if path.is_dir() or not path.name.endswith(TAR_EXTENSIONS):
            raise LexVLAError(
                f"{path} is not a .tar shard: give one folder of images, or WebDataset .tar files"
            )
        name = re.sub(r"[^A-Za-z0-9._-]", "_", _stem(path.name)).lstrip("._-")[:180] or "shard"
        if name in names:  # same file name in two folders: keep both, apart
            name = f"{name}-{len(shards):05d}"
        names.add(name)
        shards.append(CorpusShard(name, tar=path.resolve()))
    return shards


def _extension(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def _stem(name: str) -> str:
    for ext in TAR_EXTENSIONS:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def iter_items(shard: CorpusShard) -> Iterator[CorpusItem]:
    """The documents of a shard in a stable order (file order, or tar order)."""
    if shard.tar is None:
        for path in shard.files:
            key = path.relative_to(shard.root).as_posix() if shard.root else path.name
            try:
                data = path.read_bytes()
            except OSError as err:
                meta = {"key": key, "path": str(path.resolve()), "error": str(err)}
                yield CorpusItem(key, meta, None)
                continue
            yield CorpusItem(key, {"key": key, "path": str(path.resolve())}, data)
        return
    yield from _iter_tar(shard)


def _iter_tar(shard: CorpusShard) -> Iterator[CorpusItem]:
    """WebDataset samples: consecutive members sharing a key (`dir/name` up to the first dot)."""
    assert shard.tar is not None
    try:
        with tarfile.open(shard.tar, "r|*") as tar:
            sample_key, members = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                key = member.name[: len(member.name) - len(base)] + base.split(".", 1)[0]
                if key != sample_key and members:
                    yield _tar_sample(shard, sample_key, members)
                    members = {}
                sample_key = key
                handle = tar.extractfile(member)
                ext = base.split(".", 1)[1].lower() if "." in base else ""
                members[ext] = (member.name, handle.read() if handle else b"")
            if members:
                yield _tar_sample(shard, sample_key, members)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise LexVLAError(f"cannot read the tar shard {shard.tar}: {err}") from None


def _tar_sample(shard: CorpusShard, key: str | None, members: dict) -> CorpusItem:
    doc_key = f"{shard.name}/{key}"
    metadata: dict[str, object] = {"key": doc_key, "path": str(shard.tar), "tar": str(shard.tar)}
    caption = _caption(members)
    if caption:
        metadata["caption"] = caption
    for ext, (member_name, data) in members.items():
        if ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
            metadata["member"] = member_name
            metadata["path"] = f"{shard.tar}#{member_name}"  # for display; read via tar + member
            return CorpusItem(doc_key, metadata, data)
    metadata["error"] = f"no image member (found: {', '.join(sorted(members))})"
    return CorpusItem(doc_key, metadata, None)


def _caption(members: dict) -> str:
    if "txt" in members:
        return members["txt"][1].decode("utf-8", "replace").strip()
    if "json" in members:
        try:
            value = json.loads(members["json"][1])
        except (ValueError, UnicodeDecodeError):
            return ""
        if isinstance(value, dict) and isinstance(value.get("caption"), str):
            return value["caption"]
    return ""


def read_document_bytes(metadata: dict[str, object]) -> bytes:
    """The image bytes of an indexed document, from its recorded `path` or `tar` + `member`.

    Raises:
        LexVLAError: the recorded file is gone or unreadable.
    """
    try:
        if "tar" in metadata and "member" in metadata:
            with tarfile.open(str(metadata["tar"]), "r:*") as tar:
                handle = tar.extractfile(str(metadata["member"]))
                if handle is None:
                    raise LexVLAError(f"{metadata['member']} is not a file in {metadata['tar']}")
                return handle.read()
        if "path" in metadata:
            return Path(str(metadata["path"])).read_bytes()
    except (OSError, KeyError, tarfile.TarError) as err:
        raise LexVLAError(
            f"the image of document {metadata.get('key')} cannot be read ({err}): was the corpus "
            "moved? Re-encode it or restore the files"
        ) from None
    raise LexVLAError(f"document {metadata.get('key')} records no image path")
