"""Durable, atomic writes: the one helper every lexvla writer uses for files and folders.

A file is written under a hidden temporary name in its destination folder, flushed, fsynced and moved
into place with `os.replace`; the folder is then fsynced too. A reader therefore finds the old file or
the complete new one, never a partial write, after a killed process and after a power cut alike.
:func:`atomic_dir` does the same for a whole folder (model and training checkpoints).

A full disk (ENOSPC, or EDQUOT for a quota) while writing raises :class:`DiskFullError`, a
`LexVLAError` that names the destination and the filesystem to free; the temporary file or folder is
removed, so nothing under the final name changes and the space the write had taken is given back.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from lexvla.errors import LexVLAError

# Flush every write to disk before publishing it. Tests that create hundreds of tiny indexes switch
# it off for speed (a killed process loses nothing the kernel already has); nothing else should.
FSYNC = True

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# Libraries that report the OS error only in their message (safetensors: "... (os error 28)").
_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")


class DiskFullError(LexVLAError):
    """No space (or quota) was left on the filesystem a file was being written to."""


def fsync_file(fd: int) -> None:
    if FSYNC:
        os.fsync(fd)


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename or a new file) to disk; a no-op where unsupported."""
    if not FSYNC:
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (files a library wrote without fsync), then `root`."""
    if not FSYNC:
        return
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def is_disk_full(err: BaseException | None) -> bool:
    """True when `err`, or an exception it was raised from, reports a full disk or quota."""
    seen = 0
    while err is not None and seen < 20:
        if isinstance(err, OSError) and err.errno in _FULL_ERRNOS:
            return True
        if any(text in str(err) for text in _FULL_TEXTS):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def mount_point(path: Path) -> Path:
    """The mount point of the filesystem that holds `path` (or would hold it)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def disk_full_error(
    path: Path, then: str = "run again (what was written before is intact)"
) -> DiskFullError:
    """The error for a write to `path` that found no space: names the path, what to free and
    what to do `then`."""
    return DiskFullError(
        f"no space left on device while writing {path}: free space on {mount_point(path)}, "
        f"then {then}"
    )


@contextlib.contextmanager
def reporting_full_disk(path: Path) -> Iterator[None]:
    """Turn a full-disk error raised inside the block into a :class:`DiskFullError` naming `path`."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as err:
        if is_disk_full(err):
            raise disk_full_error(path) from None
        raise


def temporary_name(path: Path) -> Path:
    """A hidden sibling name for writing `path`, unique to this process and call."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s content to (by any library, e.g. safetensors).

    When the block succeeds, the file is fsynced, moved to `path` and the folder fsynced. When it
    fails, the temporary file is removed and a full disk becomes a :class:`DiskFullError`.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with reporting_full_disk(path):
            yield tmp
            fd = os.open(tmp, os.O_RDONLY)
            try:
                fsync_file(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes | Iterable[bytes | memoryview]) -> None:
    """Write `data` (bytes, or pieces to concatenate) to `path` atomically and durably."""
    with atomic_file(path) as tmp, open(tmp, "xb") as f:
        for piece in [data] if isinstance(data, bytes | bytearray | memoryview) else data:
            f.write(piece)
        f.flush()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` as UTF-8 to `path` atomically and durably."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, staging: Path | None = None) -> Iterator[Path]:
    """Yield a temporary sibling folder; when the block succeeds it replaces folder `path`.

    Every file in it is fsynced before the swap and the parent folder after it. When the block fails,
    the temporary folder is removed (and a full disk becomes a :class:`DiskFullError`).

    Args:
        path: the final folder (an existing one is swapped out, then removed).
        staging: an empty folder next to `path` to use instead of a fresh one (e.g. one that every
            rank of a distributed job writes into).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging or Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        with reporting_full_disk(path):
            yield tmp
            fsync_tree(tmp)
            replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder `src` to `dst`; an existing `dst` is moved aside first and then removed."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
