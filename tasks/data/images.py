"""One source file -> a decoded, validated, RGB image ready for a record, or the reason it is not one.

Runs in the convert stage's worker processes, so it imports nothing heavier than Pillow.

- Every file is decoded in full before it is accepted: empty, truncated, non-image (whatever the
  extension says) and decompression-bomb files are rejected with a reason.
- Every image is stored in the smallest form that training's decoder (`tf.io.decode_image(channels=3)`)
  turns into its RGB pixels: palette, CMYK and colour images with transparency become RGB; grayscale
  images (16-bit scaled to 8, transparency composited) stay one channel, which the decoder repeats into
  three. Transparency is composited on white (a transparent background reads as the white page it
  usually stands for, not as black).
- EXIF orientation is applied, so a photo taken upright is stored upright.
- Stored encoding: a JPEG, or an 8-bit grayscale or RGB PNG without transparency, that needs no change
  keeps its original bytes (no second lossy pass, no growth: shards of such a folder are its size plus
  the records' few bytes); a JPEG that was rotated, converted or resized is re-encoded as JPEG at
  quality 95; everything else (PNG, GIF, BMP, TIFF, WebP, ...) is stored as PNG, losslessly.
- Each image also gets a perceptual hash (a difference hash of the upright picture as stored: after
  resizing), which finds near-duplicates that identical-bytes checks miss: the same photo resized or
  re-saved.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import warnings

import numpy as np
import PIL.Image
import PIL.ImageOps

JPEG_QUALITY = 95  # visually lossless for photos, about a third of the PNG size of the same photo
# How difference_hash is taken; the manifest records it, and hashes of two versions are never compared.
# 1: a bilinear 9x8 thumbnail of the gray picture, decoded, before resizing: for a 400-pixel photo stored at
#    224x224, 390 µs of the image's 2.3 ms.
# 2: of the picture as stored (after resizing), gray, box-reduced, then bilinear: 73 µs there, 231 µs on a whole
#    400-pixel photo. On 400 such photos, each against a copy resized to 0.7x and saved as JPEG quality 75: at
#    most 3 bits apart, 0.33 on average (version 1: 2 and 0.21); no two different photos within 3 bits in either.
DIFFERENCE_HASH_VERSION = 2
_ORIENTATION_TAG = 0x0112
_WHITE = (255, 255, 255, 255)


@dataclasses.dataclass(frozen=True)
class Prepared:
    encoded: bytes  # JPEG or PNG of the image, RGB or one channel of gray
    encoding: str  # "original" (the source file's bytes), "jpeg" or "png" (encoded here)
    source_sha256: str  # of the source file's bytes: finds the same image under two classes or splits
    difference_hash: str  # 16 hex digits, see difference_hash(); empty for an image too small to compare


@dataclasses.dataclass(frozen=True)
class Rejected:
    reason: str
    source_sha256: str | None = None  # of the file's bytes, when it could be read


def prepare(path: str, image_size: tuple[int, int] | None, source_sha256: str | None = None) -> Prepared | Rejected:
    """Decodes `path` and returns it as an RGB image of `image_size` ([height, width]; None keeps it).
    `source_sha256`: the file's digest, when the caller knows it already (not computed again)."""
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except OSError as error:
        return Rejected(f"cannot read the file: {error.strerror}")
    source_sha256 = source_sha256 or hashlib.sha256(data).hexdigest()
    if not data:
        return Rejected("empty file (0 bytes)", source_sha256)
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit (~89 and ~179 megapixels): refuse both.
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            encoded, encoding, picture_hash = _decode_and_encode(data, image_size)
    except PIL.UnidentifiedImageError:
        return Rejected("not an image: no image format recognised in its content", source_sha256)
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as error:
        return Rejected(f"decompression bomb: {error}", source_sha256)
    except OSError as error:
        return Rejected(f"truncated or corrupt image data: {error}", source_sha256)
    except Exception as error:  # noqa: BLE001 - a decoder fed untrusted bytes may raise anything; one file must not stop the rest
        return Rejected(f"unreadable image: {type(error).__name__}: {error}", source_sha256)
    return Prepared(encoded=encoded, encoding=encoding, source_sha256=source_sha256, difference_hash=picture_hash)


def difference_hash(image: PIL.Image.Image) -> str:
    """64 bits: is each pixel of a 9x8 grayscale thumbnail brighter than its right neighbour.

    Empty below 32 pixels a side: the thumbnail of an 8x8 digit is the digit itself, and half of all
    the 1s would look alike.

    Written here rather than taken from the imagehash package: it is these few lines of Pillow, and
    the package would bring PyWavelets for hashes the pipeline does not use. Near-duplicates differ in
    a few bits (tasks/data/changes.py compares them).
    """
    if min(image.size) < 32:
        return ""
    # Box-reduced to at least 4x the thumbnail before the bilinear step (reducing_gap), whose cost would otherwise
    # grow with the picture. Gray first: made gray after scaling (cheaper still) it rounds twice, and pictures
    # of fine noise, whose thumbnails are nearly flat, then differ from a resized copy by 4 bits instead of 1.
    thumbnail = image.convert("L").resize((9, 8), PIL.Image.Resampling.BILINEAR, reducing_gap=4.0)
    # From its bytes: np.asarray of a Pillow image goes through its array interface, which costs more than the
    # hash's other steps on a thumbnail this small.
    pixels = np.frombuffer(thumbnail.tobytes(), dtype=np.uint8).reshape(8, 9)
    return np.packbits(pixels[:, 1:] > pixels[:, :-1]).tobytes().hex()


def _decode_and_encode(data: bytes, image_size: tuple[int, int] | None) -> tuple[bytes, str, str]:
    with PIL.Image.open(io.BytesIO(data)) as image:
        is_jpeg = image.format == "JPEG"
        target = None if image_size is None else (image_size[1], image_size[0])  # Pillow sizes are (width, height)
        upright = image.getexif().get(_ORIENTATION_TAG, 1) in (0, 1)
        if upright and target in (None, image.size) and _decodes_as_stored(data, image):
            image.load()  # decodes every byte: a truncated file fails here, not in training
            return data, "original", difference_hash(image)
        if is_jpeg and target is not None:
            # Lets the JPEG decoder scale down by 2, 4 or 8 while decoding, never below the target
            # in either orientation: much faster for large photos, same result after resizing.
            side = max(target)
            image.draft(image.mode, (side, side))
        image.load()
        if not upright:  # exif_transpose would only copy an upright image
            image = PIL.ImageOps.exif_transpose(image)
        flat = _gray_or_rgb(image)
    if target is not None and flat.size != target:
        flat = flat.resize(target, PIL.Image.Resampling.BILINEAR)
    picture_hash = difference_hash(flat)
    buffer = io.BytesIO()
    if is_jpeg:
        flat.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        return buffer.getvalue(), "jpeg", picture_hash
    flat.save(buffer, format="PNG")
    return buffer.getvalue(), "png", picture_hash


def _decodes_as_stored(data: bytes, image: PIL.Image.Image) -> bool:
    """Whether training's decoder gives the same RGB pixels from the file's own bytes as Pillow does here.

    A JPEG in RGB or gray; a PNG of 8 bits per sample, gray (colour type 0) or RGB (2), without a
    transparent colour: its header says so at fixed places (bit depth at byte 24, colour type at 25).
    """
    if image.format == "JPEG":
        return image.mode in ("RGB", "L")
    if image.format == "PNG":
        return len(data) > 25 and data[24] == 8 and data[25] in (0, 2) and "transparency" not in image.info
    return False


def _gray_or_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """8-bit gray ("L") for a grayscale image, else RGB; transparency composited on white."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit and float grayscale: scale to 8 bits; Pillow's own conversion would clip at 255.
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode != "F" and pixels.max(initial=0) > 255 else 255.0
        image = PIL.Image.fromarray(np.clip(np.rint(pixels * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
    gray = image.mode in ("1", "L", "LA", "La")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        background = PIL.Image.new("RGBA", image.size, _WHITE)
        image = PIL.Image.alpha_composite(background, image.convert("RGBA"))
    wanted = "L" if gray else "RGB"
    return image if image.mode == wanted else image.convert(wanted)  # convert would copy an image already in mode
