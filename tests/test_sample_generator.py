import colorsys
import hashlib
import io
import re
import subprocess
import sys

import numpy as np
from PIL import Image

from benchmarks import jpeg_stats
from conftest import ROOT
from pipelines.convert.sample import image_size, imagenet_wnids, make_sample

# libjpeg's standard luminance table: a quality-q table is this scaled by (200 - 2q)/100 for q >= 50.
STD_LUMA = np.array([16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69,
                     56, 14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104,
                     113, 92, 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99])


def estimated_quality(path) -> int:
    """The q whose libjpeg table best matches the file's; tables are compared as sorted values, so the
    order Pillow lists them in (natural or zigzag) does not matter."""
    table = np.sort(np.array(Image.open(path).quantization[0], np.float64))
    errors = {q: np.abs(np.sort(np.clip(np.floor((STD_LUMA * (200 - 2 * q) + 50) / 100), 1, 255)) - table).sum()
              for q in range(50, 101)}
    return min(errors, key=errors.get)


def tree_files(root):
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_layout_uses_real_wnids(clean_tree):
    root, wnids = clean_tree
    assert set(wnids) <= set(imagenet_wnids()) and len(wnids) == 4
    for p in tree_files(root):
        rel = p.relative_to(root).parts
        assert rel[0] in ("train", "val") and rel[1] in wnids
        pattern = rf"{rel[1]}_\d+\.JPEG" if rel[0] == "train" else r"ILSVRC2012_val_\d{8}\.JPEG"
        assert re.fullmatch(pattern, rel[2])
    assert len(list((root / "train").rglob("*.JPEG"))) == 48 and len(list((root / "val").rglob("*.JPEG"))) == 12


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    def digest(seed, name):
        make_sample(tmp_path / name, classes=2, per_class=3, val_per_class=1, seed=seed)
        return [(p.relative_to(tmp_path / name), hashlib.sha256(p.read_bytes()).hexdigest())
                for p in tree_files(tmp_path / name)]
    a, b, c = digest(5, "a"), digest(5, "b"), digest(6, "c")
    assert a == b
    assert [h for _, h in a] != [h for _, h in c]


def test_sizes_follow_imagenet():
    rng = np.random.default_rng(0)
    sizes = [image_size(rng) for _ in range(4000)]
    longs = np.array([max(s) for s in sizes])
    ratios = np.array([w / h for w, h in sizes])
    assert ((ratios >= 3 / 4 - 1e-9) & (ratios <= 4 / 3 + 1e-9)).all()
    assert (longs == 500).mean() > 0.75
    assert sum(s == (500, 375) for s in sizes) / len(sizes) > 0.3
    assert 0.01 < (longs >= 1600).mean() < 0.06 and 0.005 < (longs < 100).mean() < 0.04


def test_files_have_imagenet_sizes_and_quality(quirky_tree):
    root, wnids, expected = quirky_tree
    images = [p for p in tree_files(root) if str(p.relative_to(root)) not in expected]
    for p in images:
        im = Image.open(p)
        assert im.format == "JPEG" and im.mode == "RGB"
        assert 3 / 4 - 0.01 <= im.width / im.height <= 4 / 3 + 0.01
        assert 74 <= estimated_quality(p) <= 96, p


def hue_features(path) -> np.ndarray:
    a = np.asarray(Image.open(path).convert("RGB").resize((24, 24)), np.float32) / 255
    hsv = np.array([colorsys.rgb_to_hsv(*px) for px in a.reshape(-1, 3)])
    weights = hsv[:, 1] * hsv[:, 2]  # saturated pixels: the class's shape, not the muted background
    hist, _ = np.histogram(hsv[:, 0], bins=18, range=(0, 1), weights=weights)
    return hist / (hist.sum() + 1e-6)


def test_classes_are_easy_to_tell_apart(quirky_tree):
    """A nearest-centroid classifier on a hue histogram: far above chance (1/6) on the val images."""
    root, wnids, expected = quirky_tree
    centroids = np.stack([np.mean([hue_features(p) for p in sorted((root / "train" / w).glob(f"{w}_*.JPEG"))
                                   if str(p.relative_to(root)) not in expected], axis=0) for w in wnids])
    hits = total = 0
    for c, w in enumerate(wnids):
        for p in sorted((root / "val" / w).glob("ILSVRC2012_val_*.JPEG")):
            if str(p.relative_to(root)) in expected:
                continue
            hits += int(np.argmin(np.abs(centroids - hue_features(p)).sum(axis=1)) == c)
            total += 1
    assert total == 30 and hits / total > 0.6


def test_jpegs_cost_what_a_photo_costs_to_decode(clean_tree):
    """Pillow decodes the generated JPEGs at a real photo's cost per megapixel (within 15 %), and they take as
    many bytes per pixel (within a third; a deterministic figure, which smooth images fail by far): a loader
    benchmark on them stands for one on photos. Smooth synthetic images decode faster and flatter every loader."""
    root, _ = clean_tree
    stats = jpeg_stats.measure(jpeg_stats.folder_jpegs(root), repeats=5)
    assert stats["images"] == 60
    assert 0.75 <= stats["bytes_per_pixel_vs_reference"] <= 1.33, jpeg_stats.summary(stats)
    assert 0.85 <= stats["decode_vs_reference"] <= 1.15, jpeg_stats.summary(stats)


def test_reference_photo_is_stored_at_the_data_size_cap():
    """A sample stored at a small cap (--max-resolution 256) is compared with the photo stored at that cap:
    per megapixel, a small image's fixed decode costs weigh more, and comparing it with 500-px photos would
    blame the data for its size."""
    assert jpeg_stats.reference_sizes(None) == jpeg_stats.REFERENCE_SIZES
    assert jpeg_stats.reference_sizes(4000) == jpeg_stats.REFERENCE_SIZES
    small = jpeg_stats.reference_sizes(256)
    assert max(max(s) for s in small) == 256
    for (w, h), (sw, sh) in zip(jpeg_stats.REFERENCE_SIZES, small):
        assert abs(w / h - sw / sh) < 0.01
    blob = jpeg_stats.reference_jpegs(small)[0]
    with Image.open(io.BytesIO(blob)) as im:
        assert max(im.size) == 256


def test_cli_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    run = subprocess.run([sys.executable, str(ROOT / "tools/make_sample_imagenet.py"), str(tmp_path)],
                         capture_output=True, text=True)
    assert run.returncode == 1 and "not empty" in run.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_cli_writes_the_tree(tmp_path):
    out = tmp_path / "s"
    run = subprocess.run([sys.executable, str(ROOT / "tools/make_sample_imagenet.py"), str(out), "--classes", "3",
                          "--per-class", "2", "--val-per-class", "1", "--workers", "1"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert len(tree_files(out)) == 9 and not (tmp_path / "s.partial").exists()
