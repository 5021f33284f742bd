"""Crash-safe file writing: every output is written under a temporary name, synced, then renamed.

A reader (or a resumed run) therefore sees either the previous state or the complete new file, never a
half-written one, even after `kill -9` or a power cut.
"""
from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

TMP_SUFFIX = ".tmp"


def tmp_path(path: Path) -> Path:
    return path.with_name(path.name + TMP_SUFFIX)


def fsync_dir(directory: Path) -> None:
    """Make a rename durable: the new directory entry is only on disk once the directory is synced."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, final: Path) -> None:
    """Rename a finished, synced temporary file to its final name."""
    os.replace(tmp, final)
    fsync_dir(final.parent)


@contextmanager
def atomic_open(path: Path) -> Iterator[BinaryIO]:
    """Open `path.tmp` for writing; on success sync it and rename it to `path`, on error remove it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    commit(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def remove_tmp_files(directory: Path) -> int:
    """Discard the partial outputs a killed run left behind; returns how many were removed."""
    if not directory.exists():
        return 0
    stale = [p for p in directory.rglob("*" + TMP_SUFFIX) if p.is_file()]
    for p in stale:
        p.unlink()
    return len(stale)


# Per process: readers take thousands of members from one tar. Bounded, least recently used first out:
# ImageNet has ~1,300 shards and the usual limit is 1,024 open files.
_open_for_pread: dict[str, int] = {}
MAX_OPEN = 256


def pread_exact(path: str, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` of `path`, through a cached descriptor (pread has no shared file position,
    so processes forked with the cache can use it too). A short read means the file is truncated."""
    fd = _open_for_pread.pop(path, None)
    if fd is None:
        if len(_open_for_pread) >= MAX_OPEN:
            os.close(_open_for_pread.pop(next(iter(_open_for_pread))))
        fd = os.open(path, os.O_RDONLY)
    _open_for_pread[path] = fd  # (re)inserted last: dicts keep insertion order
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise OSError(f"{path} ends inside a member ({len(data)} of {size} bytes at offset {offset}); "
                      "the file is truncated")
    return data
