import json
import shutil

import pytest

from conftest import quiet
from layouts import make_kaggle, make_official
from pipelines.convert.job import ConvertSettings, convert
from pipelines.convert.sources import SourceError, detect_and_scan
from pipelines.convert.sample import imagenet_wnids

DALI_ONLY = ConvertSettings(formats=("dali",), shard_size=16)


@pytest.fixture(scope="module")
def names(clean_tree):
    from timm.data import ImageNetInfo
    info = ImageNetInfo()
    return {w: f"{info.label_name_to_description(w)} (test)" for w in clean_tree[1]}


@pytest.fixture(scope="module")
def layouts(clean_tree, names, tmp_path_factory):
    root = clean_tree[0]
    base = tmp_path_factory.mktemp("layouts")
    return {"imagefolder": root,
            "kaggle": make_kaggle(root, base / "kaggle", names),
            "official": make_official(root, base / "official", names)}


@pytest.fixture(scope="module")
def outputs(layouts, tmp_path_factory):
    base = tmp_path_factory.mktemp("layout_out")
    return {name: convert(src, base / name, DALI_ONLY, workers=2, console=quiet()) | {"_out": base / name}
            for name, src in layouts.items()}


def dali_files(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "dali").rglob("*")) if p.is_file()}


@pytest.mark.parametrize("layout", ["imagefolder", "kaggle", "official"])
def test_layout_is_detected(layouts, layout):
    assert detect_and_scan(layouts[layout]).layout == layout


def test_every_layout_gives_the_same_samples(outputs, clean_tree):
    reference = outputs["imagefolder"]
    assert reference["splits"]["train"]["samples"] == 44 and reference["splits"]["holdout"]["samples"] == 4
    assert reference["splits"]["val"]["samples"] == 12
    for name in ("kaggle", "official"):
        assert outputs[name]["splits"] == reference["splits"], name
        assert dali_files(outputs[name]["_out"]) == dali_files(reference["_out"]), name


def test_class_names_come_from_the_source(outputs, names):
    for layout in ("kaggle", "official"):
        classes = outputs[layout]["classes"]
        assert [c["wnid"] for c in classes] == sorted(names)
        assert all(c["name"] == names[c["wnid"]] for c in classes), layout
    # ImageFolder has no names of its own: they come from timm's ImageNet table
    assert all(c["name"] and "(test)" not in c["name"] for c in outputs["imagefolder"]["classes"])


def test_kaggle_test_folder_is_noted_not_converted(outputs):
    assert any("test" in note and "ignored" in note for note in outputs["kaggle"]["source"]["notes"])


def test_unknown_layout_error_lists_accepted_layouts(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(SourceError) as e:
        detect_and_scan(tmp_path)
    message = str(e.value)
    assert str(tmp_path) in message
    for words in ("ImageFolder", "Kaggle", "ILSVRC2012_img_train.tar", "LOC_val_solution.csv"):
        assert words in message
    with pytest.raises(SourceError, match="does not exist"):
        detect_and_scan(tmp_path / "missing")


def test_part_of_a_tree_gets_a_hint(clean_tree):
    with pytest.raises(SourceError, match=r"part of a tree: pass the folder that holds train/"):
        detect_and_scan(clean_tree[0] / "train")


def test_official_val_without_devkit_is_an_error(layouts, tmp_path):
    for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
        (tmp_path / name).symlink_to(layouts["official"] / name)
    with pytest.raises(SourceError, match="devkit"):
        detect_and_scan(tmp_path)


def test_official_train_only_and_unpacked_devkit(layouts, tmp_path):
    (tmp_path / "ILSVRC2012_img_train.tar").symlink_to(layouts["official"] / "ILSVRC2012_img_train.tar")
    scanned = detect_and_scan(tmp_path)
    assert scanned.val is None and len(scanned.train) == 48
    (tmp_path / "ILSVRC2012_img_val.tar").symlink_to(layouts["official"] / "ILSVRC2012_img_val.tar")
    shutil.unpack_archive(layouts["official"] / "ILSVRC2012_devkit_t12.tar.gz", tmp_path)
    assert len(detect_and_scan(tmp_path).val) == 12


def test_kaggle_val_without_solution_is_an_error(layouts, tmp_path):
    shutil.copytree(layouts["kaggle"] / "ILSVRC", tmp_path / "ILSVRC")
    with pytest.raises(SourceError, match="LOC_val_solution.csv"):
        detect_and_scan(tmp_path)


def test_val_class_unknown_to_train_is_listed(clean_tree, tmp_path):
    root, wnids = clean_tree
    shutil.copytree(root, tmp_path / "tree")
    stranger = next(w for w in imagenet_wnids() if w not in wnids)
    (tmp_path / "tree" / "val" / stranger).mkdir()
    (tmp_path / "tree" / "val" / stranger / "x.JPEG").write_bytes(b"x")
    scanned = detect_and_scan(tmp_path / "tree")
    assert [(r.ref, r.split) for r in scanned.rejected] == [(f"val/{stranger}/x.JPEG", "val")]
    assert "no train directory" in scanned.rejected[0].reason


def test_manifest_records_the_source(outputs, layouts):
    for name, manifest in outputs.items():
        assert manifest["source"]["layout"] == name
        assert manifest["source"]["path"] == str(layouts[name].resolve())
        saved = json.loads((manifest["_out"] / "manifest.json").read_text())
        assert saved["settings"]["formats"] == ["dali"] and "ffcv" not in saved["splits"]["train"]
