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


def layered_psd(composite: Image.Image, layers: list[tuple[tuple[int, int, int, int], tuple[int, int, int]]]) -> bytes:
    """A Photoshop file (the PSD format of Adobe's "Photoshop File Formats Specification", version 1, 8-bit RGB,
    uncompressed) holding `layers`, each a (top, left, bottom, right) rectangle of one colour, and the merged
    image `composite` (RGB): what Photoshop saves with "maximize compatibility". Pillow reads PSD, never writes
    it, so the bytes are laid out here."""
    import struct
    width, height = composite.size
    records, channel_data = b"", b""
    for n, ((top, left, bottom, right), colour) in enumerate(layers):
        pixels = (bottom - top) * (right - left)
        records += struct.pack(">4iH", top, left, bottom, right, 3)
        records += b"".join(struct.pack(">hI", channel, 2 + pixels) for channel in (0, 1, 2))  # R, G, B
        name = f"layer {n}".encode()
        name_field = bytes([len(name)]) + name
        name_field += b"\0" * (-len(name_field) % 4)  # a Pascal string padded to a multiple of 4 bytes
        extra = struct.pack(">II", 0, 0) + name_field  # no layer mask, no blending ranges
        records += b"8BIMnorm" + bytes([255, 0, 0, 0]) + struct.pack(">I", len(extra)) + extra
        channel_data += b"".join(struct.pack(">H", 0) + bytes([value]) * pixels for value in colour)  # raw
    layer_info = struct.pack(">h", len(layers)) + records + channel_data
    layer_info += b"\0" * (len(layer_info) % 2)  # its length is even
    layer_and_mask = struct.pack(">I", len(layer_info)) + layer_info + struct.pack(">I", 0)  # no global mask
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    planes = np.asarray(composite.convert("RGB")).transpose(2, 0, 1).tobytes()  # channel after channel
    return (header + struct.pack(">I", 0) + struct.pack(">I", 0)  # no colour mode data, no image resources
            + struct.pack(">I", len(layer_and_mask)) + layer_and_mask + struct.pack(">H", 0) + planes)


def frames(kind: str) -> tuple[bytes, Image.Image]:
    """A file of several frames and the image it stands for."""
    green, gray = Image.new("RGB", (120, 90), (30, 200, 30)), Image.new("RGB", (120, 90), (128, 128, 128))
    if kind == "PSD":  # two layers unlike the composite
        return layered_psd(picture(), [((0, 0, 90, 120), (30, 200, 30)), ((10, 20, 50, 80), (128, 128, 128))]), \
            picture()
    first = picture().convert("P", palette=Image.Palette.ADAPTIVE) if kind == "GIF" else picture()
    return saved(first, kind, save_all=True, append_images=[green, gray]), picture()


@pytest.mark.parametrize("kind", ["GIF", "TIFF", "PSD"])
def test_a_file_of_several_frames_gives_the_image_it_stands_for(kind):
    """An animated GIF and a multi-page TIFF: their first frame. A layered PSD (under a .JPEG name, as in
    ImageNet): its composite, which Pillow opens it at; its layers are frames 1 and 2."""
    data, expected = frames(kind)
    opened = Image.open(io.BytesIO(data))
    assert opened.format == kind and opened.n_frames > 1
    if kind == "PSD":  # the layers are real ones: the last reads back as drawn, gray inside its rectangle
        opened.seek(opened.n_frames)
        assert opened.convert("RGB").getpixel((30, 20)) == (128, 128, 128)
    result = prepare_image(data, 512, 90)
    assert not result.copied and result.why_reencoded.startswith(f"{kind} content")
    assert np.abs(np.asarray(stored(result), np.float32) - np.asarray(expected, np.float32)).mean() < 12
