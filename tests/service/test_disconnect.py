"""A client that hangs up is dropped before its rows reach the model (real uvicorn, real socket)."""

from __future__ import annotations

import logging
import socket
import time
import urllib.request

import orjson

from clipsearch.service.http.app import create_app
from clipsearch.service.settings import Settings
from clipsearch.service.state import ServiceState
from tests.conftest import gate_model_call, live_server


def test_hung_up_client_is_not_encoded_and_not_a_server_error(tiny_model, monkeypatch, caplog) -> None:
    """Its rows never reach the model; it is counted as 499, not 500, and logged in one line."""
    gate, encoded = gate_model_call(monkeypatch, tiny_model, "text_vectors")
    settings = Settings(model=tiny_model.info.spec, device="cpu", warmup=False)
    app = create_app(settings, state=ServiceState.build(settings, model=tiny_model))
    with caplog.at_level(logging.INFO), live_server(app) as port:

        def post(texts: list[str]) -> socket.socket:
            body = orjson.dumps({"texts": texts})
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            return s

        try:
            blocker = post(["occupies the model"])
            time.sleep(0.3)
            leaver = post(["first", "second", "third"])  # queued behind the blocker
            time.sleep(0.3)
            leaver.close()  # the client goes away while queued
            time.sleep(0.5)
        finally:
            gate.set()
        reply = blocker.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200")
        blocker.close()
        time.sleep(0.3)
        assert encoded == [1], encoded  # the 3 rows of the hung-up client never reached the model
        assert app.state.service.engine.text.stats.rows == 1
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    counted = {line.split("status=")[1][1:4] for line in metrics.splitlines()
               if line.startswith("clipsearch_requests_total{") and 'route="/embed"' in line}
    assert counted == {"200", "499"}, counted
    gone = [r for r in caplog.records if "client went away" in r.getMessage()]
    assert len(gone) == 1 and gone[0].levelno == logging.INFO and gone[0].exc_info is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


def test_app_factory_for_asgi_servers(tiny_spec, monkeypatch) -> None:
    from starlette.testclient import TestClient

    from clipsearch.service.http.app import app_from_env

    monkeypatch.setenv("CLIPSEARCH_MODEL", tiny_spec)
    monkeypatch.setenv("CLIPSEARCH_DEVICE", "cpu")
    with TestClient(app_from_env()) as client:  # the lifespan loads the model
        assert client.get("/readyz").status_code == 200
        assert client.post("/embed", json={"texts": ["x"]}).json()["dim"] == 64


def test_a_huge_body_is_refused_while_it_streams(tiny_model) -> None:
    """The default body limit is capped (32 MiB, not the ~850 MiB that 64 items at their
    limits would allow), and a chunked body past it gets 413 before the rest is read."""
    import select

    settings = Settings(model=tiny_model.info.spec, device="cpu", warmup=False)
    assert settings.body_limit == 32 << 20
    assert Settings(model="x", max_body_bytes=5000).body_limit == 5000
    app = create_app(settings, state=ServiceState.build(settings, model=tiny_model))
    with live_server(app) as port:
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"100000\r\n" + b"a" * (1 << 20) + b"\r\n"  # 1 MiB chunks
        sent = 0
        try:
            while sent < 256 << 20 and not select.select([s], [], [], 0)[0]:
                s.sendall(chunk)
                sent += 1 << 20
        except (BrokenPipeError, ConnectionResetError):
            pass
        s.settimeout(10)
        reply = s.recv(65536)
        s.close()
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert sent < 64 << 20, f"the server read {sent >> 20} MiB before refusing"


def test_connections_are_capped_and_idle_or_slow_ones_closed(tiny_model) -> None:
    """Past max_connections a connection gets 503 and is closed; one that sends no complete
    headers in header_timeout_s is closed (so idle sockets cannot hold the service), and a
    body that does not arrive in body_timeout_s gets 408. /healthz works again afterwards."""
    from clipsearch.service.http.protocol import PROTOCOL

    settings = Settings(model=tiny_model.info.spec, device="cpu", warmup=False, max_connections=8,
                        header_timeout_s=1.0, body_timeout_s=1.0)
    app = create_app(settings, state=ServiceState.build(settings, model=tiny_model))

    def healthz(port: int) -> bytes:
        s = socket.create_connection(("127.0.0.1", port))
        s.settimeout(5)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = s.recv(65536)
        s.close()
        return reply

    with live_server(app, http=PROTOCOL) as port:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
        time.sleep(0.2)
        refused = healthz(port)
        assert refused.startswith(b"HTTP/1.1 503") and b"too many open connections" in refused, refused
        for s in idle:  # closed by the server once the header deadline passes (the 5 s is a hang guard)
            s.settimeout(5)
            assert s.recv(10) == b""
            s.close()
        assert healthz(port).startswith(b"HTTP/1.1 200")

        trickle = socket.create_connection(("127.0.0.1", port))
        trickle.sendall(b"GET /healthz HTTP/1.1\r\n")
        t0 = time.monotonic()
        closed = False
        while time.monotonic() - t0 < 4 and not closed:
            try:
                trickle.sendall(b"X-Slow: y\r\n")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
            time.sleep(0.2)
        assert closed, "a connection trickling its headers was kept open"

        slow = socket.create_connection(("127.0.0.1", port))
        slow.settimeout(5)
        slow.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"texts\"")
        reply = slow.recv(65536)
        slow.close()
        assert reply.startswith(b"HTTP/1.1 408"), reply
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "clipsearch_connections_refused_total 1.0" in metrics
