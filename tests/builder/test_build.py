"""The build job end to end: formats, bad records, resume, auto index, publish and hot reload."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import clipsearch.builder.writer as writer_mod
from clipsearch.builder.build import BuildError, BuildOptions, run_build
from clipsearch.builder.indexing import build_and_tune, plan_index
from clipsearch.index.format import (
    ModelRef,
    current_version_dir,
    list_versions,
    read_items,
    read_manifest,
)
from clipsearch.model.clip import ClipModel
from tests.conftest import encode_image, make_image
from tests.tiny import write_index_from_vectors

ROOT = Path(__file__).resolve().parents[2]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]


def write_corpus(path: Path, n: int, *, bad: bool = False) -> list[tuple[str, str]]:
    rows = [(f"a {COLOURS[i % 6]} thing number {i}", encode_image(make_image(500 + i), urlsafe=i % 2 == 0))
            for i in range(n)]
    with open(path, "w") as f:
        for text, img in rows:
            f.write(f"{text}\t{img}\n")
        if bad:
            f.write("no tab on this line\n")
            f.write("broken base64\t%%%%\n")
            f.write(f"truncated image\t{base64.b64encode(base64.b64decode(rows[1][1])[:300]).decode()}\n")
            f.write(f"\t{rows[1][1]}\n")
    return rows


def opts(tmp_path: Path, inputs: list[Path], model: ClipModel, **kw) -> BuildOptions:
    return BuildOptions(inputs=inputs, output=tmp_path / "index", model=model.info.spec, device="cpu",
                        progress=False, hash_inputs=True, **kw)


def load_vectors(version_dir: Path, modality: str) -> tuple[np.ndarray, list[dict]]:
    import faiss

    index = faiss.read_index(str(version_dir / f"{modality}.faiss"))
    return index.reconstruct_n(0, index.ntotal), read_items(version_dir / f"{modality}.items.arrow", index.ntotal)


def test_flat_build_served_equals_brute_force_over_open_clip(tmp_path, tiny_model, tiny_spec, make_client) -> None:
    """Done-when: TSV built with --index-type flat and served == brute force over open_clip's embeddings."""
    corpus = tmp_path / "corpus.tsv"
    rows = write_corpus(corpus, 60)
    summary = run_build(opts(tmp_path, [corpus], tiny_model, index_type="flat"), model=tiny_model)
    assert summary.encoded == {"image": 60, "text": 60} and summary.skipped == 0

    model, _, preprocess = open_clip.create_model_and_transforms(tiny_spec)
    tokenizer = open_clip.get_tokenizer(tiny_spec)
    model.eval()
    with torch.no_grad():
        imgs = torch.stack([preprocess(Image.open(io.BytesIO(base64.urlsafe_b64decode(b + "=" * (-len(b) % 4)))))
                            for _, b in rows])
        img_ref = model.encode_image(imgs)
        txt_ref = model.encode_text(tokenizer([t for t, _ in rows]))
    img_ref = (img_ref / img_ref.norm(dim=-1, keepdim=True)).numpy()
    txt_ref = (txt_ref / txt_ref.norm(dim=-1, keepdim=True)).numpy()

    async def check() -> None:
        async with make_client(tiny_model, index_dir=tmp_path / "index") as client:
            for q in ["a red thing", "number 7", "purple"]:
                with torch.no_grad():
                    qv = model.encode_text(tokenizer([q]))
                qv = (qv / qv.norm(dim=-1, keepdim=True)).numpy()[0]
                r = (await client.post("/search/text", json={"text": q, "k": 10})).json()["results"]
                expected = np.argsort(-(img_ref @ qv), kind="stable")[:10]
                assert [h["id"] for h in r] == [str(i + 1) for i in expected]  # ids are TSV line numbers
                assert r[0]["text"] == rows[expected[0]][0]  # image hits carry their caption
            for i in (0, 13, 42):
                r = (await client.post("/search/image", json={"image": rows[i][1], "k": 10})).json()["results"]
                expected = np.argsort(-(txt_ref @ img_ref[i]), kind="stable")[:10]
                assert [h["id"] for h in r] == [str(j + 1) for j in expected]
                assert [h["text"] for h in r] == [rows[j][0] for j in expected]

    asyncio.run(check())


def test_bad_lines_are_skipped_and_counted(tmp_path, tiny_model) -> None:
    corpus = tmp_path / "c.tsv"
    write_corpus(corpus, 10, bad=True)
    s = run_build(opts(tmp_path, [corpus], tiny_model), model=tiny_model)
    assert s.records == 14
    assert s.encoded == {"image": 11, "text": 12}  # bad images keep their texts; the empty text keeps its image
    assert s.skipped == 4
    reasons = " | ".join(s.skip_reasons)
    assert "columns" in reasons and "base64" in reasons and "truncated" in reasons and "empty text" in reasons
    manifest = read_manifest(current_version_dir(tmp_path / "index"))
    assert manifest.build["skipped"] == 4 and manifest.build["errors_sample"][0]["source"].startswith("c.tsv:")
    with pytest.raises(BuildError, match="max-errors"):
        run_build(opts(tmp_path, [corpus], tiny_model, max_errors=3), model=tiny_model)


def test_mostly_bad_input_publishes_nothing(tmp_path, tiny_model) -> None:
    """An input whose records are mostly bad (here every image; texts alone would still
    index) is refused with a reason, and no version is published for a service to switch to."""
    corpus = tmp_path / "c.tsv"
    corpus.write_text("".join(f"caption {i}\t%%not base64%%\n" for i in range(6)) + "no tab\n")
    with pytest.raises(BuildError, match=r"7 of 7 records were bad.*nothing was published; first: c.tsv:"):
        run_build(opts(tmp_path, [corpus], tiny_model), model=tiny_model)
    assert current_version_dir(tmp_path / "index") is None
    s = run_build(opts(tmp_path, [corpus], tiny_model, max_error_fraction=1.0), model=tiny_model)
    assert s.encoded == {"image": 0, "text": 6}


@pytest.mark.parametrize("processes", [1, 2])  # 2: a span per input, read by the encoder processes
def test_all_input_formats(tmp_path, tiny_model, processes: int) -> None:
    d = tmp_path / "imgs" / "sub"
    d.mkdir(parents=True)
    for i in range(3):
        make_image(i).save(d / f"{i}.png")
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"not a jpeg")
    make_image(9).save(tmp_path / "p.jpg")
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in [
        {"id": "j1", "image": "p.jpg", "text": "from jsonl", "metadata": {"source": "web"}},
        {"id": "j2", "image": encode_image(make_image(8))},
        {"id": "j3", "image": "missing.jpg"},
    ]))
    texts = tmp_path / "texts.tsv"
    texts.write_text("only text one\nonly text two\n")
    s = run_build(opts(tmp_path, [tmp_path / "imgs", jsonl, texts], tiny_model, processes=processes),
                  model=tiny_model)
    assert s.encoded == {"image": 5, "text": 3} and s.skipped == 2
    version = current_version_dir(tmp_path / "index")
    _, image_items = load_vectors(version, "image")
    _, text_items = load_vectors(version, "text")
    assert [i["id"] for i in image_items] == ["sub/0.png", "sub/1.png", "sub/2.png", "j1", "j2"]
    assert image_items[3]["metadata"] == {"source": "web"} and image_items[3]["text"] == "from jsonl"
    assert [i["id"] for i in text_items] == ["j1", "texts:1", "texts:2"]
    assert any("broken.jpg" in e["source"] for e in s.errors) and any("r.jsonl:3" in e["source"] for e in s.errors)


def test_interrupted_build_resumes_to_the_same_index(tmp_path, tiny_model, monkeypatch) -> None:
    corpus = tmp_path / "c.tsv"
    write_corpus(corpus, 50)
    clean = run_build(opts(tmp_path / "clean", [corpus], tiny_model, shard_size=8, index_type="flat"),
                      model=tiny_model)

    real_write = writer_mod.write_shard
    written: list[Path] = []

    def dying_write(path, shard):
        if len(written) == 3:
            raise KeyboardInterrupt("killed midway")
        real_write(path, shard)
        written.append(path)

    monkeypatch.setattr(writer_mod, "write_shard", dying_write)
    o = opts(tmp_path / "resumed", [corpus], tiny_model, shard_size=8, index_type="flat")
    with pytest.raises(KeyboardInterrupt):
        run_build(o, model=tiny_model)
    assert current_version_dir(o.output) is None  # nothing half-published
    monkeypatch.setattr(writer_mod, "write_shard", real_write)
    resumed = run_build(o, model=tiny_model)
    assert resumed.resumed_shards == 3 and resumed.extra["encoded_this_run"] == 2 * (50 - 24)
    for modality in ("image", "text"):
        a, ai = load_vectors(clean.version_dir, modality)
        b, bi = load_vectors(resumed.version_dir, modality)
        assert ai == bi
        np.testing.assert_array_equal(a, b)
    thumbs = (clean.version_dir / "image.thumbs").read_bytes()  # thumbnails come back from the shards too
    assert thumbs == (resumed.version_dir / "image.thumbs").read_bytes() and len(thumbs) > 50 * 100
    assert list((o.output / ".work").iterdir()) == []  # the work area is gone after publishing


def test_changed_input_does_not_resume_stale_shards(tmp_path, tiny_model, monkeypatch) -> None:
    corpus = tmp_path / "c.tsv"
    write_corpus(corpus, 20)
    o = opts(tmp_path, [corpus], tiny_model, shard_size=8)
    real_write = writer_mod.write_shard

    def dying_write(path, shard):
        if path.name == "shard-000001.npz":
            raise KeyboardInterrupt("killed")
        real_write(path, shard)

    monkeypatch.setattr(writer_mod, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run_build(o, model=tiny_model)
    monkeypatch.undo()
    write_corpus(corpus, 12)  # the input changed: a fresh job, the stale shard is not reused
    s = run_build(o, model=tiny_model)
    assert s.resumed_shards == 0 and s.encoded["image"] == 12


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((200, d))
    x = centres[rng.integers(0, 200, n)] + 0.35 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("index_type", ["auto", "ivf", "ivfpq"])
def test_approximate_index_reaches_recall_target(index_type: str) -> None:
    vecs = clustered(30_000 if index_type != "ivfpq" else 6_000, 64, seed=1)  # PQ training is slow on 2 cores
    queries = clustered(1000, 64, seed=2)
    built = build_and_tune(vecs, queries, index_type=index_type, memory_budget=4 << 30, recall_target=0.95)
    if index_type == "auto":
        assert built.plan.index_type == "hnsw"
    target = 0.95 if index_type != "ivfpq" else 0.5  # PQ caps recall; tuning still reports it honestly
    assert built.recall_at_10 is not None and built.recall_at_10 >= target, built
    # Independent check on fresh queries with the tuned per-call parameter.
    import faiss

    fresh = clustered(300, 64, seed=3)
    exact = faiss.IndexFlatIP(64)
    exact.add(vecs)
    _, truth = exact.search(fresh, 10)
    key, value = next(iter(built.search_params.items()))
    params = (faiss.SearchParametersHNSW(efSearch=value) if key == "efSearch"
              else faiss.SearchParametersIVF(nprobe=value))
    _, got = built.index.search(fresh, 10, params=params)
    recall = np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth, strict=True)])
    assert recall >= target - 0.03


def test_plan_index_by_size_and_memory() -> None:
    assert plan_index(5_000, 512).index_type == "flat"
    assert plan_index(1_000_000, 512, memory_budget=8 << 30).index_type == "hnsw"
    assert plan_index(10_000_000, 512, memory_budget=32 << 30).index_type == "ivf"
    small = plan_index(10_000_000, 512, memory_budget=2 << 30)
    assert small.index_type == "ivfpq" and small.factory.endswith("x8")


def test_keep_prunes_old_versions(tmp_path, tiny_model) -> None:
    corpus = tmp_path / "c.tsv"
    write_corpus(corpus, 5)
    for _ in range(3):
        run_build(opts(tmp_path, [corpus], tiny_model, keep=2), model=tiny_model)
    assert len(list_versions(tmp_path / "index")) == 2


@pytest.mark.slow
def test_cli_build_and_info(tmp_path, tiny_spec) -> None:
    corpus = tmp_path / "c.tsv"
    write_corpus(corpus, 12, bad=True)
    out = tmp_path / "idx"
    r = subprocess.run([sys.executable, "-m", "clipsearch", "index", "build", "-i", str(corpus), "-o", str(out),
                        "--model", tiny_spec, "--device", "cpu", "--index-type", "flat", "--no-progress"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "skipped: 4" in r.stdout and "image index: 13 vectors" in r.stdout
    info = subprocess.run([sys.executable, "-m", "clipsearch", "index", "info", str(out)], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    manifest = json.loads(info.stdout)
    assert manifest["indexes"]["image"]["count"] == 13 and manifest["build"]["skipped"] == 4
    bad = subprocess.run([sys.executable, "-m", "clipsearch", "index", "build", "-i", str(tmp_path / "nope.tsv"),
                          "-o", str(out), "--model", tiny_spec], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert bad.returncode == 1 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


async def test_reload_during_searches_fails_nothing(tmp_path, tiny_model, make_client) -> None:
    """Done-when: rebuilding into DIR while clients search swaps with zero failed requests; a build
    with another model is refused while the old index keeps serving."""
    ref = ModelRef(spec=tiny_model.info.spec, fingerprint=tiny_model.info.fingerprint)
    root = tmp_path / "index"
    vecs_a = tiny_model.encode_texts([f"old {i}" for i in range(200)])
    write_index_from_vectors(root, model=ref, image=(vecs_a, [{"id": f"old-{i}"} for i in range(200)]), keep=2)
    async with make_client(tiny_model, index_dir=root, index_poll_s=0.05, admin_token="s3cret") as client:
        first = (await client.get("/readyz")).json()["index_version"]
        statuses: list[int] = []
        ids: list[str] = []
        stop = asyncio.Event()

        async def searcher() -> None:
            while not stop.is_set():
                r = await client.post("/search/text", json={"text": "old 3", "k": 5})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    ids.append(r.json()["results"][0]["id"])

        tasks = [asyncio.create_task(searcher()) for _ in range(6)]
        await asyncio.sleep(0.3)
        vecs_b = tiny_model.encode_texts([f"new {i}" for i in range(300)])
        await asyncio.to_thread(write_index_from_vectors, root, model=ref,
                                image=(vecs_b, [{"id": f"new-{i}"} for i in range(300)]), keep=2)
        for _ in range(100):
            await asyncio.sleep(0.05)
            if (await client.get("/readyz")).json()["index_version"] != first:
                break
        await asyncio.sleep(0.3)
        # Another model's build: refused, the new-but-valid version keeps serving.
        served = (await client.get("/readyz")).json()["index_version"]
        other = ModelRef(spec="ViT-B-32", fingerprint="ViT-B-32:openai")
        await asyncio.to_thread(write_index_from_vectors, root, model=other,
                                image=(vecs_b, [{"id": f"x-{i}"} for i in range(300)]), keep=5)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*tasks)
        assert len(statuses) > 50 and set(statuses) == {200}, set(statuses)
        assert ids[0].startswith("old-") and ids[-1].startswith("new-")
        assert not any(i.startswith("x-") for i in ids)
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["index_version"] == served
        metrics = (await client.get("/metrics")).text
        assert "clipsearch_index_load_failures_total 1.0" in metrics
        assert f'version="{served}"' in metrics
        # An explicit reload of the refused version answers 409 and changes nothing.
        r = await client.post("/admin/reload", headers={"authorization": "Bearer s3cret"})
        assert r.status_code == 409 and r.json()["error"]["type"] == "index_refused"
        assert (await client.post("/admin/reload")).status_code == 401
        assert (await client.post("/admin/reload", headers={"authorization": "Bearer nope"})).status_code == 401
        assert (await client.get("/readyz")).json()["index_version"] == served


async def test_corrupt_new_version_is_refused(tmp_path, tiny_model, make_client) -> None:
    ref = ModelRef(spec=tiny_model.info.spec, fingerprint=tiny_model.info.fingerprint)
    root = tmp_path / "index"
    vecs = tiny_model.encode_texts(["a", "b", "c"])
    write_index_from_vectors(root, model=ref, image=(vecs, [{"id": x} for x in "abc"]), keep=5)
    async with make_client(tiny_model, index_dir=root, index_poll_s=0, admin_token="t") as client:
        served = (await client.get("/readyz")).json()["index_version"]
        new = write_index_from_vectors(root, model=ref, image=(vecs, [{"id": x} for x in "xyz"]), keep=5)
        (new / "image.faiss").write_bytes(b"\x00" * 64)
        r = await client.post("/admin/reload", headers={"authorization": "Bearer t"})
        assert r.status_code == 409 and "image.faiss" in r.json()["error"]["message"]
        hit = (await client.post("/search/text", json={"text": "a", "k": 1})).json()
        assert hit["index_version"] == served and hit["results"][0]["id"] in "abc"
        good = write_index_from_vectors(root, model=ref, image=(vecs, [{"id": x} for x in "pqr"]), keep=5)
        r = await client.post("/admin/reload", headers={"authorization": "Bearer t"})
        assert r.status_code == 200 and r.json()["reloaded"] and r.json()["index_version"] == good.name


async def test_admin_disabled_without_token(tiny_model, make_client) -> None:
    async with make_client(tiny_model) as client:
        r = await client.post("/admin/reload", headers={"authorization": "Bearer x"})
        assert r.status_code == 403 and "CLIPSEARCH_ADMIN_TOKEN" in r.json()["error"]["message"]


def test_decode_in_worker_processes_gives_the_same_index(tmp_path, tiny_model) -> None:
    """--workers N decodes in spawned processes; the vectors equal the in-process path."""
    corpus = tmp_path / "c.tsv"
    write_corpus(corpus, 24, bad=True)
    inproc = run_build(opts(tmp_path / "a", [corpus], tiny_model, index_type="flat"), model=tiny_model)
    pooled = run_build(opts(tmp_path / "b", [corpus], tiny_model, index_type="flat", workers=2, shard_size=10),
                       model=tiny_model)
    assert pooled.skipped == inproc.skipped == 4
    for modality in ("image", "text"):
        a, ai = load_vectors(inproc.version_dir, modality)
        b, bi = load_vectors(pooled.version_dir, modality)
        assert ai == bi
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.slow
def test_encoder_processes_give_the_same_index_and_resume_any_gap(tmp_path, tiny_model, monkeypatch) -> None:
    """--processes 2: spawned processes each load the model and encode whole spans, each
    seeking to its own; the index equals the one-process build. A work area with a gap
    (span 0 missing, span 1 finished, as processes leave it) resumes to the same index."""
    corpus = tmp_path / "c.tsv"
    write_corpus(corpus, 30, bad=True)  # 34 lines: spans of 8, 8, 8, 8, 2
    serial = run_build(opts(tmp_path / "a", [corpus], tiny_model, index_type="flat", shard_size=8), model=tiny_model)
    parallel = run_build(opts(tmp_path / "b", [corpus], tiny_model, index_type="flat", shard_size=8, processes=2),
                         model=tiny_model)
    assert parallel.skipped == serial.skipped == 4 and parallel.records == serial.records == 34

    with pytest.raises(BuildError, match="max-errors"):  # a failure stops the processes and reaches the caller
        run_build(opts(tmp_path / "d", [corpus], tiny_model, shard_size=8, processes=2, max_errors=0),
                  model=tiny_model)

    real_write = writer_mod.write_shard

    def dying_write(path, shard):
        if path.name == "shard-000002.npz":
            raise KeyboardInterrupt("killed")
        real_write(path, shard)

    o = opts(tmp_path / "c", [corpus], tiny_model, index_type="flat", shard_size=8, processes=2)
    monkeypatch.setattr(writer_mod, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run_build(replace(o, processes=1), model=tiny_model)
    monkeypatch.undo()
    (work,) = (o.output / ".work").iterdir()
    (work / "shard-000000.npz").unlink()
    resumed = run_build(o, model=tiny_model)
    assert resumed.resumed_shards == 1 and resumed.extra["encoded_this_run"] == sum(serial.encoded.values()) - 2 * 8
    assert read_manifest(resumed.version_dir).build["processes"] == 2
    for modality in ("image", "text"):
        a, ai = load_vectors(serial.version_dir, modality)
        for other in (parallel, resumed):
            b, bi = load_vectors(other.version_dir, modality)
            assert ai == bi
            np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.gpu
def test_encoder_processes_on_the_gpu_give_the_one_process_index(tmp_path, tiny_spec) -> None:
    """On a GPU with nvJPEG per batch (the setting the processes are for): 2 processes, each
    with its own CUDA context and model copy, give the one-process GPU index, and it stays
    within the torch path's tolerance of the exact CPU build."""
    from clipsearch.model.clip import load_model

    corpus = tmp_path / "c.tsv"
    write_corpus(corpus, 40, bad=True)
    gpu = load_model(tiny_spec, None, "cuda", "fp32")  # fp32: the comparison with the CPU build is about decoding
    cpu = load_model(tiny_spec, None, "cpu")
    common = {"index_type": "flat", "shard_size": 8, "image_decode": "torch"}
    one = run_build(replace(opts(tmp_path / "a", [corpus], gpu, **common), device="cuda", dtype="fp32"), model=gpu)
    two = run_build(replace(opts(tmp_path / "b", [corpus], gpu, processes=2, **common), device="cuda", dtype="fp32"),
                    model=gpu)
    exact = run_build(opts(tmp_path / "c", [corpus], cpu, index_type="flat"), model=cpu)
    assert one.skipped == two.skipped == exact.skipped == 4
    assert read_manifest(two.version_dir).build["jpegs_per_batch"] is True
    for modality in ("image", "text"):
        a, ai = load_vectors(one.version_dir, modality)
        b, bi = load_vectors(two.version_dir, modality)
        c, ci = load_vectors(exact.version_dir, modality)
        assert ai == bi == ci
        np.testing.assert_allclose(a, b, atol=1e-5)
        assert (a * c).sum(1).min() >= 0.999


@pytest.mark.parametrize(("decode", "workers"), [("draft", 0), ("torch", 2)])
def test_fast_image_decode_builds_a_faithful_index(tmp_path, tiny_model, decode: str, workers: int) -> None:
    """`--image-decode draft|torch` decodes as the service does with that setting (in worker
    processes too); its vectors stay within the faster paths' tolerance of the exact build
    and the manifest says how the images were decoded."""
    corpus = tmp_path / "c.tsv"
    rows = [(f"a {COLOURS[i % 6]} photo {i}", encode_image(make_image(700 + i, (400 + 40 * i, 300)), urlsafe=True))
            for i in range(6)]
    corpus.write_text("".join(f"{t}\t{img}\n" for t, img in rows) + "broken base64\t%%%%\n")
    exact = run_build(opts(tmp_path / "a", [corpus], tiny_model, index_type="flat"), model=tiny_model)
    fast = run_build(opts(tmp_path / "b", [corpus], tiny_model, index_type="flat", image_decode=decode,
                          workers=workers), model=tiny_model)
    assert fast.skipped == exact.skipped == 1
    a, ai = load_vectors(exact.version_dir, "image")
    b, bi = load_vectors(fast.version_dir, "image")
    assert ai == bi
    cos = (a * b).sum(1)
    assert cos.min() >= 0.999, cos
    assert not np.array_equal(a, b)  # the faster path really ran
    assert read_manifest(fast.version_dir).build["image_decode"] == decode
    with pytest.raises(ValueError, match="exact, draft or torch"):
        run_build(opts(tmp_path / "c", [corpus], tiny_model, image_decode="fast"), model=tiny_model)


def test_jpegs_decoded_a_batch_at_a_time_on_the_device_give_the_same_index(tmp_path, tiny_model,
                                                                         monkeypatch) -> None:
    """With the torch path on a GPU the decoder takes JPEGs a batch at a time: workers only
    check them and each model batch decodes in one call on the model's device. Here that
    decoder runs on the CPU; the index equals the one decoded image by image in the workers,
    and a JPEG whose header passes but whose data does not is skipped with the same reason."""
    import dataclasses

    from clipsearch.images.decoder import ImageDecoder

    corpus = tmp_path / "c.tsv"
    rows = [(f"a {COLOURS[i % 6]} photo {i}", encode_image(make_image(800 + i, (300 + 30 * i, 200)), urlsafe=True))
            for i in range(7)]
    rows.insert(3, ("a png", encode_image(make_image(9, (120, 90)), "PNG")))
    whole = base64.b64decode(encode_image(make_image(5, (300, 200))))
    truncated = base64.b64encode(whole[: len(whole) // 2]).decode()  # the header passes; the data does not
    corpus.write_text("".join(f"{t}\t{img}\n" for t, img in rows) + f"cut short\t{truncated}\n")
    kw = {"index_type": "flat", "image_decode": "torch", "batch_size": 3}
    in_workers = run_build(opts(tmp_path / "a", [corpus], tiny_model, **kw), model=tiny_model)
    create = ImageDecoder.create
    monkeypatch.setattr(ImageDecoder, "create", lambda *a, **k: dataclasses.replace(create(*a, **k),
                                                                                   jpegs_per_batch=True))
    on_device = run_build(opts(tmp_path / "b", [corpus], tiny_model, workers=2, **kw), model=tiny_model)

    calls: list[int] = []
    decode_jpegs = ImageDecoder.decode_jpegs
    monkeypatch.setattr(ImageDecoder, "decode_jpegs",
                        lambda self, jpegs, device: calls.append(len(jpegs)) or decode_jpegs(self, jpegs, device))
    in_process = run_build(opts(tmp_path / "c", [corpus], tiny_model, **kw), model=tiny_model)
    # Batches of 3 records (the PNG went through PIL in its worker); the batch holding the bad
    # JPEG is retried one by one, and that one then fails in PIL, which names the reason.
    assert calls == [3, 2, 3, 1, 1, 1], calls
    a, ai = load_vectors(in_workers.version_dir, "image")
    for build in (on_device, in_process):
        b, bi = load_vectors(build.version_dir, "image")
        assert ai == bi and len(ai) == 8
        np.testing.assert_allclose(a, b, atol=1e-5)
    manifests = [read_manifest(s.version_dir).build for s in (in_workers, on_device, in_process)]
    assert [m["jpegs_per_batch"] for m in manifests] == [False, True, True]
    assert manifests[0]["errors_sample"] == manifests[1]["errors_sample"] == manifests[2]["errors_sample"]
    assert manifests[1]["skipped"] == 1


def test_exif_orientation_build_matches_the_service_with_the_same_setting(tmp_path, tiny_model) -> None:
    """`--exif-orientation`: the index holds the vectors the service computes with
    CLIPSEARCH_EXIF_ORIENTATION on; without it, the ones it computes with it off."""
    from clipsearch.service.engine import Engine
    from clipsearch.service.settings import Settings
    from tests.service.test_exif import sideways_jpeg

    image = base64.b64encode(sideways_jpeg(6)).decode()
    corpus = tmp_path / "c.tsv"
    corpus.write_text(f"a sideways photo\t{image}\n")
    for exif in (False, True):
        built = run_build(opts(tmp_path / str(exif), [corpus], tiny_model, index_type="flat", exif_orientation=exif),
                          model=tiny_model)
        vectors, _ = load_vectors(built.version_dir, "image")
        engine = Engine(tiny_model, Settings(model="x", exif_orientation=exif))
        want = tiny_model.encode_pixels(engine.prepare_images([image]))
        np.testing.assert_allclose(vectors, want, atol=1e-5)
        assert read_manifest(built.version_dir).build["exif_orientation"] is exif


def test_local_engine_needs_no_ray(tmp_path: Path, tiny_spec: str) -> None:
    """With Ray not importable, the local engine builds and --engine ray says how to get Ray."""
    write_corpus(tmp_path / "c.tsv", 12)
    script = f"""
import sys
class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("no ray here")
sys.meta_path.insert(0, NoRay())
from pathlib import Path
from clipsearch.builder.build import BuildError, BuildOptions, run_build
opts = BuildOptions(inputs=[Path({str(tmp_path / "c.tsv")!r})], output=Path({str(tmp_path / "idx")!r}),
                    model={tiny_spec!r}, device="cpu", progress=False, workers=0)
print(run_build(opts).encoded)
try:
    run_build(BuildOptions(**{{**opts.__dict__, "output": Path({str(tmp_path / "idx2")!r}), "engine": "ray"}}))
except BuildError as exc:
    print("refused:", exc)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "{'image': 12, 'text': 12}" in r.stdout
    assert "refused: --engine ray needs Ray: pip install 'clipsearch[ray]'" in r.stdout
