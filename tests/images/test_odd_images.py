"""Any bytes a client sends as an image decode or fail with a 4xx naming the item: a corpus of
every format Pillow writes, mutated (truncated, bit-flipped, lying headers), plus formats whose
plugins fail in their own ways (DDS, BLP, AVIF), and a property test on arbitrary mutations."""

from __future__ import annotations

import base64
import http.client
import io
import struct
from collections import Counter

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from clipsearch.core.errors import ClipsearchError
from clipsearch.images.decoder import ImageDecoder
from clipsearch.service.http.app import create_app
from clipsearch.service.http.errors import status_for
from clipsearch.service.settings import Settings
from clipsearch.service.state import ServiceState
from tests.conftest import live_server, make_image

# Formats whose writers need an external handler or are not images a client sends.
_NO_WRITER = {"BUFR", "GRIB", "HDF5", "WMF", "PDF", "EPS"}


def _written() -> dict[str, bytes]:
    """A small picture in every format this Pillow can write (in the first mode it accepts)."""
    Image.init()
    out: dict[str, bytes] = {}
    for fmt in sorted(set(Image.SAVE) - _NO_WRITER):
        for mode in ("RGB", "RGBA", "L", "1", "P"):
            buf = io.BytesIO()
            try:
                make_image(7, (40, 32), mode).save(buf, format=fmt)
            except Exception:
                continue
            out[fmt] = buf.getvalue()
            break
    return out


def _dds(fourcc: bytes) -> bytes:
    """A DDS header with a compressed pixel format of `fourcc`, and some data."""
    header = struct.pack("<4s7I44x2I4s5I5I", b"DDS ", 124, 0x1007, 8, 8, 0, 0, 0, 32, 0x4, fourcc,
                         0, 0, 0, 0, 0, 0x1000, 0, 0, 0, 0)
    return header + bytes(256)


def _blp(encoding: int) -> bytes:
    """A BLP2 header with an encoding byte Pillow does not implement."""
    return b"BLP2" + struct.pack("<i4B2I", 1, encoding, 8, 0, 0, 8, 8) + bytes(16 * 4 * 2) + bytes(1024)


def corpus() -> dict[str, bytes]:
    rng = np.random.default_rng(17)
    items: dict[str, bytes] = {}
    for fmt, data in _written().items():
        items[fmt] = data
        for frac in (0.5, 0.9):
            items[f"{fmt} truncated {frac}"] = data[: max(1, int(len(data) * frac))]
        items[f"{fmt} header only"] = data[:24]
        for k in range(3):
            flipped = bytearray(data)
            for pos in rng.integers(0, len(data), 4):
                flipped[pos] ^= 1 << int(rng.integers(0, 8))
            items[f"{fmt} bit-flipped {k}"] = bytes(flipped)
        lying = bytearray(data)
        lying[6:18] = b"\xff" * min(12, max(0, len(data) - 6))  # where most headers keep their sizes
        items[f"{fmt} header lies"] = bytes(lying[: len(data)])
    items["DDS unimplemented fourcc"] = _dds(b"ATI9")
    items["DDS DX10 unknown format"] = _dds(b"DX10")[:128] + struct.pack("<5I", 200, 3, 0, 1, 0) + bytes(256)
    items["BLP unimplemented encoding"] = _blp(9)
    items["BLP1 bad"] = b"BLP1" + bytes(1200)
    if "AVIF" in items:
        items["AVIF garbage after ftyp"] = items["AVIF"][:32] + bytes(64)
    items["empty PNG signature"] = b"\x89PNG\r\n\x1a\n"
    items["text"] = b"definitely not an image"
    return items


CORPUS = corpus()


@pytest.fixture(scope="module")
def decoder(tiny_model) -> ImageDecoder:
    return ImageDecoder.create(tiny_model.preprocess_transform, "exact", tiny_model.image_size, 40_000_000)


def _outcome(decoder: ImageDecoder, data: bytes) -> str:
    try:
        decoder.prepare([data], ["images[0]"])
    except ClipsearchError as exc:
        assert exc.field == "images[0]"
        return str(status_for(exc))
    return "ok"


def test_every_odd_file_decodes_or_is_refused_by_name(decoder) -> None:
    assert {"DDS", "BLP", "PNG", "JPEG", "WEBP", "TIFF", "GIF"} <= set(CORPUS)
    tally = Counter(_outcome(decoder, data) for data in CORPUS.values())  # any other exception fails here
    assert set(tally) <= {"ok", "400", "413"}, tally
    assert tally["ok"] >= len(_written()) and tally["400"] > 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(CORPUS)), cuts=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                                           max_size=8),
       length=st.none() | st.integers(0, 10**6))
def test_mutated_bytes_never_escape_as_another_error(decoder, name, cuts, length) -> None:
    data = bytearray(CORPUS[name])
    for pos, value in cuts:
        data[pos % len(data)] = value
    if length is not None:
        data = data[: length % (len(data) + 1)]
    assert _outcome(decoder, bytes(data)) in {"ok", "400", "413"}


@pytest.mark.parametrize("decode", ["exact", "torch"])
def test_the_service_answers_every_odd_file_on_one_kept_alive_connection(tiny_model, decode) -> None:
    """Over real HTTP: no 5xx on any route that takes images, and no response closes the connection."""
    cfg = Settings(model=tiny_model.info.spec, device="cpu", image_decode=decode, warmup=False)
    app = create_app(cfg, state=ServiceState.build(cfg, model=tiny_model))
    statuses: Counter[int] = Counter()
    with live_server(app) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for name, data in CORPUS.items():
            image = base64.b64encode(data).decode()
            for path, body in (("/embed", {"images": [image]}),
                               ("/classify", {"image": image, "labels": ["a", "b"]}),
                               ("/similarity", {"texts": ["a"], "images": [image]})):
                conn.request("POST", path, orjson.dumps(body), {"content-type": "application/json"})
                response = conn.getresponse()
                reply = orjson.loads(response.read())
                statuses[response.status] += 1
                assert response.status < 500, (name, path, reply)
                assert not response.will_close, (name, path)
                if response.status != 200:
                    assert reply["error"]["field"] in ("images[0]", "image"), (name, reply)
        conn.close()
    assert statuses[200] > 0 and statuses[400] > 0
