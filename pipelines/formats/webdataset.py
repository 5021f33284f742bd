"""Webdataset shards (plain POSIX tars) and the index files DALI's `fn.readers.webdataset` reads.

A shard is byte-identical for the same samples: every tar header carries fixed metadata (mtime 0, uid 0,
mode 0644, no user names), so a resumed conversion reproduces the shards of an uninterrupted one exactly.

The index is DALI's format v1.2 (what DALI's `wds2idx` tool writes): a first line `v1.2 <samples>`, then one
line per sample listing `<ext> <offset of the data> <size> <member name>` for each of its members.
"""
from __future__ import annotations

import hashlib
import os
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .files import commit, pread_exact, tmp_path
from .layout import CLASS_EXT, IMAGE_EXT, LABEL_EXT

BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240: tar pads the archive to whole records, as GNU tar does
INDEX_VERSION = "v1.2"


def sample_members(key: str, label: int, jpeg: bytes) -> list[tuple[str, bytes]]:
    return [
        (f"{key}.{IMAGE_EXT}", jpeg),
        (f"{key}.{CLASS_EXT}", str(label).encode("ascii")),
        (f"{key}.{LABEL_EXT}", struct.pack("<i", label)),
    ]


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = size, 0, 0o644, 0, 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


@dataclass(frozen=True)
class ShardInfo:
    samples: int
    tar_bytes: int
    tar_sha256: str
    index_bytes: int
    index_sha256: str


class ShardWriter:
    """Writes `<tar>.tmp` and `<idx>.tmp` as samples arrive; `commit()` syncs and renames both."""

    def __init__(self, tar: Path, index: Path):
        self.tar, self.index = tar, index
        tar.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(tmp_path(tar), "wb")
        self._sha = hashlib.sha256()
        self._offset = 0
        self._lines: list[str] = []

    def _write(self, data: bytes) -> None:
        self._f.write(data)
        self._sha.update(data)
        self._offset += len(data)

    def add(self, key: str, label: int, jpeg: bytes) -> None:
        fields = []
        for name, data in sample_members(key, label, jpeg):
            self._write(_header(name, len(data)))
            fields.append(f"{name.split('.', 1)[1]} {self._offset} {len(data)} {name}")
            self._write(data + b"\0" * (-len(data) % BLOCK))
        self._lines.append(" ".join(fields))

    def commit(self) -> ShardInfo:
        end = b"\0" * (2 * BLOCK)
        self._write(end + b"\0" * (-(self._offset + len(end)) % RECORD))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        index = (f"{INDEX_VERSION} {len(self._lines)}\n" + "\n".join(self._lines) + "\n").encode()
        with open(tmp_path(self.index), "wb") as f:
            f.write(index)
            f.flush()
            os.fsync(f.fileno())
        commit(tmp_path(self.tar), self.tar)
        commit(tmp_path(self.index), self.index)
        return ShardInfo(len(self._lines), self._offset, self._sha.hexdigest(), len(index),
                         hashlib.sha256(index).hexdigest())

    def abort(self) -> None:
        self._f.close()
        tmp_path(self.tar).unlink(missing_ok=True)


@dataclass(frozen=True)
class Member:
    ext: str
    offset: int
    size: int
    name: str


def read_index(path: Path) -> list[list[Member]]:
    """Parse a v1.2 index; raises ValueError naming the file and line on anything malformed."""
    lines = path.read_text().splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise ValueError(f"{path}: line 1 is not '{INDEX_VERSION} <samples>'")
    if int(head[1]) != len(lines) - 1:
        raise ValueError(f"{path}: header says {head[1]} samples but {len(lines) - 1} lines follow")
    samples = []
    for number, line in enumerate(lines[1:], start=2):
        parts = line.split()
        if not parts or len(parts) % 4:
            raise ValueError(f"{path}: line {number} is not '<ext> <offset> <size> <name>' repeated")
        try:
            samples.append([Member(parts[i], int(parts[i + 1]), int(parts[i + 2]), parts[i + 3])
                            for i in range(0, len(parts), 4)])
        except ValueError:
            raise ValueError(f"{path}: line {number} has a non-numeric offset or size") from None
    return samples


class ShardReader:
    """Random access to the samples of shards through their index files: one pread per member, no tar
    parsing."""

    def __init__(self, shards: list[tuple[Path, Path]]):
        self.tars, rows = [], []
        for tar, index in shards:
            for members in read_index(index):
                by_ext = {m.ext: m for m in members}
                image = by_ext[IMAGE_EXT]
                rows.append((len(self.tars), image.offset, image.size, by_ext[LABEL_EXT].offset))
            self.tars.append(str(tar))
        self.rows = np.array(rows, dtype=np.int64).reshape(-1, 4)

    def __len__(self) -> int:
        return len(self.rows)

    def image_bytes(self) -> int:
        return int(self.rows[:, 2].sum())

    def where(self, i: int) -> str:
        """Sample i's shard and position, for error messages."""
        return f"{self.tars[int(self.rows[i][0])]} (sample {i} of the split, JPEG at byte {int(self.rows[i][1])})"

    def read(self, i: int) -> tuple[bytes, int]:
        """(JPEG bytes, label) of sample i."""
        shard, offset, size, label_offset = (int(v) for v in self.rows[i])
        tar = self.tars[shard]
        return pread_exact(tar, offset, size), struct.unpack("<i", pread_exact(tar, label_offset, 4))[0]
