"""Malformed requests nobody wrote by hand: generated bodies never get a 5xx."""

from __future__ import annotations

import base64
import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from clipsearch.service.http.app import create_app
from clipsearch.service.settings import Settings
from clipsearch.service.state import ServiceState
from tests.conftest import encode_image, make_image

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
GOOD = encode_image(make_image(3))
_JPEG = base64.b64decode(GOOD)
CUT_JPEG = base64.b64encode(_JPEG[: len(_JPEG) // 2]).decode()  # a header that passes, data that does not
image_like = st.one_of(
    st.just(GOOD),
    st.just(GOOD[: len(GOOD) // 2]),
    st.just(CUT_JPEG),
    st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode()),
    st.text(max_size=60),
    st.just("data:image/png;base64,"),
)
fields = {
    "texts": st.lists(st.text(max_size=30), max_size=5) | json_values,
    "images": st.lists(image_like, max_size=3) | json_values,
    "text": st.text(max_size=30) | json_values,
    "image": image_like | json_values,
    "k": st.integers(-5, 5000) | json_values,
    "nprobe": st.integers(-3, 10**6) | json_values,
    "ef_search": st.integers(-3, 10**6) | json_values,
}
bodies = st.fixed_dictionaries({}, optional=fields) | json_values


@pytest.fixture(scope="module", params=["exact", "torch-batch"])
def client(tiny_model, request):
    """The exact path, and the torch path decoding JPEGs per batch (the GPU's way) on the CPU."""
    cfg = Settings(model=tiny_model.info.spec, device="cpu", image_decode=request.param.split("-")[0])
    state = ServiceState.build(cfg, model=tiny_model)
    if request.param == "torch-batch":
        state.engine.decoder = dataclasses.replace(state.engine.decoder, jpegs_per_batch=True)
    app = create_app(cfg, state=state)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/embed", "/search/text", "/search/image"]), body=bodies)
def test_generated_json_never_5xx(client, path, body) -> None:
    r = client.post(path, json=body)
    # 503 is the documented answer for search without an index; everything else is 2xx/4xx.
    assert r.status_code < 500 or (r.status_code == 503 and path.startswith("/search")), (body, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"type", "message", "field"}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=300), ctype=st.sampled_from(["application/json", "text/plain", "", "image/png"]))
def test_generated_raw_bodies_never_5xx(client, raw, ctype) -> None:
    r = client.post("/embed", content=raw, headers={"content-type": ctype} if ctype else {})
    assert r.status_code in range(400, 500), r.text
    assert client.get("/readyz").status_code == 200
