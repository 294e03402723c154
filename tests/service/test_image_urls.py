"""Image URLs: off by default; fetched only from allowed hosts or prefixes, from checked
addresses, within a size cap and a deadline. Against a real HTTP server the test starts on
127.0.0.1 (and allows explicitly)."""

from __future__ import annotations

import asyncio
import base64
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import httpx
import numpy as np
import pytest

from clipsearch.service.fetch import Allowed, ImageFetcher
from tests.conftest import image_bytes, make_image

PHOTO = image_bytes(make_image(11, (64, 48)), "PNG")
LIMIT = 50_000


class Handler(BaseHTTPRequestHandler):
    hosts: ClassVar[list[str]] = []  # the Host header of every request
    release: ClassVar[threading.Event] = threading.Event()
    slow_finished: ClassVar[threading.Event] = threading.Event()

    def do_GET(self) -> None:
        Handler.hosts.append(self.headers.get("host", ""))
        port = self.server.server_address[1]
        if self.path == "/img.png":
            self._send(200, PHOTO)
        elif self.path == "/slow.png":
            Handler.release.wait(10)  # the test releases it once the service has answered
            Handler.slow_finished.set()
            self._send(200, PHOTO)
        elif self.path == "/big.png":  # no Content-Length: the cap is checked as the body streams
            self.send_response(200)
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for _ in range(LIMIT // 10_000 + 2):
                self.wfile.write(b"2710\r\n" + b"x" * 10_000 + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/declared.png":
            self.send_response(200)
            self.send_header("content-length", str(LIMIT * 100))
            self.end_headers()
        elif self.path == "/inside":
            self._redirect("/img.png")
        elif self.path == "/outside":
            self._redirect(f"http://localhost:{port}/img.png")
        else:
            self._send(404, b"no such image")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("location", location)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def image_server() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def _allowing(port: int) -> dict:
    return {"image_urls": [f"http://127.0.0.1:{port}/"], "image_url_networks": ["127.0.0.1/32"],
            "image_url_timeout_s": 1.0, "max_image_bytes": LIMIT}


async def test_an_allowed_url_gives_the_vector_of_its_bytes(make_client, tiny_model, image_server) -> None:
    url = f"http://127.0.0.1:{image_server}"
    async with make_client(tiny_model, **_allowing(image_server)) as client:
        want = (await client.post("/embed", json={"images": [base64.b64encode(PHOTO).decode()] * 2})).json()["images"]
        r = await client.post("/embed", json={"images": [f"{url}/img.png", f"{url}/inside"]})  # a redirect inside
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(r.json()["images"], want)
        r = await client.post("/classify", json={"image": f"{url}/img.png", "labels": ["a", "b"]})
        assert r.status_code == 200, r.text
        r = await client.post("/v1/embeddings", json={"model": tiny_model.info.spec, "input": [f"{url}/img.png"],
                                                      "modality": "image", "encoding_format": "float"})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose([r.json()["data"][0]["embedding"]], want[:1], atol=1e-6)


@pytest.mark.parametrize(("path", "status", "says"), [
    ("/missing.png", 400, "HTTP 404"),
    ("/slow.png", 400, "longer than 1 s"),
    ("/big.png", 413, f"limit of {LIMIT} bytes"),
    ("/declared.png", 413, f"limit of {LIMIT} bytes"),
    ("/outside", 400, "is not an allowed image source"),  # a redirect to a host that is not allowed
])
async def test_refused_urls_name_the_item(make_client, tiny_model, image_server, path, status, says) -> None:
    async with make_client(tiny_model, **_allowing(image_server)) as client:
        Handler.release.clear()
        Handler.slow_finished.clear()
        r = await client.post("/embed", json={"images": [base64.b64encode(PHOTO).decode(),
                                                         f"http://127.0.0.1:{image_server}{path}"]})
        assert r.status_code == status and r.json()["error"]["field"] == "images[1]", r.text
        assert says in r.json()["error"]["message"], r.text
        assert not Handler.slow_finished.is_set()  # answered while the slow server still held its reply
        Handler.release.set()
        assert (await client.get("/readyz")).status_code == 200


async def test_local_addresses_are_refused_unless_their_network_is_allowed(make_client, tiny_model,
                                                                            image_server) -> None:
    port = image_server
    for allowed, url in [
        (["localhost"], f"http://localhost:{port}/img.png"),  # an allowed name that resolves to loopback
        ([f"127.0.0.1:{port}"], f"http://127.0.0.1:{port}/img.png"),
        (["::ffff:127.0.0.1"], f"http://[::ffff:127.0.0.1]:{port}/img.png"),
    ]:
        async with make_client(tiny_model, image_urls=allowed) as client:
            r = await client.post("/classify", json={"image": url, "labels": ["x"]})
        assert r.status_code == 400 and r.json()["error"]["field"] == "image", r.text
        assert "private or local address" in r.json()["error"]["message"], r.text


async def test_image_urls_are_off_by_default(make_client, tiny_model, image_server) -> None:
    async with make_client(tiny_model) as client:
        r = await client.post("/embed", json={"images": [f"http://127.0.0.1:{image_server}/img.png"]})
    assert r.status_code == 400 and r.json()["error"]["field"] == "images[0]"
    assert "CLIPSEARCH_IMAGE_URLS" in r.json()["error"]["message"]


async def test_the_connection_goes_to_the_checked_address(image_server, monkeypatch) -> None:
    """A name that DNS does not know, resolved here to 127.0.0.1: the fetch works only if the
    connection goes to the address that was checked, and the server sees the original Host."""
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo

    async def fake(host, port, **kw):
        if host == "images.invalid":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return await real(host, port, **kw)

    monkeypatch.setattr(loop, "getaddrinfo", fake)
    fetcher = ImageFetcher(["images.invalid"], ["127.0.0.0/8"], max_bytes=LIMIT, timeout_s=2)
    try:
        Handler.hosts.clear()
        assert await fetcher.fetch(f"http://images.invalid:{image_server}/img.png", "image") == PHOTO
        assert Handler.hosts == [f"images.invalid:{image_server}"]
        with pytest.raises(httpx.ConnectError):  # what httpx alone would do with that name
            await httpx.AsyncClient(trust_env=False).get(f"http://images.invalid:{image_server}/img.png")
    finally:
        await fetcher.aclose()


@pytest.mark.parametrize(("entry", "url", "matches"), [
    ("https://cdn.example.com/public/", "https://cdn.example.com/public/a.jpg", True),
    ("https://cdn.example.com/public", "https://cdn.example.com/public/x/a.jpg", True),
    ("https://cdn.example.com/public", "https://cdn.example.com/publicity/a.jpg", False),
    ("https://cdn.example.com/public", "https://cdn.example.com.evil.net/public/a.jpg", False),
    ("https://cdn.example.com/public", "http://cdn.example.com/public/a.jpg", False),
    ("https://cdn.example.com/public", "https://cdn.example.com:8443/public/a.jpg", False),
    ("cdn.example.com", "http://CDN.example.com:8080/a.jpg", True),
    ("cdn.example.com:443", "http://cdn.example.com/a.jpg", False),
    ("*.example.com", "https://a.b.example.com/x.jpg", True),
    ("*.example.com", "https://badexample.com/x.jpg", False),
])
def test_allow_list_entries(entry, url, matches) -> None:
    assert Allowed.parse(entry).matches(httpx.URL(url)) is matches
