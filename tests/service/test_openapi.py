"""The OpenAPI document is the truth: schemathesis, with all its checks over every operation,
finds no request the service answers otherwise than the document says."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from starlette.testclient import TestClient

from clipsearch.core.index_format import ModelRef, write_index_from_vectors
from service.http.app import create_app
from service.http.protocol import PROTOCOL
from service.settings import Settings
from service.state import ServiceState
from tests.conftest import live_server

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def both_indexes(tmp_path_factory, tiny_model) -> Path:
    path = tmp_path_factory.mktemp("openapi-index")
    vectors = tiny_model.encode_texts([f"thing {i}" for i in range(40)])
    ref = ModelRef(spec=tiny_model.info.spec, fingerprint=tiny_model.info.fingerprint)
    write_index_from_vectors(path, model=ref, image=(vectors, [{"id": f"i{i}"} for i in range(40)]),
                             text=(vectors, [{"id": f"t{i}", "text": f"thing {i}"} for i in range(40)]))
    return path


def test_schemathesis_finds_nothing_with_all_checks(tiny_model, both_indexes) -> None:
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert cli, "schemathesis is a dev dependency"
    settings = Settings(model=tiny_model.info.spec, device="cpu", index_dir=both_indexes, warmup=False)
    app = create_app(settings, state=ServiceState.build(settings, model=tiny_model))
    with live_server(app, http=PROTOCOL) as port:
        r = subprocess.run([cli, "run", f"http://127.0.0.1:{port}/openapi.json", "--checks", "all",
                            "--max-examples", "25", "--generation-deterministic", "--no-color"],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "generated" in r.stdout


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
