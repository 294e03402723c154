"""The baseline a user would otherwise write: one encode call per request, no batching.

Modelled on clip-retrieval's back end and immich's ML service: a FastAPI app whose
route decodes, preprocesses and encodes each request on its own (a sync route, so it
runs in Starlette's thread pool) with plain open_clip calls: open_clip's tokenizer,
`encode_text` on the full context, `torch.no_grad`. Same model and preprocessing as
clipsearch (loaded through the model seam only to share the spec handling).

    uvicorn bench.naive_app:app --port 8001   (CLIPSEARCH_MODEL / CLIPSEARCH_PRETRAINED choose the model)
"""

from __future__ import annotations

import base64
import io
import os

import torch
import torch.nn.functional as F
from fastapi import FastAPI
from PIL import Image
from pydantic import BaseModel

from clipsearch.index.format import current_version_dir
from clipsearch.index.search import load_index_set
from clipsearch.model.clip import load_model

model = load_model(os.environ.get("CLIPSEARCH_MODEL", "clipsearch-tiny"), os.environ.get("CLIPSEARCH_PRETRAINED"),
                   os.environ.get("CLIPSEARCH_DEVICE", "auto"))
_index_dir = os.environ.get("CLIPSEARCH_INDEX_DIR")
_version = current_version_dir(_index_dir) if _index_dir else None
images_index = (None if _version is None else
                load_index_set(_version, fingerprint=model.info.fingerprint, dim=model.dim).get("image"))
app = FastAPI()


class Req(BaseModel):
    texts: list[str] = []
    images: list[str] = []


@app.post("/embed")
def embed(req: Req) -> dict:
    out: dict = {"texts": [], "images": []}
    with torch.no_grad():
        if req.texts:
            tokens = model.tokenizer(req.texts).to(model.device)
            out["texts"] = F.normalize(model.model.encode_text(tokens).float(), dim=-1).cpu().tolist()
        if req.images:
            pixels = torch.stack([model.preprocess_transform(Image.open(io.BytesIO(base64.b64decode(s))))
                                  for s in req.images]).to(model.device, model.dtype)
            out["images"] = F.normalize(model.model.encode_image(pixels).float(), dim=-1).cpu().tolist()
    return out


class SearchReq(BaseModel):
    text: str
    k: int = 10


@app.post("/search/text")
def search_text(req: SearchReq) -> dict:
    assert images_index is not None, "set CLIPSEARCH_INDEX_DIR"
    with torch.no_grad():
        query = F.normalize(model.model.encode_text(model.tokenizer([req.text]).to(model.device)).float(), dim=-1)
    hits = images_index.search(query.cpu().numpy(), req.k)[0]
    return {"results": [{"id": h.id, "score": h.score, "metadata": h.metadata} for h in hits]}


@app.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}
