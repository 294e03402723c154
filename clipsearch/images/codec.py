"""Client-supplied base64 images -> PIL images, with limits checked before decoding pixels.

Accepts the standard and the urlsafe base64 alphabet (EasyNLP writes urlsafe), with or
without padding, with or without a ``data:image/...;base64,`` prefix. Never fetches URLs.
"""

from __future__ import annotations

import binascii
import contextlib
import io
import re
import warnings
from collections.abc import Iterator

import pybase64
from PIL import ExifTags, Image, UnidentifiedImageError

from clipsearch.core.errors import InvalidBase64, InvalidImage, PayloadTooLarge

# Set once, for the whole process (catch_warnings is not thread-safe): PIL's warnings about a
# client's bytes (corrupt EXIF, odd sizes, huge images, which our own limit checks first) are
# nothing an operator can act on.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
warnings.filterwarnings("ignore", module=r"PIL\.")
_DATA_URI = re.compile(r"^data:[\w.+/-]*(;[\w=.+-]+)*;base64,", re.IGNORECASE)
_URLSAFE = bytes.maketrans(b"-_", b"+/")
_WHITESPACE = b" \t\n\r\x0b\x0c"


_JPEG_BASE64 = "/9j/"  # FF D8 FF, the start of every JPEG, in base64


def base64_looks_like_jpeg(data: str) -> bool:
    """Whether a base64 image (or a `data:` URI, as browsers' FileReader makes) begins as a
    JPEG does, without decoding it: a hint for routing, the bytes are checked later."""
    match = _DATA_URI.match(data)
    return data.startswith(_JPEG_BASE64, match.end() if match else 0)


def decode_base64(data: str, *, field: str, max_bytes: int) -> bytes:
    """Decode one base64 string (either alphabet, padding optional); errors name `field`."""
    match = _DATA_URI.match(data)
    if match:
        data = data[match.end() :]
    # A base64 string is 4/3 the size of its payload: reject oversize input before decoding.
    if len(data) * 3 // 4 > max_bytes + 3:
        raise PayloadTooLarge(f"{field}: image is larger than the limit of {max_bytes} bytes", field=field)
    try:
        raw = data.encode("ascii")
    except UnicodeEncodeError:
        raise InvalidBase64(f"{field}: not valid base64 (non-ASCII characters)", field=field) from None
    # Without whitespace, either alphabet is one SIMD pass of pybase64 (the standard library
    # is ~50x slower, with the GIL held); anything else takes the lenient path.
    padded = raw if len(raw) % 4 == 0 else raw + b"=" * (-len(raw) % 4)
    out: bytes | None
    try:
        out = pybase64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        out = _decode_urlsafe(padded)  # EasyNLP's TSVs
    if out is None:
        out = _decode_lenient(raw, field)
    if not out:
        raise InvalidBase64(f"{field}: empty image string", field=field)
    if len(out) > max_bytes:
        raise PayloadTooLarge(f"{field}: image is larger than the limit of {max_bytes} bytes", field=field)
    return out


def image_input_bytes(data: str | bytes, *, field: str, max_bytes: int) -> bytes:
    """A client's image as bytes: base64 (a str) decoded, or uploaded bytes as they are; empty
    or oversize input refused naming `field`."""
    if isinstance(data, str):
        return decode_base64(data, field=field, max_bytes=max_bytes)
    if not data:
        raise InvalidImage(f"{field}: the uploaded file is empty", field=field)
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"{field}: image is larger than the limit of {max_bytes} bytes", field=field)
    return data


def _decode_urlsafe(padded: bytes) -> bytes | None:
    """The urlsafe alphabet alone in one pybase64 pass, else None. Input that mixes in '+'
    or '/' is left to the lenient path: pybase64 still accepts it here but warns that it
    will not."""
    if b"+" in padded or b"/" in padded:
        return None
    try:
        return pybase64.b64decode(padded, altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        return None


def _decode_lenient(raw: bytes, field: str) -> bytes:
    """The urlsafe alphabet (EasyNLP writes it), whitespace (line-wrapped base64) and
    missing or odd padding, mapped and deleted in one C pass before decoding."""
    raw = raw.translate(_URLSAFE, _WHITESPACE).rstrip(b"=")
    if not raw:
        raise InvalidBase64(f"{field}: empty image string", field=field)
    if len(raw) % 4 == 1:
        raise InvalidBase64(f"{field}: not valid base64 (bad length)", field=field)
    try:
        return pybase64.b64decode(raw + b"=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidBase64(f"{field}: not valid base64", field=field) from None


@contextlib.contextmanager
def _image_errors(field: str) -> Iterator[None]:
    """Map PIL's many failure modes to 400/413 errors that name `field`."""
    try:
        yield
    except (PayloadTooLarge, InvalidImage):
        raise
    except UnidentifiedImageError:
        raise InvalidImage(f"{field}: bytes are not a recognised image format", field=field) from None
    except Image.DecompressionBombError:
        raise PayloadTooLarge(f"{field}: image has too many pixels (a decompression bomb?)", field=field) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        # Truncated or corrupt files surface as any of these from PIL's decoders.
        raise InvalidImage(f"{field}: image data is corrupt or truncated ({type(exc).__name__})", field=field) from None
    except Exception as exc:
        # Any other failure of a decoder plugin on client bytes (a DDS pixel format PIL does
        # not implement, a BLP encoding, libavif's RuntimeError) is still the image's fault.
        raise InvalidImage(f"{field}: cannot decode this image ({type(exc).__name__})", field=field) from None


def _probe(data: bytes, field: str, max_pixels: int) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    _check_size(image.size, field, max_pixels)
    return image


# The longest side over the shortest that is decoded. Preprocessing scales the short side
# to the model's input, so the work (and memory) of an image grows with this ratio, not with
# its pixel count: a 200000x1 PNG of a few hundred bytes would become a 200000-wide strip.
MAX_ASPECT_RATIO = 32


def _check_size(size: tuple[int, int], field: str, max_pixels: int) -> None:
    width, height = size
    if width and height and max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise InvalidImage(
            f"{field}: image is {width}x{height} pixels, too narrow to process (the longest side may be at most "
            f"{MAX_ASPECT_RATIO} times the shortest)",
            field=field,
        )
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"{field}: image has {width}x{height} pixels, too many pixels (the limit is {max_pixels})",
            field=field,
        )
    if width == 0 or height == 0:
        raise InvalidImage(f"{field}: image has no pixels", field=field)


# Start-of-frame markers (baseline, extended, progressive, lossless; Huffman or arithmetic).
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG from its start-of-frame segment, skipping the segments
    before it by their lengths (~2 us; PIL's `Image.open` parses every table in Python,
    ~65 us). None for anything it does not read plainly (not a JPEG, a multi-picture
    file, a header that ends or breaks before the frame): PIL then judges the bytes."""
    if not data.startswith(b"\xff\xd8"):
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or scan data, before any frame header
            return None
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if length < 2:
            return None
        if marker in _SOF:
            if length < 7 or i + 9 > n:
                return None
            return int.from_bytes(data[i + 7 : i + 9], "big"), int.from_bytes(data[i + 5 : i + 7], "big")
        if marker == 0xE2 and data[i + 4 : i + 8] == b"MPF\x00":  # PIL reads these as "MPO"
            return None
        i += 2 + length
    return None


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1-8; 1: show as stored), read from the header only."""
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # a malformed EXIF block: show the image as stored, as browsers do
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def probe_image(data: bytes, *, field: str, max_pixels: int, exif: bool = False
                ) -> tuple[str | None, tuple[int, int], int]:
    """Format, size and (with `exif`) EXIF orientation from the header, with the pixel
    limit checked; no pixels are decoded."""
    if not exif:
        size = jpeg_size(data)
        if size is not None:
            _check_size(size, field, max_pixels)
            return "JPEG", size, 1
    with _image_errors(field):
        image = _probe(data, field, max_pixels)
        return image.format, image.size, exif_orientation(image) if exif else 1


def open_image(data: bytes, *, field: str, max_pixels: int, draft: tuple[int, int] | None = None,
               exif: bool = False) -> Image.Image:
    """Decode image bytes fully; pixel count is checked from the header before decoding.

    `draft` (JPEG only): let libjpeg decode at the smallest 1/2, 1/4 or 1/8 scale that
    still covers this size (DCT scaling), 2-3x faster for photos much larger than the
    model's input. The result differs slightly from a full decode; see `Settings.image_decode`.
    `exif`: turn the image as its EXIF orientation says (phone photos are often stored
    sideways); open_clip itself does not.
    """
    with _image_errors(field):
        image = _probe(data, field, max_pixels)
        orientation = exif_orientation(image) if exif else 1
        if draft is not None and image.format == "JPEG":
            image.draft(image.mode, draft)
        image.load()
        if orientation != 1:
            image = image.transpose(_PIL_ORIENT[orientation])
    return image


# What turns a stored image upright, per EXIF orientation (as PIL's ImageOps.exif_transpose).
_PIL_ORIENT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def decode_image(
    data: str, *, field: str, max_bytes: int, max_pixels: int, draft: tuple[int, int] | None = None
) -> Image.Image:
    """base64 string -> decoded PIL image (mode as stored; the model's transform converts to RGB)."""
    raw = decode_base64(data, field=field, max_bytes=max_bytes)
    return open_image(raw, field=field, max_pixels=max_pixels, draft=draft)


THUMBNAIL_SIZE = 256  # longest side, in pixels


def thumbnail_of(image: Image.Image, size: int = THUMBNAIL_SIZE) -> bytes:
    """A small JPEG of a decoded image for display: upright by its EXIF orientation, longest
    side at most `size`, RGB. `image` is left as it is. Empty bytes if it cannot be made."""
    from PIL import ImageOps

    try:
        small = ImageOps.exif_transpose(image).convert("RGB")  # a copy: the caller's image stays
        small.thumbnail((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
        out = io.BytesIO()
        small.save(out, format="JPEG", quality=82)
        return out.getvalue()
    except Exception:  # a thumbnail is a nicety: never the reason an item is skipped
        return b""


def make_thumbnail(data: bytes, *, max_pixels: int, size: int = THUMBNAIL_SIZE) -> bytes:
    """`thumbnail_of` image bytes, decoded at a reduced scale where the format allows (JPEG).
    Empty bytes when the image cannot be read (its vector may still exist)."""
    try:
        image = _probe(data, "image", max_pixels)
        if image.format == "JPEG":
            image.draft("RGB", (size, size))
        return thumbnail_of(image, size)
    except Exception:
        return b""
