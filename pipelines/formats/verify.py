"""Re-read a converted dataset and check it against its manifest: files, checksums, counts and labels.

Every problem is reported as one line naming the file. The DALI shards and the .beton of a split hold the
same samples in the same order, so their labels and image bytes are also compared sample by sample.
"""
from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
from collections import Counter
from pathlib import Path
from typing import Callable

from PIL import Image

from .files import sha256_file
from .layout import CLASS_EXT, IMAGE_EXT, LABEL_EXT, REJECTED
from .manifest import RECONVERT, load_manifest
from .webdataset import read_index

Tick = Callable[[str], None]


def _check_jpeg(where: str, data: bytes, decode: bool, problems: list[str]) -> int:
    """Returns the image's longer side in pixels, from its header (0 when unreadable)."""
    try:
        im = Image.open(io.BytesIO(data))
        if im.format != "JPEG" or im.mode != "RGB":
            problems.append(f"{where}: stored image is {im.format} {im.mode}, expected an RGB JPEG")
        elif decode:
            im.load()
        return max(im.size)
    except Exception as e:
        problems.append(f"{where}: stored image does not decode: {e}")
        return 0


def _read_shard(tar: Path, index: Path, problems: list[str]) -> list[tuple[str, dict[str, bytes]]] | None:
    """[(key, {ext: bytes})] in tar order, or None after reporting why the shard is unreadable."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    offsets = {}
    try:
        with tarfile.open(tar, "r:") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext] = archive.extractfile(member).read()
                offsets[member.name] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{tar}: truncated or corrupt tar ({e}); {RECONVERT}")
        return None
    try:
        entries = read_index(index)
    except (OSError, ValueError) as e:
        problems.append(f"{index}: unreadable index ({e}); {RECONVERT}")
        return samples
    listed = {m.name: (m.offset, m.size) for sample in entries for m in sample}
    if listed != offsets:
        problems.append(f"{index}: does not match {tar.name} (offsets, sizes or members differ); {RECONVERT}")
    return samples


def _check_dali(out: Path, split: str, info: dict, num_classes: int, decode: bool, problems: list[str],
                tick: Tick) -> list[tuple[int, str, int]]:
    """Returns [(label, sha1 of the image, its longer side)] in stored order."""
    directory = out / info["dali"]["dir"]
    seen: list[tuple[int, str, int]] = []
    last_key = ""
    for tar_name, index_name in info["dali"]["shards"]:
        tick(f"{split}: {tar_name}")
        samples = _read_shard(directory / tar_name, directory / index_name, problems)
        for key, members in samples or []:
            where = f"{directory / tar_name}: sample {key}"
            if set(members) != {IMAGE_EXT, CLASS_EXT, LABEL_EXT}:
                problems.append(f"{where}: members {sorted(members)}, expected {IMAGE_EXT}, {CLASS_EXT}, {LABEL_EXT}")
                continue
            if key <= last_key:
                problems.append(f"{where}: key out of order or repeated")
            last_key = key
            text, raw = members[CLASS_EXT], members[LABEL_EXT]
            label = int(text) if text.isdigit() else -1
            if len(raw) != 4 or struct.unpack("<i", raw)[0] != label or not 0 <= label < num_classes:
                problems.append(f"{where}: labels disagree or out of range (.cls {text!r}, .label.i32 {raw.hex()})")
            side = _check_jpeg(where, members[IMAGE_EXT], decode, problems)
            seen.append((label, hashlib.sha1(members[IMAGE_EXT]).hexdigest(), side))
    return seen


def _check_ffcv(path: Path, num_classes: int, decode: bool, problems: list[str]) -> list[tuple[int, str, int]] | None:
    try:
        from ffcv.reader import Reader
        reader = Reader(str(path))
        size = path.stat().st_size
        meta = reader.metadata
        if len(meta) != reader.num_samples or reader.field_names != ["image", "label"]:
            raise ValueError(f"{len(meta)} of {reader.num_samples} sample records, fields {reader.field_names}")
        sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    except ImportError:
        problems.append(f"{path}: cannot check, FFCV is not installed (pip install '.[ffcv]')")
        return None
    except Exception as e:
        problems.append(f"{path}: FFCV cannot read it ({type(e).__name__}: {e}); {RECONVERT}")
        return None
    seen = []
    with open(path, "rb") as f:
        for i, (image, label) in enumerate(zip(meta["f0"], meta["f1"])):
            ptr = int(image["data_ptr"])
            n = sizes.get(ptr)
            if n is None or ptr + n > size:
                problems.append(f"{path}: sample {i} points outside the file (truncated?); {RECONVERT}")
                return seen
            f.seek(ptr)
            data = f.read(n)
            if not 0 <= int(label) < num_classes:
                problems.append(f"{path}: sample {i} has label {int(label)}, outside 0..{num_classes - 1}")
            side = _check_jpeg(f"{path}: sample {i}", data, decode, problems)
            seen.append((int(label), hashlib.sha1(data).hexdigest(), side))
    return seen


def _check_counts(where: str, seen: list[tuple[int, str, int]], info: dict, num_classes: int,
                  problems: list[str]) -> None:
    """The sample count, the per-class counts and the largest side (absent from manifests written before the
    converter recorded it) against the manifest."""
    if len(seen) != info["samples"]:
        problems.append(f"{where}: {len(seen)} samples, manifest says {info['samples']}")
    largest = max((side for *_, side in seen), default=0)
    if "largest_side" in info and largest != info["largest_side"]:
        problems.append(f"{where}: the longest stored side is {largest} px, manifest says {info['largest_side']}")
    counts = Counter(label for label, *_ in seen)
    per_class = [counts.get(c, 0) for c in range(num_classes)]
    if per_class != info["per_class"]:
        wrong = [c for c in range(num_classes) if per_class[c] != info["per_class"][c]]
        problems.append(f"{where}: per-class counts differ from the manifest for classes {wrong[:10]}")


def verify(out: Path, decode: bool = False, tick: Tick = lambda _: None) -> list[str]:
    """Returns the problems found (empty when the dataset is sound). Raises DatasetError without a manifest."""
    out = Path(out)
    manifest = load_manifest(out)
    problems: list[str] = []
    for rel, meta in manifest["files"].items():
        path = out / rel
        tick(f"checksum {rel}")
        if not path.is_file():
            problems.append(f"{path}: missing; {RECONVERT}")
        elif path.stat().st_size != meta["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {meta['bytes']} (truncated?); "
                            f"{RECONVERT}")
        elif sha256_file(path) != meta["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (corrupted or modified); {RECONVERT}")
    num_classes = manifest["num_classes"]
    for split, info in manifest["splits"].items():
        dali = ffcv = None
        if "dali" in info:
            dali = _check_dali(out, split, info, num_classes, decode, problems, tick)
            _check_counts(f"{out / info['dali']['dir']}", dali, info, num_classes, problems)
        if info.get("ffcv"):
            tick(f"{split}: {info['ffcv']}")
            ffcv = _check_ffcv(out / info["ffcv"], num_classes, decode, problems)
            if ffcv is not None:
                _check_counts(str(out / info["ffcv"]), ffcv, info, num_classes, problems)
        if dali is not None and ffcv is not None and dali != ffcv:
            first = next((i for i, (a, b) in enumerate(zip(dali, ffcv)) if a != b), min(len(dali), len(ffcv)))
            problems.append(f"{split}: the .beton and the DALI shards differ from sample {first} on")
    rejected = out / REJECTED
    if rejected.is_file():
        listed = [json.loads(line) for line in rejected.read_text().splitlines() if line.strip()]
        if listed != manifest["rejected"]:
            problems.append(f"{rejected}: does not match the manifest's list of rejected inputs")
    return problems

