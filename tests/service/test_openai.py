"""The OpenAI-compatible routes, driven by the real `openai` SDK (sync and async) against a live
server: the same vectors as /embed, base64 decoded back to the same floats, real token
counts, images through `modality`, and errors surfacing as the SDK's exceptions."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest

from clipsearch.service.http.app import create_app
from clipsearch.service.settings import Settings
from clipsearch.service.state import ServiceState
from tests.conftest import encode_image, live_server, make_image

TEXTS = ["a red circle", "two blue squares on a grey background", "日本語のテキスト"]


@pytest.fixture(scope="module")
def server(tiny_model):
    settings = Settings(model=tiny_model.info.spec, device="cpu", warmup=False, served_model_name="clip-tiny")
    app = create_app(settings, state=ServiceState.build(settings, model=tiny_model))
    with live_server(app) as port:
        yield f"http://127.0.0.1:{port}"


def _embed(base: str, **body) -> dict:
    return httpx.post(f"{base}/embed", json=body, timeout=30).json()


def test_sdk_embeddings_equal_embed_for_texts_and_images(server, tiny_model) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["clip-tiny"]
    want = np.asarray(_embed(server, texts=TEXTS)["texts"])
    floats = client.embeddings.create(model="clip-tiny", input=TEXTS, encoding_format="float")
    np.testing.assert_array_equal(np.asarray([d.embedding for d in floats.data], np.float32), want.astype(np.float32))
    assert [d.index for d in floats.data] == [0, 1, 2] and floats.model == "clip-tiny"
    tokens = (tiny_model.tokenize(TEXTS) != 0).sum().item()
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == tokens > 3 * 2
    raw = client.embeddings.with_raw_response.create(model="clip-tiny", input=TEXTS, encoding_format="base64")
    encoded = [d["embedding"] for d in raw.http_response.json()["data"]]
    decoded = np.stack([np.frombuffer(base64.b64decode(e), dtype="<f4") for e in encoded])
    np.testing.assert_array_equal(decoded, want.astype(np.float32))
    default = client.embeddings.create(model="clip-tiny", input=TEXTS[0])  # the SDK asks for base64 itself
    one = np.asarray(_embed(server, texts=TEXTS[:1])["texts"], np.float32)  # the same batch as /embed's
    np.testing.assert_array_equal(np.asarray([default.data[0].embedding], np.float32), one)

    images = [encode_image(make_image(i)) for i in range(2)]
    uris = [f"data:image/jpeg;base64,{b}" for b in images]
    got = client.embeddings.create(model="clip-tiny", input=uris, encoding_format="float",
                                   extra_body={"modality": "image"})
    np.testing.assert_allclose([d.embedding for d in got.data], _embed(server, images=images)["images"], atol=1e-7)


async def test_async_sdk_and_errors_in_openai_shape(server) -> None:
    client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused")
    got = await client.embeddings.create(model="clip-tiny", input=["x", "y"], encoding_format="float")
    assert len(got.data) == 2 and len(got.data[0].embedding) == 64
    with pytest.raises(openai.BadRequestError) as err:
        await client.embeddings.create(model="clip-tiny", input="x", dimensions=7)
    assert err.value.body["param"] == "dimensions" and "64" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError) as err:
        await client.embeddings.create(model="gpt-4", input="x")
    assert err.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as err:
        await client.embeddings.create(model="clip-tiny", input=["ok", "%%%"], extra_body={"modality": "image"})
    assert err.value.body["param"] == "input[0]" and err.value.body["code"]
    r = httpx.post(f"{server}/v1/embeddings", json={"model": "clip-tiny", "input": []}, timeout=10)
    assert r.status_code == 422 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert set(httpx.post(f"{server}/embed", json={"texts": 3}, timeout=10).json()["error"]) == {
        "type", "message", "field"}  # the native routes keep their own shape
