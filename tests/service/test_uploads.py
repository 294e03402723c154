"""multipart/form-data uploads: the same vectors, results, limits and errors as base64 JSON, on
every route that takes images; and the README's curl lines, run by curl against a live
server with a photo of more than 5 MB."""

from __future__ import annotations

import base64
import io
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch.index.format import ModelRef
from clipsearch.service.http.app import create_app
from clipsearch.service.settings import Settings
from clipsearch.service.state import ServiceState
from tests.conftest import image_bytes, live_server, make_image
from tests.service.test_api import index_dir, ref_image, reference  # noqa: F401  (fixtures)
from tests.tiny import write_index_from_vectors

ROOT = Path(__file__).resolve().parents[2]


def big_photo(min_bytes: int = 5_200_000) -> bytes:
    """A JPEG of noise larger than `min_bytes` (noise does not compress)."""
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (1700, 2400, 3), dtype=np.uint8)
    data = image_bytes(Image.fromarray(pixels), "JPEG", quality=97)
    assert len(data) > min_bytes, len(data)
    return data


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def test_uploads_give_the_vectors_base64_gives(make_client, tiny_model, reference) -> None:  # noqa: F811
    images = [image_bytes(make_image(i), fmt) for i, fmt in enumerate(["JPEG", "PNG", "WEBP"])]
    async with make_client(tiny_model) as client:
        want = (await client.post("/embed", json={"texts": ["a cat", "two dogs"], "images": [b64(d) for d in images]}
                                  )).json()
        r = await client.post("/embed", data={"texts": ["a cat", "two dogs"]},
                              files=[("images", (f"{i}.img", d, "image/jpeg")) for i, d in enumerate(images)])
        assert r.status_code == 200, r.text
        got = r.json()
        np.testing.assert_array_equal(got["texts"], want["texts"])
        np.testing.assert_array_equal(got["images"], want["images"])
        for i, d in enumerate(images):  # and both equal open_clip on the same bytes
            np.testing.assert_allclose(got["images"][i], ref_image(reference, d), atol=2e-5)
        # an image as a text part holds what JSON would: base64 here
        r = await client.post("/embed", files={"images": (None, b64(images[1]))})  # a part with no file name
        np.testing.assert_allclose(r.json()["images"], [want["images"][1]], atol=1e-6)  # a batch of one


async def test_uploads_on_search_classify_and_similarity(make_client, tiny_model, index_dir) -> None:  # noqa: F811
    path, _, _, _ = index_dir
    photo = image_bytes(make_image(5, (640, 480)), "JPEG")
    async with make_client(tiny_model, index_dir=path) as client:
        for url, json_body, form in [
            ("/search/image", {"image": b64(photo), "k": 7, "nprobe": None}, {"k": "7", "nprobe": ""}),
            ("/classify", {"image": b64(photo), "labels": ["cat", "dog", "car"], "template": "a {}"},
             {"labels": ["cat", "dog", "car"], "template": "a {}"}),
        ]:
            want = (await client.post(url, json=json_body)).json()
            r = await client.post(url, data=form, files={"image": ("p.jpg", photo, "image/jpeg")})
            assert r.status_code == 200 and r.json() == want, (url, r.text)
        assert len(want["labels"]) == 3
        want = (await client.post("/similarity", json={"texts": ["a", "b"], "images": [b64(photo)] * 2})).json()
        r = await client.post("/similarity", data={"texts": ["a", "b"]},
                              files=[("images", ("p.jpg", photo, "image/jpeg"))] * 2)
        assert r.json() == want and np.asarray(want["cosine"]).shape == (2, 2)


SMALL = ("a.png", image_bytes(make_image(1, (24, 24)), "PNG"), "image/png")


@pytest.mark.parametrize(("form", "files", "status", "field"), [
    ({}, [("images", ("a.jpg", b"not an image", "image/jpeg"))], 400, "images[0]"),
    ({}, [("images", SMALL), ("images", ("b", b"", "x/y"))],
     400, "images[1]"),
    ({}, [("images", SMALL), ("images", ("b", b"x" * 3000, "x/y"))],
     413, "images[1]"),
    ({"texts": "x"}, [("texts", ("t.txt", b"hello", "text/plain"))], 422, "texts[1]"),
    ({"texts": "x", "colour": "red"}, [("images", SMALL)], 422,
     "colour"),
    ({}, [("images", ("a.jpg", b"x", "image/jpeg"))] * 4, 400, None),  # more files than items allowed
])
async def test_bad_uploads_get_the_4xx_base64_would(make_client, tiny_model, form, files, status, field) -> None:
    async with make_client(tiny_model, max_image_bytes=2048, max_items_per_request=3) as client:
        r = await client.post("/embed", data=form, files=files)
        assert r.status_code == status, r.text
        assert r.json()["error"]["field"] == field, r.text
        assert (await client.get("/readyz")).status_code == 200


async def test_form_fields_are_typed_as_in_json(make_client, tiny_model, index_dir) -> None:  # noqa: F811
    path, _, _, _ = index_dir
    photo = {"image": ("p.png", image_bytes(make_image(3), "PNG"), "image/png")}
    async with make_client(tiny_model, index_dir=path, max_k=20) as client:
        for form, field in [({"k": "five"}, "k"), ({"k": "2.5"}, "k"), ({"k": "50"}, "k"), ({"k": ["1", "2"]}, "k")]:
            r = await client.post("/search/image", data=form, files=photo)
            assert r.status_code == 422 and r.json()["error"]["field"] == field, (form, r.text)
        r = await client.post("/search/image", data={"k": " 3 "}, files=photo)
        assert r.status_code == 200 and len(r.json()["results"]) == 3
        r = await client.post("/search/image", files={"k": (None, "3")})  # no image at all
        assert r.status_code == 422 and r.json()["error"]["field"] == "image"


def _readme_curl_lines() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    api = readme.split("## API", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = re.sub(r"\\\n\s*", " ", api).splitlines()
    return [c.split("  #")[0].strip() for c in commands if c.startswith("curl ")]


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_the_readmes_curl_lines_work_with_a_5_mb_photo(tiny_model, index_dir, tmp_path) -> None:  # noqa: F811
    lines = _readme_curl_lines()
    assert len(lines) >= 8 and sum("@demo-output/photo.jpg" in line for line in lines) >= 3
    (tmp_path / "demo-output").mkdir()
    (tmp_path / "demo-output/photo.jpg").write_bytes(big_photo())
    Image.open(io.BytesIO(image_bytes(make_image(4), "PNG"))).save(tmp_path / "demo-output/shape.png")
    _, img_vecs, txt_vecs, captions = index_dir
    path = tmp_path / "numbered"  # ids as the demo's index has them: line numbers
    write_index_from_vectors(path, model=ModelRef(spec=tiny_model.info.spec, fingerprint=tiny_model.info.fingerprint),
                             image=(img_vecs, [{"id": str(i + 1)} for i in range(len(img_vecs))]),
                             text=(txt_vecs, [{"id": str(i + 1), "text": c} for i, c in enumerate(captions)]))
    settings = Settings(model=tiny_model.info.spec, device="cpu", index_dir=path, warmup=False,
                        served_model_name="clipsearch-demo")
    app = create_app(settings, state=ServiceState.build(settings, model=tiny_model))
    with live_server(app) as port:
        for line in lines:
            argv = [arg.replace("localhost:8000", f"127.0.0.1:{port}") for arg in shlex.split(line)]
            r = subprocess.run([*argv, "-o", "/dev/null", "-w", "%{http_code}"], cwd=tmp_path, capture_output=True,
                               text=True, timeout=120)
            assert r.stdout == "200", (line, r.stdout, r.stderr)
