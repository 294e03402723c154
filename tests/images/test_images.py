"""base64 and image decoding: every accepted spelling, every rejection names its field."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipsearch.core.errors import InvalidBase64, InvalidImage, PayloadTooLarge
from clipsearch.images.codec import decode_base64, decode_image
from tests.conftest import image_bytes, make_image

RAW = image_bytes(make_image(3), "PNG")
STD = base64.b64encode(RAW).decode()
URL = base64.urlsafe_b64encode(RAW).decode()


@pytest.mark.parametrize(
    "encoded",
    [
        STD,
        URL,
        STD.rstrip("="),
        URL.rstrip("="),
        "data:image/png;base64," + STD,
        "DATA:image/png;charset=x;base64," + URL.rstrip("="),
        "\n".join(STD[i : i + 76] for i in range(0, len(STD), 76)),  # MIME line breaks
    ],
)
def test_accepted_spellings(encoded: str) -> None:
    assert decode_base64(encoded, field="images[0]", max_bytes=10**7) == RAW


# A payload whose standard encoding contains both '+' and '/'.
MIXED = bytes(range(256)) * 3


def test_both_alphabets_decode_the_same_bytes() -> None:
    std = base64.b64encode(MIXED).decode()
    url = base64.urlsafe_b64encode(MIXED).decode()
    assert "+" in std and "/" in std and std != url
    assert decode_base64(std, field="x", max_bytes=10**6) == decode_base64(url, field="x", max_bytes=10**6) == MIXED


@pytest.mark.parametrize("bad", ["", "====", "abc$def", "a", "ü" * 8, "data:image/png;base64,"])
def test_bad_base64_names_field(bad: str) -> None:
    with pytest.raises(InvalidBase64) as exc:
        decode_base64(bad, field="images[2]", max_bytes=10**6)
    assert exc.value.field == "images[2]" and "images[2]" in exc.value.message


def test_oversize_before_decoding() -> None:
    with pytest.raises(PayloadTooLarge, match=r"images\[1\]"):
        decode_base64(STD, field="images[1]", max_bytes=len(RAW) - 1)
    assert decode_base64(STD, field="images[1]", max_bytes=len(RAW)) == RAW


def test_not_an_image() -> None:
    with pytest.raises(InvalidImage, match="not a recognised image"):
        decode_image(base64.b64encode(b"hello world, not a picture").decode(), field="image",
                     max_bytes=10**6, max_pixels=10**7)


def test_truncated_image() -> None:
    data = image_bytes(make_image(5, (200, 200)), "JPEG")
    with pytest.raises(InvalidImage, match="corrupt or truncated"):
        decode_image(base64.b64encode(data[: len(data) // 2]).decode(), field="image",
                     max_bytes=10**6, max_pixels=10**7)


def test_pixel_limit_checked_from_header() -> None:
    data = image_bytes(make_image(5, (300, 200)), "PNG")
    with pytest.raises(PayloadTooLarge, match="300x200"):
        decode_image(base64.b64encode(data).decode(), field="image", max_bytes=10**7, max_pixels=300 * 200 - 1)


def test_decompression_bomb_rejected_cheaply() -> None:
    # A 20000x20000 PNG of one colour compresses to a few hundred KB but would need 1.2 GB decoded.
    from PIL import Image

    bomb = Image.new("L", (20000, 20000))
    data = image_bytes(bomb, "PNG")
    assert len(data) < 2_000_000
    with pytest.raises(PayloadTooLarge, match="too many pixels"):
        decode_image(base64.b64encode(data).decode(), field="image", max_bytes=10**7, max_pixels=40_000_000)


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(min_size=1, max_size=300), urlsafe=st.booleans(),
       cuts=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(" \t\n\r\x0b\x0c")), max_size=12))
def test_any_ascii_whitespace_anywhere_is_ignored(payload: bytes, urlsafe: bool, cuts: list) -> None:
    """Whitespace of every kind base64 wrappers emit, at any position: the bytes come back."""
    text = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(payload).decode()
    for pos, ws in cuts:
        pos %= len(text) + 1
        text = text[:pos] + ws + text[pos:]
    assert decode_base64(text, field="images[0]", max_bytes=10**6) == payload


def _stdlib_reference(text: str) -> bytes | None:
    """What the standard library accepts under this module's rules (either alphabet, any
    whitespace, padding optional); None where it rejects the string."""
    raw = text.encode("ascii").translate(bytes.maketrans(b"-_", b"+/"), b" \t\n\r\x0b\x0c").rstrip(b"=")
    if not raw or len(raw) % 4 == 1:
        return None
    try:
        return base64.b64decode(raw + b"=" * (-len(raw) % 4), validate=True) or None
    except ValueError:  # binascii.Error
        return None


@settings(max_examples=500, deadline=None)
@given(text=st.text(alphabet="ABCabc019+/-_= \n$.", max_size=40))
def test_fast_decoder_agrees_with_the_standard_library(text: str) -> None:
    """pybase64's one-pass fast path and the lenient path together accept exactly what the
    standard library does, with the same bytes, and reject the rest with InvalidBase64."""
    try:
        got: bytes | None = decode_base64(text, field="image", max_bytes=10**6)
    except InvalidBase64:
        got = None
    assert got == _stdlib_reference(text)


def _jpegs() -> list[bytes]:
    """JPEGs as cameras and encoders write them: modes, progressive, optimized tables,
    subsampling, EXIF and ICC segments before the frame, odd sizes."""
    from PIL import Image

    exif = Image.Exif()
    exif[274] = 6  # orientation
    out = []
    for i, (mode, size, kw) in enumerate([
        ("RGB", (64, 48), {}), ("L", (31, 17), {}), ("CMYK", (40, 40), {}),
        ("RGB", (300, 200), {"progressive": True}), ("RGB", (99, 101), {"optimize": True, "subsampling": 0}),
        ("RGB", (2, 3), {"subsampling": 2, "quality": 5}),
        ("RGB", (120, 80), {"exif": exif.tobytes(), "icc_profile": b"\0" * 3000}),
    ]):
        out.append(image_bytes(make_image(i, size).convert(mode), "JPEG", **kw))
    return out


def test_jpeg_header_scan_reads_the_size_pil_reads() -> None:
    """`jpeg_size` (the fast header probe) gives PIL's size for every plain JPEG, and leaves
    multi-picture files (PIL: MPO) and non-JPEGs to PIL."""
    import io

    from PIL import Image

    from clipsearch.images.codec import jpeg_size, probe_image

    for data in _jpegs():
        assert jpeg_size(data) == Image.open(io.BytesIO(data)).size
        assert probe_image(data, field="image", max_pixels=10**8) == ("JPEG", Image.open(io.BytesIO(data)).size, 1)
    first, second = make_image(1, (50, 40)), make_image(2, (50, 40))
    buf = io.BytesIO()
    first.save(buf, "MPO", save_all=True, append_images=[second])
    assert jpeg_size(buf.getvalue()) is None
    assert probe_image(buf.getvalue(), field="image", max_pixels=10**8)[0] == "MPO"
    assert jpeg_size(RAW) is None  # a PNG
    with pytest.raises(PayloadTooLarge, match="300x200"):
        probe_image(_jpegs()[3], field="image", max_pixels=300 * 200 - 1)


@settings(max_examples=400, deadline=None)
@given(which=st.integers(0, 6), cut=st.integers(0, 700), flips=st.lists(
    st.tuples(st.integers(0, 700), st.integers(0, 255)), max_size=3))
def test_jpeg_header_scan_never_disagrees_with_pil_on_broken_headers(which: int, cut: int, flips: list) -> None:
    """Truncated or corrupted headers: where the scan names a size and PIL opens the bytes,
    the sizes agree; where PIL cannot open them, what the scan let through still fails as
    an `InvalidImage` when decoded (the torch decoders reject it, as tested in
    test_fast_images.py), so no bad header reaches the model."""
    import io

    from PIL import Image

    from clipsearch.images.codec import jpeg_size

    data = bytearray(_JPEGS[which][: max(cut, 2)] if cut < 700 else _JPEGS[which])
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    size = jpeg_size(bytes(data))
    try:
        pil = Image.open(io.BytesIO(bytes(data))).size
    except Exception:
        return
    if size is not None:
        assert size == pil


_JPEGS = _jpegs()
