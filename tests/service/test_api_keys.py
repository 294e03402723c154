"""API keys: with keys set, every route of the app but the health probes refuses a request
without a valid Bearer key (found by walking the app's routes, so a new route cannot be
missed); /admin keeps its own token; a key file is read again when it changes; keys are
never logged."""

from __future__ import annotations

import logging
import os
import time

import openai
import pydantic
import pytest
from starlette.routing import Mount, Route

from clipsearch.service.http.app import create_app
from clipsearch.service.settings import Settings
from clipsearch.service.state import ServiceState
from tests.conftest import live_server

KEYS = "key-one-8f2c, key-two-77ad"
# probes (a kubelet's, Weaviate's, immich's), and the page's static files
PUBLIC = {"/healthz", "/readyz", "/.well-known/live", "/.well-known/ready", "/ping", "/ui", "/ui/{name}"}


def _message_and_field(body: dict) -> tuple[str, str | None]:
    """The message and the field named, in each API's error shape."""
    if "detail" in body:  # immich's
        return body["detail"], None
    if isinstance(body["error"], str):  # Weaviate's, clip-retrieval's
        return body["error"], None
    error = body["error"]
    return error["message"], error.get("field", error.get("param"))


def _routes(routes, prefix: str = "") -> list[tuple[str, str]]:
    """(method, path) of every route, into included routers (FastAPI keeps them as such)."""
    out = []
    for route in routes:
        if hasattr(route, "original_router"):
            out += _routes(route.original_router.routes, prefix + route.include_context.prefix)
            continue
        if isinstance(route, Mount):  # static files: one of them stands for all
            out.append(("GET", prefix + route.path + "/swagger-ui.css"))
            continue
        assert isinstance(route, Route), f"{route!r}: a kind of route this test does not walk"
        out += [(method, prefix + route.path) for method in sorted(route.methods or ()) if method != "HEAD"]
    return out


async def test_every_route_but_health_needs_a_key(make_client, tiny_model, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    async with make_client(tiny_model, api_keys=KEYS, admin_token="admin-secret-1") as client:
        routes = _routes(client.app.routes)
        assert {"/embed", "/search/text", "/v1/embeddings", "/metrics", "/docs", "/openapi.json", "/",
                "/thumbnails/{version}/{row}", "/static-offline-docs/swagger-ui.css", "/embeddings", "/rerank",
                "/knn-service", "/metadata", "/vectorize", "/meta", "/predict"} <= {path for _, path in routes}
        for method, path in routes:
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "key-one-8f2c"}):
                r = await client.request(method, path.replace("{version}", "v1").replace("{row}", "0")
                                         .replace("{name}", "app.js"), headers=headers, json={})
                if path in PUBLIC:
                    if path.startswith("/ui"):  # the page takes no body: one is refused at once
                        assert r.status_code == 413, (method, path, r.status_code)
                        r = await client.request(method, path.replace("{name}", "app.js"), headers=headers)
                    assert r.status_code in (200, 204, 503), (method, path, r.status_code)
                    continue
                assert r.status_code == 401, (method, path, headers, r.status_code)
                if path.startswith("/admin/"):
                    continue  # its own token, its own message
                assert r.headers["www-authenticate"] == "Bearer"
                message, field = _message_and_field(r.json())
                assert ("missing API key" if not headers else "invalid API key") in message
                assert field in ("authorization", None) and "Authorization: Bearer" in message
        r = await client.post("/nope", content=b"x" * (64 << 20))  # refused before the body is read
        assert r.status_code == 401
        for key in ("key-one-8f2c", "key-two-77ad"):
            auth = {"authorization": f"Bearer {key}"}
            assert (await client.get("/", headers=auth)).status_code == 200
            assert (await client.get("/metrics", headers=auth)).status_code == 200
            r = await client.post("/embed", json={"texts": ["a"]}, headers=auth)
            assert r.status_code == 200 and len(r.json()["texts"]) == 1
            # an API key is not the admin token, and the admin token is not an API key
            assert (await client.post("/admin/reload", headers=auth)).status_code == 401
        admin = {"authorization": "Bearer admin-secret-1"}
        assert (await client.post("/embed", json={"texts": ["a"]}, headers=admin)).status_code == 401
        assert (await client.post("/admin/reload", headers=admin)).status_code == 200
    for secret in ("key-one-8f2c", "key-two-77ad", "admin-secret-1"):
        assert secret not in caplog.text
    assert "key-one" not in repr(Settings(api_keys=KEYS))


async def test_without_keys_the_service_is_open(make_client, tiny_model) -> None:
    async with make_client(tiny_model) as client:
        assert (await client.post("/embed", json={"texts": ["a"]})).status_code == 200


def test_the_openai_sdks_api_key_is_the_bearer_key(tiny_model) -> None:
    settings = Settings(model=tiny_model.info.spec, device="cpu", warmup=False, api_keys=KEYS)
    app = create_app(settings, state=ServiceState.build(settings, model=tiny_model))
    with live_server(app) as port:
        base = f"http://127.0.0.1:{port}/v1"
        good = openai.OpenAI(base_url=base, api_key="key-two-77ad")
        assert len(good.embeddings.create(model=tiny_model.info.spec, input="x").data) == 1
        with pytest.raises(openai.AuthenticationError) as err:
            openai.OpenAI(base_url=base, api_key="nope", max_retries=0).embeddings.create(
                model=tiny_model.info.spec, input="x")
        assert err.value.body["code"] == "invalid_api_key"


async def test_a_key_file_is_read_again_when_it_changes(make_client, tiny_model, tmp_path) -> None:
    path = tmp_path / "keys"
    path.write_text("# rotated by the secret store\nfile-key-a\n\nfile-key-b\n")
    async with make_client(tiny_model, api_keys_file=path) as client:
        async def status(key: str) -> int:
            return (await client.get("/", headers={"authorization": f"Bearer {key}"})).status_code

        assert await status("file-key-a") == 200 and await status("file-key-b") == 200
        assert await status("file-key-c") == 401
        path.write_text("file-key-c\n")
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new mtime even on a coarse clock
        time.sleep(1.05)
        assert await status("file-key-c") == 200 and await status("file-key-a") == 401
        path.write_text("")  # an emptied file keeps the keys read before (logged), it does not lock out
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
        time.sleep(1.05)
        assert await status("file-key-c") == 200


@pytest.mark.parametrize("content", [None, "# only a comment\n"])
def test_a_missing_or_empty_key_file_stops_the_service_at_start(tmp_path, content) -> None:
    path = tmp_path / "keys"
    if content is not None:
        path.write_text(content)
    with pytest.raises(pydantic.ValidationError, match="api_keys_file"):
        Settings(api_keys_file=path)
