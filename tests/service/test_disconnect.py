"""A client that hangs up is dropped before its rows reach the model (real uvicorn, real socket)."""

from __future__ import annotations

import logging
import socket
import time
import urllib.request

import orjson

from service.http.app import create_app
from service.settings import Settings
from service.state import ServiceState
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

    from service.http.app import app_from_env

    monkeypatch.setenv("CLIPSEARCH_MODEL", tiny_spec)
    monkeypatch.setenv("CLIPSEARCH_DEVICE", "cpu")
    with TestClient(app_from_env()) as client:  # the lifespan loads the model
        assert client.get("/readyz").status_code == 200
        assert client.post("/embed", json={"texts": ["x"]}).json()["dim"] == 64
