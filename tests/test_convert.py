import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections import Counter

import pytest

from conftest import ROOT, quiet
from pipelines.convert.job import ConvertError, ConvertSettings, convert
from pipelines.formats.verify import verify

CONVERT = [sys.executable, str(ROOT / "tools/convert_imagenet.py")]
VERIFY = [sys.executable, str(ROOT / "tools/verify_dataset.py")]


def shard_samples(out, split):
    """[(key, label, jpeg bytes)] of a split's shards, in order, read with Python's tarfile."""
    import tarfile
    samples = []
    for tar in sorted((out / "dali" / split).glob("*.tar")):
        with tarfile.open(tar) as archive:
            members = {m.name: archive.extractfile(m).read() for m in archive if m.isfile()}
        for name in sorted(members):
            key, ext = name.split(".", 1)
            if ext == "jpg":
                samples.append((key, int(members[f"{key}.cls"]), members[name]))
    return samples


def test_every_input_is_converted_or_listed(converted, quirky_tree):
    out, manifest = converted
    root, _, expected = quirky_tree
    inputs = [p for p in root.rglob("*") if p.is_file()]
    samples = sum(s["samples"] for s in manifest["splits"].values())
    assert samples + len(manifest["rejected"]) == len(inputs)
    rejected = {r["path"]: r["reason"] for r in manifest["rejected"]}
    assert set(rejected) == {rel for rel, outcome in expected.items() if outcome == "rejected"}
    assert [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()] == manifest["rejected"]
    assert "not inside a class directory" in rejected["train/stray_file.JPEG"]
    assert any("empty file" in r for r in rejected.values()) and any("not an image" in r for r in rejected.values())


def test_quirky_files_are_stored_as_rgb_jpeg(converted, quirky_tree):
    out, _ = converted
    root, _, expected = quirky_tree
    stored = {hashlib.sha1(jpeg).hexdigest()
              for split in ("train", "holdout") for _, _, jpeg in shard_samples(out, split)}
    for rel, outcome in expected.items():
        if outcome == "copied":
            assert hashlib.sha1((root / rel).read_bytes()).hexdigest() in stored, rel
        if outcome == "reencoded":
            assert hashlib.sha1((root / rel).read_bytes()).hexdigest() not in stored, rel
    assert converted[1]["splits"]["train"]["reencoded"] + converted[1]["splits"]["holdout"]["reencoded"] >= 7


def test_labels_follow_the_sorted_wnids(converted, quirky_tree):
    """Images stored byte for byte are found by their bytes: each carries the rank of its class's wnid."""
    out, manifest = converted
    root, wnids, _ = quirky_tree
    assert [c["wnid"] for c in manifest["classes"]] == sorted(wnids)
    source_label = {hashlib.sha1(p.read_bytes()).hexdigest(): sorted(wnids).index(p.parent.name)
                    for p in root.rglob("*.JPEG") if p.parent.name in wnids}
    checked = 0
    for split in ("train", "holdout", "val"):
        for _, label, jpeg in shard_samples(out, split):
            digest = hashlib.sha1(jpeg).hexdigest()
            if digest in source_label:
                assert source_label[digest] == label
                checked += 1
    assert checked > 150


def test_splits_are_disjoint_and_stratified(converted):
    out, manifest = converted
    train = {hashlib.sha1(j).hexdigest() for _, _, j in shard_samples(out, "train")}
    holdout = {hashlib.sha1(j).hexdigest() for _, _, j in shard_samples(out, "holdout")}
    assert not train & holdout
    # 30 generated images per class (+ the quirky ones in classes 0 and 1): round(10 %) held out of each
    assert manifest["splits"]["holdout"]["per_class"] == [4, 4, 3, 3, 3, 3]
    assert Counter(label for _, label, _ in shard_samples(out, "holdout")) == dict(enumerate([4, 4, 3, 3, 3, 3]))


def test_shards_are_sharded_and_keys_ordered(converted):
    out, manifest = converted
    shards = manifest["splits"]["train"]["dali"]["shards"]
    assert len(shards) == 5  # 190 planned inputs in shards of 40
    keys = [key for key, _, _ in shard_samples(out, "train")]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)


def test_verify_passes_on_a_fresh_output(converted):
    assert verify(converted[0], decode=True) == []


def test_the_beton_writer_draws_no_progress_bar_of_its_own(converted, tmp_path, capfd):
    """FFCV's writer draws a tqdm bar ("| 9/9 [00:00<00:00, 89.79it/s]") beside the converter's rich progress;
    it is silenced while the writer runs, and FFCV's module is left as it was."""
    import ffcv.writer
    from tqdm import tqdm

    from pipelines.formats.beton import write_beton
    from pipelines.formats.manifest import dali_shards
    out, manifest = converted
    capfd.readouterr()
    written = write_beton(dali_shards(out, manifest, "holdout"), tmp_path / "holdout.beton", workers=1)
    captured = capfd.readouterr()
    assert written == manifest["splits"]["holdout"]["samples"]
    assert "it/s" not in captured.out + captured.err and "%|" not in captured.out + captured.err, captured
    assert ffcv.writer.tqdm is tqdm


def test_index_files_match_dalis_own_tool(converted, tmp_path):
    out, manifest = converted
    wds2idx = shutil.which("wds2idx", path=str(ROOT / ".venv/bin")) or shutil.which("wds2idx")
    if wds2idx is None:
        pytest.skip("DALI's wds2idx tool is not installed")
    for tar, index in manifest["splits"]["train"]["dali"]["shards"]:
        subprocess.run([wds2idx, str(out / "dali/train" / tar), str(tmp_path / index)], check=True,
                       capture_output=True)
        assert (tmp_path / index).read_bytes() == (out / "dali/train" / index).read_bytes()


def test_plain_tar_and_webdataset_read_the_shards(converted):
    out, manifest = converted
    tar, _ = manifest["splits"]["val"]["dali"]["shards"][0]
    listing = subprocess.run(["tar", "tf", str(out / "dali/val" / tar)], capture_output=True, text=True, check=True)
    names = listing.stdout.split()
    assert names[:3] == ["00000000.jpg", "00000000.cls", "00000000.label.i32"]
    import webdataset as wds
    samples = list(wds.WebDataset(str(out / "dali/val" / tar), shardshuffle=False).decode("pil"))
    assert len(samples) == manifest["splits"]["val"]["samples"]
    assert [s["cls"] for s in samples] == [label for _, label, _ in shard_samples(out, "val")]
    assert all(s["jpg"].mode == "RGB" for s in samples)


def test_rerun_with_same_settings_does_nothing(converted, quirky_tree):
    out, manifest = converted
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = convert(quirky_tree[0], out, ConvertSettings(shard_size=40), workers=2, console=quiet())
    assert again["files"] == manifest["files"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_other_settings_never_overwrite_without_flag(clean_tree, tmp_path):
    root = clean_tree[0]
    out = tmp_path / "out"
    convert(root, out, ConvertSettings(formats=("dali",)), workers=1, console=quiet())
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(ConvertError, match=r"max_resolution: 512 -> 256.*--overwrite"):
        convert(root, out, ConvertSettings(formats=("dali",), max_resolution=256), workers=1, console=quiet())
    assert (out / "manifest.json").read_bytes() == before
    manifest = convert(root, out, ConvertSettings(formats=("dali",), max_resolution=256), workers=1,
                       overwrite=True, console=quiet())
    assert manifest["settings"]["max_resolution"] == 256 and verify(out) == []


def test_refuses_a_directory_that_is_not_an_output(clean_tree, tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(ConvertError, match="not empty"):
        convert(clean_tree[0], tmp_path, ConvertSettings(formats=("dali",)), workers=1, console=quiet())
    assert (tmp_path / "thesis.tex").read_text() == "precious" and not (tmp_path / "dali").exists()


def test_strict_fails_on_the_first_bad_file(quirky_tree, tmp_path):
    run = subprocess.run(CONVERT + [str(quirky_tree[0]), str(tmp_path / "out"), "--strict", "--formats", "dali"],
                         capture_output=True, text=True)
    assert run.returncode == 1
    assert "--strict: train/stray_file.JPEG: not inside a class directory" in " ".join(run.stderr.split())
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_strict_names_a_broken_image(clean_tree, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(clean_tree[0], tree)
    victim = sorted((tree / "train").rglob("*.JPEG"))[5]
    victim.write_bytes(victim.read_bytes()[:1000])
    run = subprocess.run(CONVERT + [str(tree), str(tmp_path / "out"), "--strict", "--formats", "dali"],
                         capture_output=True, text=True)
    message = " ".join(run.stderr.split())
    assert run.returncode == 1 and str(victim.relative_to(tree)) in message and "truncated" in message
    without = subprocess.run(CONVERT + [str(tree), str(tmp_path / "out2"), "--formats", "dali"],
                             capture_output=True, text=True)
    assert without.returncode == 0 and "1 rejected" in " ".join(without.stderr.split())


@pytest.mark.parametrize("args,message", [
    (["--formats", "tfrecord"], "--formats: unknown"),
    (["--formats", ""], "--formats: empty"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--jpeg-quality", "0"], "--jpeg-quality"),
    (["--holdout-fraction", "1.5"], "--holdout-fraction"),
])
def test_bad_options_are_clear_errors(clean_tree, tmp_path, args, message):
    run = subprocess.run(CONVERT + [str(clean_tree[0]), str(tmp_path / "o")] + args, capture_output=True, text=True)
    assert run.returncode == 1 and message in run.stderr


def test_unknown_layout_from_the_cli(tmp_path):
    run = subprocess.run(CONVERT + [str(tmp_path), str(tmp_path / "o")], capture_output=True, text=True)
    assert run.returncode == 1 and "no ImageNet layout found" in run.stderr and "Kaggle" in run.stderr


def test_verify_names_a_truncated_shard(damaged):
    shard = damaged / "dali/train/shard-000001.tar"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    run = subprocess.run(VERIFY + [str(damaged)], capture_output=True, text=True)
    text = " ".join(run.stderr.split())
    assert run.returncode == 1 and "shard-000001.tar" in text and "truncated" in text and "--overwrite" in text


def test_verify_names_a_flipped_byte_in_a_beton(damaged):
    beton = damaged / "ffcv/holdout.beton"
    data = bytearray(beton.read_bytes())
    data[len(data) // 3] ^= 0xFF
    beton.write_bytes(bytes(data))
    problems = verify(damaged)
    assert any("holdout.beton" in p and "sha256" in p for p in problems)


def test_verify_names_a_truncated_beton(damaged):
    beton = damaged / "ffcv/train.beton"
    with open(beton, "r+b") as f:
        f.truncate(4096)
    problems = verify(damaged)
    assert any("train.beton" in p and "FFCV cannot read it" in p for p in problems)


def test_verify_catches_a_relabelled_sample(damaged):
    """Consistent checksums do not hide a wrong label: .cls and .label.i32 must agree."""
    idx = damaged / "dali/val/shard-000000.idx"
    tar = damaged / "dali/val/shard-000000.tar"
    line = idx.read_text().splitlines()[1].split()
    offset = int(line[line.index("cls") + 1])
    data = bytearray(tar.read_bytes())
    data[offset] = ord("9") if data[offset] != ord("9") else ord("8")
    tar.write_bytes(bytes(data))
    problems = verify(damaged)
    assert any("labels disagree" in p for p in problems)


def test_the_manifest_records_the_longest_stored_side(converted):
    """Per split, the longest side of any stored JPEG, read back from the JPEG headers."""
    from PIL import Image
    from pipelines.formats.manifest import largest_side
    out, manifest = converted
    for split in manifest["splits"]:
        sides = [max(Image.open(io.BytesIO(jpeg)).size) for _, _, jpeg in shard_samples(out, split)]
        assert sides and largest_side(out, manifest, split) == max(sides), split
    assert largest_side(out, manifest, "train") == 512  # the sample has images over the cap


def test_verify_catches_a_wrong_longest_side_and_accepts_an_older_manifest(damaged):
    """A manifest written before the converter recorded the longest side still loads and verifies; loaders
    then get None and fall back to their own default."""
    from pipelines.formats.manifest import largest_side, load_manifest
    manifest = json.loads((damaged / "manifest.json").read_text())
    manifest["splits"]["val"]["largest_side"] -= 1
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    assert [p for p in verify(damaged) if "longest stored side" in p and "dali/val" in p]
    for split in manifest["splits"].values():
        del split["largest_side"]
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    assert verify(damaged) == [] and largest_side(damaged, load_manifest(damaged), "train") is None


def test_verify_explains_a_directory_without_manifest(tmp_path):
    run = subprocess.run(VERIFY + [str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert run.returncode == 1 and "no such directory" in run.stderr
    run = subprocess.run(VERIFY + [str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 1 and "not a converted dataset" in run.stderr and "convert it first" in run.stderr
    (tmp_path / ".work").mkdir()
    run = subprocess.run(VERIFY + [str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 1 and "unfinished conversion" in run.stderr and "resumes" in run.stderr


def test_odd_trees_are_converted_with_notes(clean_tree, tmp_path):
    """A non-UTF-8 file name, a hidden directory, an empty class directory and a flat val folder: nothing
    crashes, nothing is dropped, and the notes say what happened."""
    root, wnids = clean_tree
    tree = tmp_path / "tree"
    shutil.copytree(root / "train", tree / "train")
    first = sorted((tree / "train" / wnids[0]).iterdir())[0]
    odd_name = os.fsencode(first.parent) + b"/caf\xe9_latin1.JPEG"
    os.rename(os.fsencode(first), odd_name)
    (tree / "train" / ".ipynb_checkpoints").mkdir()
    shutil.copy(sorted((tree / "train" / wnids[1]).iterdir())[0], tree / "train" / ".ipynb_checkpoints" / "x.JPEG")
    (tree / "train" / "n99999999").mkdir()  # an empty class directory
    (tree / "val").mkdir()
    shutil.copy(sorted((root / "val" / wnids[0]).iterdir())[0], tree / "val" / "ILSVRC2012_val_00000001.JPEG")
    manifest = convert(tree, tmp_path / "out", ConvertSettings(formats=("dali",)), workers=1, console=quiet())
    notes = " ".join(manifest["source"]["notes"])
    assert "hidden directories ['.ipynb_checkpoints']" in notes and "n99999999 is empty" in notes
    assert "holds 1 images directly" in notes
    assert [c["wnid"] for c in manifest["classes"]] == sorted(wnids + ["n99999999"])
    rejected = {r["path"]: r["reason"] for r in manifest["rejected"]}
    assert "hidden directory" in rejected["train/.ipynb_checkpoints/x.JPEG"]
    assert "not inside a class directory" in rejected["val/ILSVRC2012_val_00000001.JPEG"]
    assert manifest["splits"]["train"]["samples"] + manifest["splits"]["holdout"]["samples"] == 48
    assert verify(tmp_path / "out") == []


def test_out_that_is_a_file_and_bad_workers(clean_tree, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConvertError, match="is a file"):
        convert(clean_tree[0], tmp_path / "f", ConvertSettings(), workers=1, console=quiet())
    with pytest.raises(ConvertError, match="--workers"):
        convert(clean_tree[0], tmp_path / "o", ConvertSettings(), workers=0, console=quiet())


def test_a_jpeg_larger_than_a_page_is_stored_at_full_size(clean_tree, tmp_path):
    """A full-size camera image can hold several MiB, more than the 2 MiB page a small split's .beton gets: the
    page grows to hold the largest stored JPEG (FFCV's allocator cannot split a sample), where FFCV's worker used
    to die on it and its writer to wait forever. In a subprocess with a deadline, so a hang fails the test."""
    import numpy as np
    from PIL import Image
    tree = tmp_path / "tree"
    shutil.copytree(clean_tree[0], tree)
    noise = np.random.default_rng(0).integers(0, 256, (1500, 1800, 3), dtype=np.uint8)  # incompressible
    big = tree / "train" / clean_tree[1][0] / "big.JPEG"
    Image.fromarray(noise).save(big, "JPEG", quality=95)
    assert big.stat().st_size > 1 << 21
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(ROOT / "tools/convert_imagenet.py"), str(tree), str(out),
                           "--max-resolution", "0", "--workers", "2"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert verify(out) == []


def test_a_beton_writer_process_that_dies_fails_the_write_instead_of_hanging(converted, tmp_path):
    """One of FFCV's writer processes raises on a sample: the write ends with an error naming its exit code,
    within seconds (FFCV's writer alone polls for the lost samples forever)."""
    script = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from pipelines.formats import beton
from pipelines.formats.manifest import dali_shards, load_manifest
out = Path({str(converted[0])!r})
real = beton._store_jpeg
calls = [0]

def failing(destination, value, malloc):
    calls[0] += 1
    if calls[0] == 5:
        raise ValueError("a sample this writer cannot store")
    real(destination, value, malloc)

beton._store_jpeg = failing
try:
    beton.write_beton(dali_shards(out, load_manifest(out), "train"), Path({str(tmp_path / "x.beton")!r}), 1)
except beton.WriterFailed as e:
    print("FAILED:", e)
    sys.exit(3)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]
    assert "an FFCV writer process ended before writing its samples" in done.stdout
    assert "a sample this writer cannot store" in done.stderr  # the worker's own error, above it
