"""Finding ImageNet in one of the three layouts people have, and reading its files' bytes.

Every file found becomes either a `SourceFile` (an input that will be decoded) or a `Reject` (listed in
the output with its reason). Nothing found is dropped silently.
"""
from __future__ import annotations

import csv
import io
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..formats.files import pread_exact
from .imagenet_names import imagenet_1k

# A location is a small tuple so that it pickles cheaply to worker processes:
#   ("file", path)                      a file on disk
#   ("tar", archive, offset, size)      a member's bytes inside an uncompressed tar (also nested tars)
Location = tuple


@dataclass(frozen=True)
class SourceFile:
    ref: str  # how the file is named in messages and rejected.jsonl: a path relative to SRC
    wnid: str
    name: str  # the file's base name; with wnid it identifies the image in every layout
    location: Location


@dataclass(frozen=True)
class Reject:
    ref: str
    reason: str
    split: str | None = None

    def as_dict(self) -> dict:
        return {"path": self.ref, "split": self.split, "reason": self.reason}


@dataclass
class ScannedSource:
    layout: str
    root: Path
    train: list[SourceFile]
    val: list[SourceFile] | None
    class_names: dict[str, str]
    train_wnids: list[str]  # every class directory or per-class tar, empty ones included
    rejected: list[Reject] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class SourceError(Exception):
    """SRC cannot be used; the message says why and what is accepted."""


ACCEPTED_LAYOUTS = """accepted layouts:
  ImageFolder      SRC/train/<wnid>/*.JPEG, optionally SRC/val/<wnid>/*.JPEG
  Kaggle ILSVRC    SRC/ILSVRC/Data/CLS-LOC/{train,val}, SRC/LOC_val_solution.csv, SRC/LOC_synset_mapping.txt
  official tars    SRC/ILSVRC2012_img_train.tar, optionally SRC/ILSVRC2012_img_val.tar with
                   SRC/ILSVRC2012_devkit_t12.tar.gz (or its unpacked folder) for the validation labels"""

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12"

WNID_RE = re.compile(r"n\d{8}")
Progress = Callable[[int], None]  # called with the number of files found so far


def read_bytes(location: Location) -> bytes:
    """Read one input's bytes. Tar members are read in place with pread: nothing is unpacked to disk."""
    if location[0] == "file":
        with open(location[1], "rb") as f:
            return f.read()
    _, archive, offset, size = location
    return pread_exact(archive, offset, size)


def detect_and_scan(src: Path, progress: Progress | None = None) -> ScannedSource:
    src = src.expanduser().resolve()
    if not src.exists():
        raise SourceError(f"{src}: does not exist\n{ACCEPTED_LAYOUTS}")
    if not src.is_dir():
        raise SourceError(f"{src}: not a directory\n{ACCEPTED_LAYOUTS}")
    if (src / TRAIN_TAR).is_file():
        return scan_official(src, progress)
    for kaggle_root, data in ((src, src / "ILSVRC" / "Data" / "CLS-LOC"), (src.parent, src / "Data" / "CLS-LOC")):
        if (data / "train").is_dir():
            return scan_kaggle(kaggle_root, data, progress)
    if (src / "train").is_dir():
        return scan_imagefolder(src, progress)
    hint = ""
    if src.name in ("train", "val", "CLS-LOC") or any(WNID_RE.fullmatch(p.name) for p in src.iterdir() if p.is_dir()):
        hint = f" (it looks like part of a tree: pass the folder that holds train/, perhaps {src.parent})"
    raise SourceError(f"{src}: no ImageNet layout found{hint}\n{ACCEPTED_LAYOUTS}")


# ---------------------------------------------------------------- ImageFolder and Kaggle (files on disk)

def _walk_class_dir(root: Path, class_dir: Path, wnid: str, progress: Progress | None,
                    found: list[SourceFile]) -> None:
    """Every non-directory entry below a class directory is an input, as torchvision's ImageFolder
    recurses too. Non-images are rejected later, by the decoder, with their reason."""
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            found.append(SourceFile(str(path.relative_to(root)), wnid, name, ("file", str(path))))
            if progress and len(found) % 1000 == 0:
                progress(len(found))


def _scan_class_tree(root: Path, tree: Path, split: str, progress: Progress | None,
                     rejected: list[Reject], notes: list[str]) -> tuple[list[str], list[SourceFile]]:
    """Class directories are the non-hidden directories of `tree`, empty ones included (as in torchvision's
    ImageFolder: removing a directory would shift every later label). A hidden directory (.ipynb_checkpoints,
    .Trash) is not a class: its files are listed as rejected."""
    wnids, files, loose, hidden = [], [], 0, []
    for entry in sorted(tree.iterdir()):
        rel = str(entry.relative_to(root))
        if entry.is_dir() and entry.name.startswith("."):
            hidden.append(entry.name)
            stray: list[SourceFile] = []
            _walk_class_dir(root, entry, entry.name, None, stray)
            rejected += [Reject(f.ref, "inside a hidden directory, which is not a class", split) for f in stray]
        elif entry.is_dir():
            wnids.append(entry.name)
            before = len(files)
            _walk_class_dir(root, entry, entry.name, progress, files)
            if len(files) == before:
                notes.append(f"{rel} is empty: class {entry.name} keeps its label but has no {split} images")
        else:
            rejected.append(Reject(rel, "not inside a class directory", split))
            loose += 1
    if hidden:
        notes.append(f"{tree}: hidden directories {hidden} are not classes; their files are listed as rejected")
    if loose and split == "val" and not wnids:
        notes.append(f"{tree} holds {loose} images directly, not in class directories (the raw ILSVRC val "
                     "layout), so they have no labels: use the Kaggle or official-archive layout, or sort them "
                     "into val/<wnid>/")
    return wnids, files


def _note_unusual_names(wnids: list[str], notes: list[str]) -> None:
    odd = [w for w in wnids if not WNID_RE.match(w)]
    if odd:
        notes.append(f"{len(odd)} class directories are not ImageNet wnids (e.g. {odd[:3]}); they are classes "
                     "all the same, so labels differ from the standard ImageNet indices")


def _filter_val_classes(val: list[SourceFile], train_wnids: list[str], rejected: list[Reject]) -> list[SourceFile]:
    known = set(train_wnids)
    kept = []
    for f in val:
        if f.wnid in known:
            kept.append(f)
        else:
            rejected.append(Reject(f.ref, f"class {f.wnid} has no train directory, so it has no label", "val"))
    return kept


def _names_from_timm(wnids: list[str]) -> dict[str, str]:
    """Readable names for ImageNet wnids, from the synset table that timm ships."""
    try:
        known = imagenet_1k()
    except (ImportError, OSError):  # a table is a nicety; its absence must not stop a conversion
        return {}
    return {w: known[w] for w in wnids if w in known}


def scan_imagefolder(src: Path, progress: Progress | None = None) -> ScannedSource:
    rejected: list[Reject] = []
    notes: list[str] = []
    train_wnids, train = _scan_class_tree(src, src / "train", "train", progress, rejected, notes)
    if not train_wnids:
        raise SourceError(f"{src / 'train'}: no class directories found\n{ACCEPTED_LAYOUTS}")
    _note_unusual_names(train_wnids, notes)
    val = None
    if (src / "val").is_dir():
        _, val = _scan_class_tree(src, src / "val", "val", progress, rejected, notes)
        val = _filter_val_classes(val, train_wnids, rejected)
    names = _read_synset_mapping(src / "LOC_synset_mapping.txt") or _names_from_timm(train_wnids)
    return ScannedSource("imagefolder", src, train, val, names, train_wnids, rejected, notes)


def _read_synset_mapping(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    names = {}
    for line in path.read_text().splitlines():
        if line.strip():
            wnid, _, name = line.strip().partition(" ")
            names[wnid] = name
    return names


def scan_kaggle(root: Path, data: Path, progress: Progress | None = None) -> ScannedSource:
    rejected: list[Reject] = []
    notes = []
    train_wnids, train = _scan_class_tree(root, data / "train", "train", progress, rejected, notes)
    if not train_wnids:
        raise SourceError(f"{data / 'train'}: no class directories found\n{ACCEPTED_LAYOUTS}")
    _note_unusual_names(train_wnids, notes)
    val = None
    val_dir = data / "val"
    if val_dir.is_dir():
        solution = root / "LOC_val_solution.csv"
        if not solution.is_file():
            raise SourceError(f"{val_dir} exists but {solution} is missing: the Kaggle layout keeps the "
                              "validation labels there (or remove the val directory to convert train only)")
        labels = {}
        with open(solution, newline="") as f:
            for row in csv.DictReader(f):
                labels[row["ImageId"]] = row["PredictionString"].split()[0]
        val = []
        for entry in sorted(val_dir.iterdir()):
            ref = str(entry.relative_to(root))
            wnid = labels.pop(entry.name.split(".")[0], None)
            if entry.is_dir():
                rejected.append(Reject(ref, "unexpected directory in the flat Kaggle val folder", "val"))
            elif wnid is None:
                rejected.append(Reject(ref, "no row in LOC_val_solution.csv, so it has no label", "val"))
            else:
                val.append(SourceFile(ref, wnid, entry.name, ("file", str(entry))))
        if labels:
            notes.append(f"LOC_val_solution.csv names {len(labels)} images that are not in {val_dir}")
        val = _filter_val_classes(val, train_wnids, rejected)
    if (data / "test").is_dir():
        notes.append(f"{data / 'test'} ignored: the test images have no public labels")
    names = _read_synset_mapping(root / "LOC_synset_mapping.txt") or _names_from_timm(train_wnids)
    return ScannedSource("kaggle", root, train, val, names, train_wnids, rejected, notes)


# ---------------------------------------------------------------- official archives (read in place)

def _open_tar(path: Path | str, fileobj=None) -> tarfile.TarFile:
    try:
        return tarfile.open(path if fileobj is None else None, mode="r:", fileobj=fileobj)
    except tarfile.TarError as e:
        raise SourceError(f"{path}: not a readable uncompressed tar ({e}); re-download it, or unpack it "
                          "and use the ImageFolder layout") from e


def scan_official(src: Path, progress: Progress | None = None) -> ScannedSource:
    rejected: list[Reject] = []
    archive = src / TRAIN_TAR
    train, train_wnids = [], []
    with _open_tar(archive) as outer:
        for member in outer:  # per-class tars: n01440764.tar ...
            if not member.isfile():
                continue
            if not member.name.endswith(".tar"):
                rejected.append(Reject(f"{TRAIN_TAR}/{member.name}", "not a per-class tar", "train"))
                continue
            wnid = Path(member.name).stem
            train_wnids.append(wnid)
            with _open_tar(f"{archive}/{member.name}", outer.extractfile(member)) as inner:
                # Listing a nested tar reads its 512-byte headers only; the image bytes are read later
                # by offset, straight from the outer archive.
                for m in inner:
                    ref = f"{TRAIN_TAR}/{member.name}/{m.name}"
                    if not m.isfile():
                        continue
                    location = ("tar", str(archive), member.offset_data + m.offset_data, m.size)
                    train.append(SourceFile(ref, wnid, Path(m.name).name, location))
                    if progress and len(train) % 1000 == 0:
                        progress(len(train))
    if not train_wnids:
        raise SourceError(f"{archive}: holds no per-class tars (n01440764.tar ...)")
    train_wnids.sort()
    train.sort(key=lambda f: (f.wnid, f.name))
    devkit_ids, names = _read_devkit(src) if (src / VAL_TAR).is_file() else (None, {})
    val = None
    if (src / VAL_TAR).is_file():
        val = []
        with _open_tar(src / VAL_TAR) as tar:
            members = sorted((m for m in tar if m.isfile()), key=lambda m: m.name)
        for m in members:
            ref = f"{VAL_TAR}/{m.name}"
            wnid = devkit_ids.get(Path(m.name).name.split(".")[0])
            if wnid is None:
                rejected.append(Reject(ref, "not in the devkit's validation ground truth", "val"))
            else:
                val.append(SourceFile(ref, wnid, Path(m.name).name, ("tar", str(src / VAL_TAR), m.offset_data, m.size)))
        val = _filter_val_classes(val, train_wnids, rejected)
    if not names:
        names = _names_from_timm(train_wnids)
    return ScannedSource("official", src, train, val, names, train_wnids, rejected)


def _read_devkit(src: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Validation labels from the devkit: ground_truth.txt holds one ILSVRC2012_ID per validation image
    (in file-name order), and meta.mat maps those ids to wnids. Returns ({val image stem: wnid}, names)."""
    gt_name, meta_name = "data/ILSVRC2012_validation_ground_truth.txt", "data/meta.mat"
    folder, archive = src / DEVKIT, src / f"{DEVKIT}.tar.gz"
    if (folder / gt_name).is_file() and (folder / meta_name).is_file():
        gt, meta = (folder / gt_name).read_bytes(), (folder / meta_name).read_bytes()
    elif archive.is_file():
        with tarfile.open(archive, "r:gz") as tar:
            read = {Path(m.name).as_posix().split("/", 1)[-1]: m for m in tar.getmembers()}
            if gt_name not in read or meta_name not in read:
                raise SourceError(f"{archive}: lacks {gt_name} or {meta_name}")
            gt, meta = tar.extractfile(read[gt_name]).read(), tar.extractfile(read[meta_name]).read()
    else:
        raise SourceError(f"{src / VAL_TAR} needs the devkit for its labels: put {archive.name} (or its "
                          f"unpacked folder {DEVKIT}/) beside it")
    from scipy.io import loadmat  # only this layout needs scipy
    synsets = loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
    id_to_wnid, names = {}, {}
    for s in synsets:
        if int(s["num_children"]) == 0:  # the 1,000 leaf synsets are the classes
            id_to_wnid[int(s["ILSVRC2012_ID"])] = str(s["WNID"])
            names[str(s["WNID"])] = str(s["words"])
    labels = {}
    for i, line in enumerate(gt.decode().split(), start=1):
        labels[f"ILSVRC2012_val_{i:08d}"] = id_to_wnid[int(line)]
    return labels, names
