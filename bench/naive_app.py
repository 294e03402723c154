"""The baseline a user would otherwise write: one encode call per request, no batching.

Modelled on clip-retrieval's back end and immich's ML service: a FastAPI app whose
route decodes, preprocesses and encodes each request on its own (a sync route, so it
runs in Starlette's thread pool). Same model and preprocessing as clipsearch.

    uvicorn bench.naive_app:app --port 8001   (CLIPSEARCH_MODEL / CLIPSEARCH_PRETRAINED choose the model)
"""

from __future__ import annotations

import base64
import io
import os

import torch
from fastapi import FastAPI
from PIL import Image
from pydantic import BaseModel

from service.model import load_model

model = load_model(os.environ.get("CLIPSEARCH_MODEL", "clipsearch-tiny"), os.environ.get("CLIPSEARCH_PRETRAINED"),
                   os.environ.get("CLIPSEARCH_DEVICE", "auto"))
app = FastAPI()


class Req(BaseModel):
    texts: list[str] = []
    images: list[str] = []


@app.post("/embed")
def embed(req: Req) -> dict:
    out: dict = {"texts": [], "images": []}
    if req.texts:
        out["texts"] = model.encode_tokens(model.tokenize(req.texts)).tolist()
    if req.images:
        pixels = torch.stack([model.preprocess(Image.open(io.BytesIO(base64.b64decode(s)))) for s in req.images])
        out["images"] = model.encode_pixels(pixels).tolist()
    return out


@app.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}
