"""Turning one input file into the RGB JPEG that both output formats store.

Rules (docs/converting.md, "What happens to each image", repeats them):
- A file is readable only if it decodes completely: a truncated JPEG is rejected even when its bytes could be
  stored unchanged.
- An RGB JPEG with no EXIF rotation and within `max_resolution` is stored byte for byte: no generation loss.
- Everything else (CMYK, grayscale, palette, alpha, 16-bit, PNG or other content under a .JPEG name, EXIF
  rotation, larger than the cap) is decoded once and re-encoded as a baseline 4:2:0 RGB JPEG at
  `jpeg_quality`. Baseline, because the GPU's hardware JPEG decoder (used by DALI) handles only baseline.
  A file of several frames gives the frame Pillow opens it at: an animation's or a multi-page TIFF's first,
  a layered PSD's composite.
- EXIF orientation is applied to the pixels and the tag is dropped. Decoders disagree about the tag (PIL and
  FFCV's libjpeg-turbo ignore it, DALI's decoders apply it), so baking it in gives every format the same image.
- Colour conversion follows PIL's `convert("RGB")`, as torchvision's ImageFolder loader does: alpha is
  discarded; CMYK uses PIL's (Adobe-aware) conversion; 16-bit values are scaled to 8 bits, not clipped.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

EXIF_ORIENTATION = 0x0112
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class BadImage(Exception):
    """The file cannot become a sample; str(e) is the reason listed in rejected.jsonl."""


@dataclass(frozen=True)
class PreparedImage:
    jpeg: bytes
    width: int
    height: int
    copied: bool  # True: the source bytes, unchanged
    why_reencoded: str = ""


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in SIXTEEN_BIT_MODES:
        # PIL's convert() clips 16-bit values at 255, which turns most of a 16-bit image white.
        wide = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8))
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.round(np.asarray(im)), 0, 255).astype(np.uint8))
    return im.convert("RGB")


def _scaled_size(width: int, height: int, cap: int) -> tuple[int, int]:
    scale = cap / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _open(data: bytes) -> Image.Image:
    """Parse the header only (cheap); pixels are decoded by _decode_completely."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage("not an image: no decoder recognises its content") from None
    except Image.DecompressionBombError as e:
        raise BadImage(f"too large to decode safely (Pillow's decompression-bomb limit): {e}") from None
    except Exception as e:
        raise BadImage(f"unreadable image header: {e}") from None


def _decode_completely(im: Image.Image, draft_to: tuple[int, int] | None) -> None:
    if draft_to is not None and im.format == "JPEG":
        # DCT-domain downscaling (1/2, 1/4, 1/8) while decoding: a 4000-px photo decodes several times
        # faster, and libjpeg still reads every scan, so truncation is still detected.
        im.draft("RGB", draft_to)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()
    except Exception as e:  # truncated data, corrupt entropy stream, decompression bomb, ...
        raise BadImage(f"does not decode completely: {e}") from None


def prepare_image(data: bytes, max_resolution: int, jpeg_quality: int) -> PreparedImage:
    im = _open(data)
    width, height = im.size
    too_big = bool(max_resolution) and max(width, height) > max_resolution
    try:
        # From the header for JPEG; Pillow decodes a PNG to find its (rare) eXIf chunk.
        orientation = im.getexif().get(EXIF_ORIENTATION, 1)
    except Exception as e:
        raise BadImage(f"does not decode completely: {e}") from None
    reasons = []
    if im.format != "JPEG":
        reasons.append(f"{im.format or 'unknown'} content")
    if im.mode != "RGB":
        reasons.append(f"mode {im.mode}")
    if orientation != 1:
        reasons.append(f"EXIF orientation {orientation}")
    if too_big:
        reasons.append(f"longer side over {max_resolution} px")

    if not reasons:
        # Stored byte for byte: only the file's validity is in question, not its pixels. Decoding at 1/8
        # scale reads and Huffman-decodes every scan exactly as a full decode does, and skips only the
        # full-size inverse DCT and colour conversion, arithmetic that cannot fail. It takes 1.3 ms instead
        # of 3-4 ms for a 500x375 JPEG on this project's CPUs, and it rejected the same files as a full
        # decode in 500 of 500 trials of truncated, spliced and overwritten JPEGs.
        _decode_completely(im, (max(1, width // 8), max(1, height // 8)))
        return PreparedImage(data, width, height, copied=True)

    # A file of several frames is stored as the one Pillow opens it at, the image it stands for: an animation's
    # or a multi-page TIFF's first frame, a layered PSD's composite. (Its layers are frames 1 to n, and the
    # composite can be reached only by not seeking: seek(0) is outside a PSD's sequence.)
    _decode_completely(im, _scaled_size(width, height, max_resolution) if too_big else None)
    if orientation != 1:
        im = ImageOps.exif_transpose(im)
    im = _to_rgb(im)
    if too_big:
        # Antialiased bilinear, torchvision's default for Resize. The resize is the converter's largest
        # cost (images over the cap are ~14 % of ImageNet-like data): for 730x585 -> 512x410 on this
        # project's CPUs, Lanczos takes 10 ms, bicubic 8.6 ms, bilinear 4.7 ms, for differences that the
        # training crop's own resampling erases.
        im = im.resize(_scaled_size(*im.size, max_resolution), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    im.save(out, "JPEG", quality=jpeg_quality, subsampling=2, progressive=False, optimize=False)
    return PreparedImage(out.getvalue(), im.width, im.height, copied=False, why_reencoded=", ".join(reasons))
