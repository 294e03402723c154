"""Hostile input, round two: images whose aspect ratio would blow up preprocessing, URL paths
that escape an allowed prefix, IPv6 addresses that carry private IPv4 ones, credentials
checked before a body is read, and capped echoes of what a client sent."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import socket

import pytest
from PIL import Image

from clipsearch.core.errors import ImageFetchFailed, InvalidImage
from clipsearch.images.codec import MAX_ASPECT_RATIO, decode_image, probe_image
from clipsearch.service.fetch import ImageFetcher
from clipsearch.service.http.app import create_app
from clipsearch.service.settings import Settings
from clipsearch.service.state import ServiceState
from tests.conftest import live_server

THIN = [(200_000, 1), (1, 200_000), (40_000, 1), (MAX_ASPECT_RATIO * 10 + 10, 10)]


def png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


@pytest.mark.parametrize("size", THIN)
def test_thin_images_are_refused_from_their_header(size) -> None:
    data = png(size)
    assert len(data) < 2000  # a few hundred bytes that would have become a strip of millions of pixels
    with pytest.raises(InvalidImage, match="too narrow") as err:
        probe_image(data, field="images[3]", max_pixels=100_000_000)
    assert err.value.field == "images[3]"


def test_wide_but_reasonable_images_still_decode() -> None:
    image = decode_image(base64.b64encode(png((MAX_ASPECT_RATIO * 10, 10))).decode(), field="image",
                         max_bytes=1 << 20, max_pixels=100_000_000)
    assert image.size == (MAX_ASPECT_RATIO * 10, 10)


async def test_thin_images_get_a_400_on_every_image_route(make_client, tiny_model) -> None:
    thin = base64.b64encode(png((200_000, 1))).decode()
    async with make_client(tiny_model) as client:
        r = await client.post("/embed", json={"images": [base64.b64encode(png((64, 48))).decode(), thin]})
        assert r.status_code == 400 and r.json()["error"]["field"] == "images[1]", r.text
        r = await client.post("/classify", json={"image": thin, "labels": ["a", "b"]})
        assert r.status_code == 400 and r.json()["error"]["field"] == "image", r.text
        r = await client.post("/embed", files=[("images", ("tall.png", png((1, 200_000)), "image/png"))])
        assert r.status_code == 400 and "too narrow" in r.json()["error"]["message"], r.text


def _fetcher(*allowed: str, networks: tuple[str, ...] = ()) -> ImageFetcher:
    return ImageFetcher(list(allowed), list(networks), max_bytes=1 << 20, timeout_s=5)


@pytest.mark.parametrize(("path", "says"), [
    ("/public/%2e%2e/secret.png", "dot segment"),
    ("/public/%2E%2e/secret.png", "dot segment"),
    ("/public/..%2fsecret.png", "encoded slash"),
    ("/public/..%2Fsecret.png", "encoded slash"),
    ("/public/a/%2e/b.png", "dot segment"),
    ("/public/..%5csecret.png", "encoded slash"),
])
async def test_allowed_prefixes_are_not_escaped_by_encoded_paths(path, says) -> None:
    fetcher = _fetcher("http://images.example/public/")
    with pytest.raises(ImageFetchFailed, match=says) as err:
        await fetcher.fetch(f"http://images.example{path}", "images[0]")  # refused before any lookup
    assert err.value.field == "images[0]"


async def test_literal_dot_segments_are_checked_as_sent() -> None:
    fetcher = _fetcher("http://images.example/public/")
    with pytest.raises(ImageFetchFailed, match="not an allowed image source"):
        await fetcher.fetch("http://images.example/public/../secret.png", "images[0]")


@pytest.mark.parametrize("address", [
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "64:ff9b:1::a9fe:a9fe",  # local-use NAT64
    "2002:a9fe:a9fe::1",  # 6to4
    "::a9fe:a9fe",  # IPv4-compatible
    "::ffff:0:a9fe:a9fe",  # IPv4-translated
    "::ffff:169.254.169.254",  # IPv4-mapped
])
async def test_ipv6_addresses_that_carry_a_private_ipv4_are_refused(monkeypatch, address) -> None:
    loop = asyncio.get_running_loop()

    async def resolve(host, port, **kwargs):
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0))]

    monkeypatch.setattr(loop, "getaddrinfo", resolve)  # never connects: the check refuses first
    with pytest.raises(ImageFetchFailed, match=r"169\.254\.169\.254") as err:
        await _fetcher("images.example").fetch("http://images.example/x.png", "images[2]")
    assert err.value.field == "images[2]"


async def test_ipv6_carrying_a_public_ipv4_or_an_allowed_network_passes_the_check(monkeypatch) -> None:
    import httpx

    loop = asyncio.get_running_loop()
    answers = {"public.example": "64:ff9b::808:808", "lab.example": "64:ff9b::a00:1"}

    async def resolve(host, port, **kwargs):
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (answers[host], port, 0, 0))]

    monkeypatch.setattr(loop, "getaddrinfo", resolve)
    fetcher = _fetcher("public.example", "lab.example", networks=("10.0.0.0/8",))
    for host, address in answers.items():
        assert str(await fetcher._check(httpx.URL(f"http://{host}/x.png"), "image")) == address


def _raw_request(port: int, head: bytes, body_part: bytes) -> bytes:
    """Send a request's head and the first part of a much larger declared body, then read the
    answer without sending the rest: only a server that refuses before reading answers."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(20)  # a hang guard: a server that waits for the whole body never answers
        s.sendall(head + body_part)
        try:
            return s.recv(65536)
        except TimeoutError:
            return b""


@pytest.fixture
def guarded(tiny_model):
    settings = Settings(model=tiny_model.info.spec, device="cpu", warmup=False, admin_token="s3cret",
                        api_keys="k1", body_timeout_s=60.0)
    app = create_app(settings, state=ServiceState.build(settings, model=tiny_model))
    with live_server(app) as port:
        yield port


@pytest.mark.parametrize(("path", "auth", "status"), [
    ("/admin/reload", b"Bearer wrong", b"401"),
    ("/admin/reload", b"", b"401"),
    ("/ui", b"Bearer k1", b"405"),  # the page's routes take GET only: no body is read to say so
    ("/ui/app.js", b"", b"405"),
    ("/admin/anything", b"", b"401"),
    ("/embed", b"Bearer wrong", b"401"),
])
def test_credentials_and_bodiless_routes_answer_before_the_body_is_read(guarded, path, auth, status) -> None:
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {30 << 20}\r\n").encode()
    head += (b"Authorization: " + auth + b"\r\n" if auth else b"") + b"\r\n"
    reply = _raw_request(guarded, head, b"x" * 65536)
    assert reply.startswith(b"HTTP/1.1 " + status), reply[:300]


def test_a_body_on_the_page_is_refused_before_it_is_read(guarded) -> None:
    head = f"GET /ui HTTP/1.1\r\nHost: x\r\nContent-Length: {30 << 20}\r\n\r\n".encode()
    assert _raw_request(guarded, head, b"x" * 65536).startswith(b"HTTP/1.1 413")


def test_the_search_page_is_public_under_api_keys(guarded) -> None:
    import httpx

    assert httpx.get(f"http://127.0.0.1:{guarded}/ui", timeout=10).status_code == 200
    assert httpx.get(f"http://127.0.0.1:{guarded}/readyz", timeout=10).status_code == 200
    assert httpx.get(f"http://127.0.0.1:{guarded}/", timeout=10).status_code == 401


async def test_readyz_shows_no_disk_path_with_internals_hidden(make_client, tiny_model) -> None:
    async with make_client(tiny_model, expose_internals=False) as client:
        body = (await client.get("/readyz")).json()
    assert tiny_model.info.spec.startswith("local-dir:/") and "/" not in body["model"], body


async def test_errors_do_not_echo_long_inputs_back(make_client, tiny_model) -> None:
    huge = "9" * 5000
    async with make_client(tiny_model) as client:
        r = await client.post("/search/text", content=f'{{"text": "x", "k": 3, "filter": {{"n": {huge}}}}}',
                              headers={"content-type": "application/json"})
        r2 = await client.post("/embed", json={"texts": ["ok"], huge: 1})
    for reply in (r, r2):
        assert reply.status_code in range(400, 500) and len(reply.text) < 1500, reply.text[:300]


def test_a_missing_index_folder_is_logged_once_not_every_poll(tiny_model, tmp_path, caplog) -> None:
    folder = tmp_path / "index"
    folder.mkdir()
    settings = Settings(model=tiny_model.info.spec, device="cpu", warmup=False, index_dir=folder)
    state = ServiceState.build(settings, model=tiny_model)
    folder.rmdir()
    with caplog.at_level(logging.ERROR, logger="clipsearch.service.state"):
        for _ in range(5):
            state.load_index(fatal=False)
    refusals = [r for r in caplog.records if "index version refused" in r.getMessage()]
    assert len(refusals) == 1 and "does not exist" in refusals[0].getMessage()
    assert "does not exist" in (state.indexes.error or "")


def test_the_builder_skips_thin_images_as_bad_records(tmp_path, tiny_model) -> None:
    from clipsearch.builder.build import BuildOptions, run_build

    good = base64.b64encode(png((64, 48))).decode()
    thin = base64.b64encode(png((200_000, 1))).decode()
    (tmp_path / "c.tsv").write_text(f"a\t{good}\nb\t{thin}\nc\t{good}\n")
    summary = run_build(BuildOptions(inputs=[tmp_path / "c.tsv"], output=tmp_path / "idx", model=tiny_model.info.spec,
                                     progress=False, index_type="flat", hash_inputs=False, max_error_fraction=0.9),
                        model=tiny_model)
    assert summary.encoded["image"] == 2 and summary.skipped == 1
    assert summary.errors[0]["source"] == "c.tsv:2" and "too narrow" in summary.errors[0]["reason"]
