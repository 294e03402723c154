"""A client that hangs up is dropped before its rows reach the model (real uvicorn, real socket)."""

from __future__ import annotations

import socket
import threading
import time

import orjson
import uvicorn

from service.http.app import create_app
from service.settings import Settings
from service.state import ServiceState
from tests.clipsearch.test_cli import free_port
from tests.conftest import gate_model_call


def test_hung_up_client_is_not_encoded(tiny_model, monkeypatch) -> None:
    gate, encoded = gate_model_call(monkeypatch, tiny_model, "text_vectors")
    port = free_port()
    settings = Settings(model=tiny_model.info.spec, device="cpu", port=port, warmup=False)
    app = create_app(settings, state=ServiceState.build(settings, model=tiny_model))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)

        def post(texts: list[str]) -> socket.socket:
            body = orjson.dumps({"texts": texts})
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            return s

        blocker = post(["occupies the model"])
        time.sleep(0.3)
        leaver = post(["first", "second", "third"])  # queued behind the blocker
        time.sleep(0.3)
        leaver.close()  # the client goes away while queued
        time.sleep(0.3)
        gate.set()
        reply = blocker.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200")
        blocker.close()
        time.sleep(0.3)
        assert encoded == [1], encoded  # the 3 rows of the hung-up client never reached the model
        stats = app.state.service.engine.text.stats
        assert stats.rows == 1
    finally:
        gate.set()
        server.should_exit = True
        thread.join(10)


def test_app_factory_for_asgi_servers(tiny_spec, monkeypatch) -> None:
    from starlette.testclient import TestClient

    from service.http.app import app_from_env

    monkeypatch.setenv("CLIPSEARCH_MODEL", tiny_spec)
    monkeypatch.setenv("CLIPSEARCH_DEVICE", "cpu")
    with TestClient(app_from_env()) as client:  # the lifespan loads the model
        assert client.get("/readyz").status_code == 200
        assert client.post("/embed", json={"texts": ["x"]}).json()["dim"] == 64
