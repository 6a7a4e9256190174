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
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lexvla.data.sample import utf8_text
from lexvla.data.webdataset import MAX_MEMBER_BYTES, safe_member, truncated_tar
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


def folder_key(shard: CorpusShard, path: Path) -> str:
    """The document key of an image file of a folder chunk: its path below the folder."""
    return utf8_text(path.relative_to(shard.root).as_posix() if shard.root else path.name)


def iter_items(shard: CorpusShard) -> Iterator[CorpusItem]:
    """The documents of a shard in a stable order (file order, or tar order).

    A document whose file name or archive path is not valid UTF-8 cannot be recorded in the
    metadata: it is given with no image and an error (listed as a failure, not encoded).
    """
    for item in _iter_folder(shard) if shard.tar is None else _iter_tar(shard):
        names = [v for v in item.metadata.values() if isinstance(v, str)]
        if item.data is not None and any(utf8_text(v) != v for v in names):
            meta = {
                "key": utf8_text(item.key),
                "path": utf8_text(str(item.metadata["path"])),
                "error": "its file name or archive path is not valid UTF-8: rename it",
            }
            item = CorpusItem(meta["key"], meta, None)
        yield item


def _iter_folder(shard: CorpusShard) -> Iterator[CorpusItem]:
    for path in shard.files:
        key = folder_key(shard, path)
        try:
            data = path.read_bytes()
        except OSError as err:
            meta = {"key": key, "path": utf8_text(str(path.resolve())), "error": str(err)}
            yield CorpusItem(key, meta, None)
            continue
        yield CorpusItem(key, {"key": key, "path": str(path.resolve())}, data)


def _iter_tar(shard: CorpusShard) -> Iterator[CorpusItem]:
    """WebDataset samples: consecutive members sharing a key (`dir/name` up to the first dot).

    A damaged archive (truncated, garbage, bad gzip) keeps the samples read before the damage and
    ends with one failure item naming it; a tar the disk cannot read (OSError) raises LexVLAError.
    """
    assert shard.tar is not None
    try:
        with tarfile.open(shard.tar, "r|*") as tar:
            sample_key, members = None, {}
            for member in tar:
                if not safe_member(member) or member.size > MAX_MEMBER_BYTES:
                    continue  # links, devices, names like ../x or /x, oversized members: ignored
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
        damage = truncated_tar(shard.tar)
    except (tarfile.TarError, EOFError, zlib.error) as err:  # the content is damaged
        damage = err
    except OSError as err:
        raise LexVLAError(f"cannot read the tar shard {shard.tar}: {err}") from None
    if damage is None:
        return
    error = (
        f"the archive is damaged ({type(damage).__name__}: {damage}); samples before it were kept"
    )
    key = f"{shard.name}/(damaged archive)"
    yield CorpusItem(key, {"key": key, "path": utf8_text(str(shard.tar)), "error": error}, None)


def _tar_sample(shard: CorpusShard, key: str | None, members: dict) -> CorpusItem:
    doc_key = utf8_text(f"{shard.name}/{key}")
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
    """The sample's caption from its `.txt`, else its `.json` `caption`; "" when there is none."""
    text = ""
    if "txt" in members:
        text = members["txt"][1].decode("utf-8", "replace").strip()
    elif "json" in members:
        try:
            value = json.loads(members["json"][1])
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: [[[[... nesting
            return ""
        if isinstance(value, dict) and isinstance(value.get("caption"), str):
            text = value["caption"].strip()
    return utf8_text(text)


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
