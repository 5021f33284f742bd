"""Re-pack a generated ImageFolder tree into the Kaggle and the official-archive layouts, as the real
downloads are laid out, so the converter's readers of those layouts are tested on real bytes."""
from __future__ import annotations

import csv
import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
from scipy.io import savemat


def _class_files(tree: Path, split: str) -> dict[str, list[Path]]:
    return {d.name: sorted(p for p in d.iterdir()) for d in sorted((tree / split).iterdir()) if d.is_dir()}


def make_kaggle(tree: Path, dest: Path, names: dict[str, str]) -> Path:
    data = dest / "ILSVRC" / "Data" / "CLS-LOC"
    for wnid, files in _class_files(tree, "train").items():
        (data / "train" / wnid).mkdir(parents=True)
        for f in files:
            shutil.copy(f, data / "train" / wnid / f.name)
    (data / "val").mkdir(parents=True)
    (data / "test").mkdir(parents=True)
    (data / "test" / "ILSVRC2012_test_00000001.JPEG").write_bytes(b"unlabelled")
    with open(dest / "LOC_val_solution.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "PredictionString"])
        for wnid, files in _class_files(tree, "val").items():
            for p in files:
                shutil.copy(p, data / "val" / p.name)
                writer.writerow([p.stem, f"{wnid} 10 20 110 220 {wnid} 5 5 50 50"])
    (dest / "LOC_synset_mapping.txt").write_text("".join(f"{w} {names[w]}\n" for w in sorted(names)))
    return dest


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_official(tree: Path, dest: Path, names: dict[str, str]) -> Path:
    """ILSVRC2012_img_train.tar (a tar of per-class tars), ILSVRC2012_img_val.tar (flat) and the devkit,
    whose meta.mat numbers the classes in an order that is not the sorted order of the wnids."""
    dest.mkdir(parents=True)
    train = _class_files(tree, "train")
    with tarfile.open(dest / "ILSVRC2012_img_train.tar", "w") as outer:
        for wnid, files in train.items():
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for f in files:
                    _add(inner, f.name, f.read_bytes())
            _add(outer, f"{wnid}.tar", buf.getvalue())
    wnids = sorted(train)
    ids = {w: len(wnids) - i for i, w in enumerate(wnids)}  # reversed: ids are not ranks
    val = sorted((p, w) for w, files in _class_files(tree, "val").items() for p in files)
    val.sort(key=lambda pw: pw[0].name)
    with tarfile.open(dest / "ILSVRC2012_img_val.tar", "w") as tar:
        for p, _ in val:
            _add(tar, p.name, p.read_bytes())
    rows = [(ids[w], w, names[w], "gloss", 0, 0, 1300) for w in wnids]
    rows.append((len(wnids) + 1, "n00001740", "entity", "root synset", len(wnids), 18, 0))  # not a class
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "wordnet_height", "num_train_images"]
    synsets = np.array(rows, dtype=[(f, object) for f in fields])
    meta = io.BytesIO()
    savemat(meta, {"synsets": synsets})
    truth = "".join(f"{ids[w]}\n" for _, w in val).encode()
    with tarfile.open(dest / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        _add(tar, "ILSVRC2012_devkit_t12/data/meta.mat", meta.getvalue())
        _add(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth)
    return dest
