"""The OpenAPI document is the truth: schemathesis, with all its checks over every operation,
finds no request the service answers otherwise than the document says.

Forms are fuzzed with schema-valid data only: a form carries text, so the `{}` that
schemathesis sends for a "wrong type" in a text field is a valid text there."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from starlette.testclient import TestClient

from clipsearch.index.format import ModelRef
from clipsearch.service.http.app import create_app
from clipsearch.service.http.protocol import PROTOCOL
from clipsearch.service.settings import Settings
from clipsearch.service.state import ServiceState
from tests.conftest import live_server
from tests.tiny import write_index_from_vectors

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def both_indexes(tmp_path_factory, tiny_model) -> Path:
    path = tmp_path_factory.mktemp("openapi-index")
    vectors = tiny_model.encode_texts([f"thing {i}" for i in range(40)])
    ref = ModelRef(spec=tiny_model.info.spec, fingerprint=tiny_model.info.fingerprint)
    write_index_from_vectors(path, model=ref, image=(vectors, [{"id": f"i{i}"} for i in range(40)]),
                             text=(vectors, [{"id": f"t{i}", "text": f"thing {i}"} for i in range(40)]))
    return path


def _schemathesis(cli: str, schema: str, *extra: str) -> None:
    r = subprocess.run([cli, "run", schema, "--checks", "all", "--max-examples", "25", "--generation-deterministic",
                        "--no-color", *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "generated" in r.stdout


@pytest.mark.slow
def test_schemathesis_finds_nothing_with_all_checks(tiny_model, both_indexes, tmp_path) -> None:
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert cli, "schemathesis is a dev dependency"
    settings = Settings(model=tiny_model.info.spec, device="cpu", index_dir=both_indexes, warmup=False)
    app = create_app(settings, state=ServiceState.build(settings, model=tiny_model))
    with live_server(app, http=PROTOCOL) as port:
        base = f"http://127.0.0.1:{port}"
        spec = httpx.get(f"{base}/openapi.json").json()
        forms = sum("multipart/form-data" in op.get("requestBody", {}).get("content", {})
                    for path in spec["paths"].values() for op in path.values())
        assert forms == 5  # /embed, /search/image, /classify, /similarity and immich's /predict take uploads
        _schemathesis(cli, f"{base}/openapi.json", "--mode", "positive")
        for path in spec["paths"].values():
            for op in path.values():
                op.get("requestBody", {}).get("content", {}).pop("multipart/form-data", None)
        json_only = tmp_path / "openapi-json.json"
        json_only.write_text(json.dumps(spec))
        _schemathesis(cli, str(json_only), "--url", base)


def test_the_document_carries_this_deployments_limits_and_strict_types(tiny_model, both_indexes) -> None:
    settings = Settings(model=tiny_model.info.spec, device="cpu", index_dir=both_indexes, max_k=7,
                        max_text_chars=30, max_items_per_request=5)
    with TestClient(create_app(settings, state=ServiceState.build(settings, model=tiny_model))) as client:
        spec = client.get("/openapi.json").json()
        body = spec["paths"]["/search/text"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["properties"]["k"]["maximum"] == 7 and body["properties"]["text"]["maxLength"] == 30
        embed = spec["paths"]["/embed"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert embed["properties"]["texts"]["maxItems"] == 5
        assert embed["properties"]["images"]["items"]["minLength"] == 1
        assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
        for k in ("5", True, 2.5):
            r = client.post("/search/text", json={"text": "x", "k": k})
            assert r.status_code == 422 and r.json()["error"]["field"] == "k", (k, r.text)
        assert client.post("/search/text", json={"text": "x", "k": 3.0}).status_code == 200
        r = client.post("/embed", json={"images": [""]})
        assert r.status_code == 422 and r.json()["error"]["field"] == "images[0]"
        assert np.asarray(client.post("/embed", json={"texts": ["x"]}).json()["texts"]).shape == (1, 64)
