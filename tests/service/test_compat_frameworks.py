"""The OpenAI-style routes driven by the real client packages at their defaults: the `openai`
SDK, LangChain's `OpenAIEmbeddings` (chunk_size 1000), LlamaIndex's `OpenAIEmbedding`
(embed_batch_size 100) and litellm (its `openai/` and `infinity/` providers), each with 300+
inputs in a call, against a live server; vectors compared with the model called directly on
the same checkpoint."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from clipsearch.service.http.app import create_app
from clipsearch.service.settings import Settings
from clipsearch.service.state import ServiceState
from tests.conftest import encode_image, live_server, make_image

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm: no fetch of its price list
NAME = "clip-tiny"
TEXTS = [f"photo {i} of a {('red', 'green', 'blue')[i % 3]} {('circle', 'square')[i % 2]}" for i in range(330)]


@pytest.fixture(scope="module")
def server(tiny_model):
    settings = Settings(model=tiny_model.info.spec, device="cpu", warmup=False, served_model_name=NAME)
    app = create_app(settings, state=ServiceState.build(settings, model=tiny_model))
    with live_server(app) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def reference(tiny_model) -> np.ndarray:
    return tiny_model.encode_tokens(tiny_model.tokenize(TEXTS))


def _close(got, want) -> None:
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2e-6)


def test_openai_sdk_takes_2048_inputs_as_openai_does(server, tiny_model, reference) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    many = (TEXTS * 7)[:2048]
    got = client.embeddings.create(model=NAME, input=many)  # the SDK's default: base64
    assert [d.index for d in got.data] == list(range(2048))
    _close([d.embedding for d in got.data[:330]], reference)
    _close([d.embedding for d in got.data[330:660]], reference)
    assert got.usage.prompt_tokens == int((tiny_model.tokenize(many) != 0).sum())
    with pytest.raises(openai.APIStatusError) as err:
        client.embeddings.create(model=NAME, input=[*many, "one more"])
    assert err.value.status_code == 413 and "2049 items" in err.value.body["message"]


def test_long_texts_are_cut_to_the_context_here_and_refused_by_embed(server, tiny_model) -> None:
    long = " ".join(f"word{i}" for i in range(3000))  # 26,000 characters; the model reads 77 tokens
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    got = client.embeddings.create(model=NAME, input=[long, "short"], encoding_format="float")
    _close([d.embedding for d in got.data], tiny_model.encode_tokens(tiny_model.tokenize([long, "short"])))
    assert got.usage.prompt_tokens == int((tiny_model.tokenize([long, "short"]) != 0).sum())
    r = httpx.post(f"{server}/embed", json={"texts": [long]}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["field"] == "texts[0]"


def test_token_ids_of_the_models_tokenizer_are_read_and_others_refused(server, tiny_model, reference) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    tokenizer = tiny_model.tokenizer
    ids = [tokenizer.encode(t) for t in TEXTS[:5]]
    got = client.embeddings.create(model=NAME, input=ids, encoding_format="float")
    _close([d.embedding for d in got.data], reference[:5])
    one = client.embeddings.create(model=NAME, input=ids[0], encoding_format="float")  # one array: one input
    _close([one.data[0].embedding], reference[:1])
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=NAME, input=[ids[0], [100_000, 5, 7]])
    assert err.value.body["param"] == "input[1]" and "check_embedding_ctx_length=False" in err.value.body["message"]


def test_langchain_at_its_defaults(server, reference, monkeypatch) -> None:
    from langchain_openai import OpenAIEmbeddings

    # tiktoken's encodings as litellm ships them (LangChain counts tokens with tiktoken): no download
    litellm_dir = Path(importlib.util.find_spec("litellm").origin).parent  # type: ignore[arg-type,union-attr]
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(litellm_dir / "litellm_core_utils" / "tokenizers"))
    texts = TEXTS + TEXTS[:20]  # 350 texts: one request at LangChain's chunk_size of 1000
    plain = OpenAIEmbeddings(model=NAME, base_url=f"{server}/v1", api_key="unused", check_embedding_ctx_length=False)
    got = plain.embed_documents(texts)
    _close(got[:330], reference)
    _close([plain.embed_query(TEXTS[7])], reference[7:8])
    default = OpenAIEmbeddings(model=NAME, base_url=f"{server}/v1", api_key="unused")  # sends tiktoken's ids
    with pytest.raises(openai.BadRequestError) as err:
        default.embed_documents(texts[:3])
    assert "check_embedding_ctx_length=False" in err.value.body["message"]


def test_llama_index_at_its_default_batch_size(server, reference) -> None:
    from llama_index.embeddings.openai import OpenAIEmbedding

    embedder = OpenAIEmbedding(model_name=NAME, api_base=f"{server}/v1", api_key="unused")
    assert embedder.embed_batch_size == 100
    _close(embedder.get_text_embedding_batch(TEXTS), reference)
    _close([embedder.get_query_embedding(TEXTS[3])], reference[3:4])


def test_litellm_openai_and_infinity_providers(server, tiny_model, reference, caplog) -> None:
    import litellm

    caplog.set_level(logging.WARNING)
    got = litellm.embedding(model=f"openai/{NAME}", api_base=f"{server}/v1", api_key="unused", input=TEXTS)
    _close([d["embedding"] for d in got.data], reference)
    got = litellm.embedding(model=f"infinity/{NAME}", api_base=server, api_key="unused", input=TEXTS)
    _close([d["embedding"] for d in got.data], reference)
    documents = ["a red circle", "a blue square", "a green circle"]
    ranked = litellm.rerank(model=f"infinity/{NAME}", api_base=server, api_key="unused", query="red circle",
                            documents=documents, top_n=2, return_documents=True)
    vectors = tiny_model.encode_tokens(tiny_model.tokenize(["red circle", *documents]))
    logits = tiny_model.logit_scale * (vectors[1:] @ vectors[0])
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    order = np.argsort(-probs, kind="stable")[:2]
    assert [r["index"] for r in ranked.results] == order.tolist()
    np.testing.assert_allclose([r["relevance_score"] for r in ranked.results], probs[order], rtol=1e-5)
    assert [r["document"]["text"] for r in ranked.results] == [documents[i] for i in order]


def test_infinity_routes_images_and_rerank_of_images(server, tiny_model) -> None:
    images = [make_image(i) for i in range(3)]
    uris = [f"data:image/jpeg;base64,{encode_image(im)}" for im in images]
    r = httpx.post(f"{server}/embeddings", json={"model": NAME, "input": uris, "modality": "image"}, timeout=30)
    assert r.status_code == 200 and r.json()["id"].startswith("infinity-")
    native = httpx.post(f"{server}/embed", json={"images": [encode_image(im) for im in images]}, timeout=30).json()
    _close([d["embedding"] for d in r.json()["data"]], np.asarray(native["images"], np.float32))
    models = httpx.get(f"{server}/models", timeout=10).json()["data"]
    assert models[0]["id"] == NAME and "image_embed" in models[0]["capabilities"]
    r = httpx.post(f"{server}/rerank", json={"query": "a photo", "documents": uris, "modality": "image",
                                              "raw_scores": True}, timeout=30)
    query = tiny_model.encode_tokens(tiny_model.tokenize(["a photo"]))[0]
    cosine = np.asarray(native["images"]) @ query
    assert [x["index"] for x in r.json()["results"]] == np.argsort(-cosine, kind="stable").tolist()
    np.testing.assert_allclose([x["relevance_score"] for x in r.json()["results"]], np.sort(cosine)[::-1], atol=1e-5)
    bad = httpx.post(f"{server}/embeddings", json={"model": "gpt-4", "input": "x"}, timeout=10)
    assert bad.status_code == 404 and bad.json()["error"]["param"] == "model"


async def test_a_bad_item_deep_in_a_long_call_is_named_by_its_place(make_client, tiny_model) -> None:
    async with make_client(tiny_model, served_model_name=NAME, max_items_per_request=4, max_queue=64) as client:
        images = [f"data:image/jpeg;base64,{encode_image(make_image(i))}" for i in range(11)]
        images[9] = "data:image/jpeg;base64,AAAA"
        r = await client.post("/v1/embeddings", json={"model": NAME, "input": images, "modality": "image"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input[9]", r.text
        texts = ["x"] * 11
        r = await client.post("/v1/embeddings", json={"model": NAME, "input": texts, "encoding_format": "float"})
        assert r.status_code == 200 and len(r.json()["data"]) == 11
        r = await client.post("/embed", json={"texts": texts})  # the native route keeps its own limit
        assert r.status_code == 413
