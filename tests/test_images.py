import io

import numpy as np
import pytest
from PIL import Image

from pipelines.convert.images import BadImage, prepare_image


def picture(w=120, h=90) -> Image.Image:
    """Left half red, right half blue: orientation and colour are both checkable."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (220, 30, 30)
    a[:, w // 2:] = (30, 30, 220)
    return Image.fromarray(a)


NOISE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8))


def saved(im: Image.Image, fmt="JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def stored(result) -> Image.Image:
    im = Image.open(io.BytesIO(result.jpeg))
    assert im.format == "JPEG" and im.mode == "RGB"
    assert (im.width, im.height) == (result.width, result.height)
    return im


def test_rgb_jpeg_within_cap_is_stored_byte_for_byte():
    data = saved(picture(), quality=85)
    result = prepare_image(data, 512, 90)
    assert result.copied and result.jpeg == data


def test_progressive_rgb_jpeg_is_copied_too():
    data = saved(picture(), progressive=True)
    assert prepare_image(data, 512, 90).jpeg == data


@pytest.mark.parametrize("mode,fmt", [("CMYK", "JPEG"), ("L", "JPEG"), ("P", "PNG"), ("RGBA", "PNG"),
                                      ("LA", "PNG"), ("1", "PNG"), ("RGB", "PNG"), ("RGB", "GIF")])
def test_other_kinds_become_rgb_jpeg(mode, fmt):
    # An adaptive palette holds both colours exactly; the default web palette would dither them.
    source = picture().convert(mode, palette=Image.Palette.ADAPTIVE) if mode == "P" else picture().convert(mode)
    result = prepare_image(saved(source, fmt), 512, 90)
    assert not result.copied
    im = stored(result)
    assert not im.info.get("progressive")  # baseline, which the GPU's hardware decoder needs
    expected = np.asarray(source.convert("RGB"), np.float32)
    assert np.abs(np.asarray(im, np.float32) - expected).mean() < 12


def test_sixteen_bit_is_scaled_not_clipped():
    gray = np.full((40, 50), 30000, np.uint16)  # 30000/65535 of full scale = 117 in 8 bits
    result = prepare_image(saved(Image.fromarray(gray), "PNG"), 512, 90)
    assert abs(np.asarray(stored(result), np.float32).mean() - 30000 / 257) < 2


def test_exif_orientation_is_applied_and_dropped():
    exif = picture().getexif()
    exif[0x0112] = 6  # display rotated 90° clockwise: the red left half ends up on top
    result = prepare_image(saved(picture(), exif=exif), 512, 90)
    im = stored(result)
    assert im.size == (90, 120)
    assert im.getexif().get(0x0112) is None
    a = np.asarray(im, np.int32)
    assert a[:60, :, 0].mean() > 150 > a[60:, :, 0].mean()


@pytest.mark.parametrize("cap,expected", [(60, (60, 45)), (120, (120, 90)), (0, (120, 90))])
def test_longer_side_is_capped(cap, expected):
    data = saved(picture())
    result = prepare_image(data, cap, 90)
    assert (result.width, result.height) == expected
    assert result.copied == (expected == (120, 90))


def test_portrait_and_huge_images_are_capped_on_the_longer_side():
    result = prepare_image(saved(picture(1500, 2000)), 512, 90)
    assert (result.width, result.height) == (384, 512)


@pytest.mark.parametrize("data,reason", [
    (b"", "empty"),
    (b"hello, not an image", "not an image"),
    (saved(picture())[:-200], "does not decode completely"),
    (saved(picture())[:-2], "does not decode completely"),  # only the end-of-image marker missing
    (saved(NOISE, "PNG")[:20000], "does not decode completely"),
])
def test_bad_files_are_rejected_with_a_reason(data, reason):
    with pytest.raises(BadImage, match=reason):
        prepare_image(data, 512, 90)


def test_decompression_bombs_are_rejected_with_that_reason(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 120x90 = 10,800 px is over twice the limit
    with pytest.raises(BadImage, match="too large to decode safely"):
        prepare_image(saved(picture()), 512, 90)
