"""The offline demo behind the README's first command."""

from __future__ import annotations

import shlex
import shutil
import time
from pathlib import Path

import typer

DEMO_MODEL = "clipsearch-demo"  # clipsearch/core/model_configs/clipsearch-demo.json
QUERIES = {"en": ["a red circle", "two blue squares", "a large yellow star on a black background"],
           "zh": ["红色圆形", "两个蓝色正方形", "黑色背景上的黄色星形"]}


def _write_query_image(tsv: Path, folder: Path) -> Path:
    """The first validation image as a file, for the curl lines to upload."""
    from clipsearch.core.images import decode_base64

    first = tsv.read_text(encoding="utf-8").split("\n", 1)[0]
    data = decode_base64(first.split("\t")[-1], field="image", max_bytes=1 << 26)
    path = folder / ("query.jpg" if data[:3] == b"\xff\xd8\xff" else "query.png")
    path.write_bytes(data)
    return path


def run_demo(*, workdir: Path, port: int, host: str, n_train: int, epochs: int, lang: str, serve: bool) -> dict:
    from clipsearch.core.model import load_model
    from finetune.data import PairFile
    from finetune.evaluate import evaluate
    from finetune.synth import write_tsv
    from finetune.train import TrainOptions, train
    from index_builder.build import BuildOptions, run_build

    t0 = time.perf_counter()
    workdir = workdir.resolve()
    data, out, index = workdir / "data", workdir / "train-output", workdir / "index"
    shutil.rmtree(out, ignore_errors=True)  # a rerun trains afresh; index versions just accumulate
    say = typer.echo
    say(f"[1/5] synthesizing {n_train} training, 300 validation and 1000 gallery images ({lang}) in {data}")
    write_tsv(data / "train.tsv", n_train, seed=1, lang=lang)
    write_tsv(data / "valid.tsv", 300, seed=2, lang=lang)
    write_tsv(data / "gallery.tsv", 1000, seed=3, lang=lang)
    say(f"[2/5] training {DEMO_MODEL} (a small ResNet + transformer CLIP) from random weights, {epochs} epochs")
    train(TrainOptions(train=data / "train.tsv", valid=data / "valid.tsv", output=out, model=DEMO_MODEL,
                       epochs=epochs, batch_size=128, lr=2e-3, warmup_steps=20, progress=True))
    best = out / "best"
    spec = f"local-dir:{best}"
    model = load_model(spec)
    say("[3/5] evaluating the best checkpoint on the held-out validation set")
    res = evaluate(model, PairFile(data / "valid.tsv"))
    chance = 100 * 5 / max(1, res["counts"]["images"])
    say("      t2i " + "  ".join(f"R@{k[1:]} {v:.1f}" for k, v in res["t2i"].items())
        + "   i2t " + "  ".join(f"R@{k[1:]} {v:.1f}" for k, v in res["i2t"].items())
        + f"   (chance R@5 = {chance:.1f})")
    say(f"[4/5] building the image and text indexes from {data / 'gallery.tsv'}")
    summary = run_build(BuildOptions(inputs=[data / "gallery.tsv"], output=index, model=spec, progress=False,
                                     index_type="flat", keep=2), model=model)
    from clipsearch.core.search import load_index_set

    served = load_index_set(summary.version_dir, fingerprint=model.info.fingerprint, dim=model.dim)
    say("      what the service will answer:")
    for q in QUERIES[lang][:2]:
        image_index = served.get("image")
        if image_index is None:
            break
        hits = image_index.search(model.encode_texts([q]), 3)[0]
        say(f"      {q!r} -> " + " | ".join(h.text or h.id for h in hits))
    elapsed = time.perf_counter() - t0
    say(f"[5/5] done in {elapsed:.0f} s. Try it:")
    base = f"http://{host}:{port}"
    q = QUERIES[lang][0]
    photo = _write_query_image(data / "valid.tsv", data)
    image, images = (shlex.quote(f"{name}=@{photo}") for name in ("image", "images"))
    say(f"""
  Open {base}/ui in a browser to search by text or by image, or:

  curl -s {base}/search/text -H 'content-type: application/json' -d '{{"text": "{q}", "k": 3}}'
  curl -s {base}/embed -F texts='{q}' -F {images}
  curl -s {base}/search/image -F {image} -F k=3
  curl -s {base}/classify -F {image} -F labels=circle -F labels=square -F labels=triangle -F labels=star
  curl -s {base}/readyz
""")
    info = {"recall": res, "build": summary.render(), "model": spec, "index": str(index), "seconds": elapsed}
    if serve:
        import uvicorn

        from service.http.app import create_app
        from service.settings import Settings
        from service.state import ServiceState

        settings = Settings(model=spec, index_dir=index, host=host, port=port, log_level="warning")
        state = ServiceState.build(settings, model=model)
        say(f"serving on {base}: the search page is {base}/ui (Ctrl-C to stop)")
        uvicorn.run(create_app(settings, state=state), host=host, port=port, log_level="warning")
    return info
