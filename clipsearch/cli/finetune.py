"""CLI commands of the fine-tuning side: train, evaluate, predict, classify, similarity,
data synth, and the offline demo."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

data_app = typer.Typer(name="data", help="Synthetic data for trying things offline.", no_args_is_help=True,
                       rich_markup_mode=None,
                       add_completion=False, pretty_exceptions_enable=False)

Model = Annotated[str, typer.Option(help="model spec: an open_clip name, hf-hub:org/repo, local-dir:/path, or a"
                                         " transformers CLIP, Chinese-CLIP or SigLIP: hf:org/repo or hf:/path")]
Pretrained = Annotated[str | None, typer.Option(help="pretrained tag, checkpoint path, or none")]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda")]


def _logging(quiet: bool = False) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("clipsearch",):
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.INFO)


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(message, err=True)
    return typer.Exit(code)


def launch_torchrun(nproc: int, flag: str) -> None:
    """Rerun this very command line in `nproc` processes under torchrun (one machine, a local
    rendezvous), without `flag`, and exit with its status; inside torchrun, do nothing."""
    import os
    import subprocess
    import sys

    if "WORLD_SIZE" in os.environ:
        return
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and nproc > gpus:
        raise _fail(f"clipsearch: {flag} {nproc}: this machine has {gpus} GPUs")
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            argv.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "clipsearch", *argv]
    raise typer.Exit(subprocess.call(cmd))


def _load(model: str, pretrained: str | None, device: str):
    from clipsearch.core.errors import ModelLoadError
    from clipsearch.model.load import load_model

    try:
        return load_model(model, pretrained, device)
    except ModelLoadError as exc:
        raise _fail(f"clipsearch: {exc.message}", 2) from None


def train(
    train: Annotated[Path, typer.Option("--train", help="training TSV: text<TAB>base64image (or id,text,image)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="output dir: best/, checkpoints/, metrics.jsonl")],
    valid: Annotated[Path | None, typer.Option("--valid", help="validation TSV, scored by mean recall")] = None,
    model: Model = "clipsearch-tiny",
    pretrained: Pretrained = None,
    device: Device = "auto",
    epochs: Annotated[int, typer.Option(min=1)] = 10,
    batch_size: Annotated[int, typer.Option(min=1, help="rows per process and step; the global batch, over which "
                                                       "the loss is computed, is this times the processes")] = 64,
    lr: Annotated[float, typer.Option(min=0.0)] = 5e-4,
    weight_decay: Annotated[float, typer.Option(min=0.0, help="not applied to gains, biases, embeddings")] = 0.1,
    warmup_steps: Annotated[int, typer.Option(min=0)] = 50,
    accum_steps: Annotated[int, typer.Option(min=1, help="gradient accumulation micro-batches")] = 1,
    freeze_vision: Annotated[bool, typer.Option(help="train the text side only (EasyNLP fix_vision)")] = False,
    augment: Annotated[bool, typer.Option(help="open_clip's training augmentation instead of the val transform")]
    = False,
    seed: int = 42,
    logging_steps: Annotated[int, typer.Option(min=1)] = 20,
    save_steps: Annotated[int, typer.Option(min=0, help="checkpoint every N steps (0: every epoch)")] = 0,
    save_all_checkpoints: Annotated[bool, typer.Option(help="keep every checkpoint, not only the latest")] = False,
    resume: Annotated[str | None, typer.Option(help="checkpoint path, or auto (newest in OUTPUT/checkpoints)")]
    = None,
    workers: Annotated[int, typer.Option(min=0, help="DataLoader worker processes")] = 0,
    input_schema: Annotated[str | None, typer.Option(help="TSV columns, e.g. id,text,image")] = None,
    amp: Annotated[bool, typer.Option(help="mixed precision on the GPU")] = True,
    progress: bool = True,
    nproc_per_node: Annotated[int, typer.Option(
        min=1, help="train in N processes on this machine (one per GPU; gloo processes on CPUs) by starting this "
                    "command under torchrun; for several machines run torchrun yourself (docs/fine-tuning.md)")] = 1,
) -> None:
    """Fine-tune (or train from scratch) on TSV pairs; the best model goes to OUTPUT/best as a
    local-dir: checkpoint that serve, index build and evaluate load directly. Under torchrun
    (or with --nproc-per-node) it trains data-parallel: features are gathered across
    processes so the loss is the global batch's, and rank 0 alone writes."""
    if nproc_per_node > 1:
        launch_torchrun(nproc_per_node, "--nproc-per-node")
    from clipsearch.core.errors import ModelLoadError
    from clipsearch.finetune.distributed import world_from_env
    from clipsearch.finetune.train import TrainOptions
    from clipsearch.finetune.train import train as run_train
    from clipsearch.inputs.readers import InputError

    _logging()
    opts = TrainOptions(train=train, valid=valid, output=output, model=model, pretrained=pretrained, device=device,
                        epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                        warmup_steps=warmup_steps, accum_steps=accum_steps, freeze_vision=freeze_vision,
                        augment=augment, seed=seed, logging_steps=logging_steps, save_steps=save_steps,
                        save_all_checkpoints=save_all_checkpoints, resume=resume, workers=workers,
                        schema=input_schema, amp=amp, progress=progress)
    try:
        result = run_train(opts)
    except (InputError, ModelLoadError, FileNotFoundError) as exc:
        raise _fail(f"clipsearch train: {getattr(exc, 'message', exc)}") from None
    if world_from_env().main:
        typer.echo(json.dumps(result, indent=2))


def evaluate(
    data: Annotated[Path | None, typer.Option("--data", help="TSV of text<TAB>base64image pairs")] = None,
    model: Model = "clipsearch-tiny",
    pretrained: Pretrained = None,
    device: Device = "auto",
    input_schema: Annotated[str | None, typer.Option(help="TSV columns, e.g. id,text,image")] = None,
    karpathy: Annotated[Path | None, typer.Option(
        help="a Karpathy split JSON (dataset_flickr30k.json, dataset_coco.json); images from --images DIR")] = None,
    split: Annotated[str, typer.Option(help="the Karpathy split to score")] = "test",
    texts: Annotated[Path | None, typer.Option(
        help="Chinese-CLIP/MUGE texts JSONL (text_id, text, image_ids); images from --images TSV (id<TAB>base64)")]
    = None,
    images: Annotated[Path | None, typer.Option(help="with --karpathy: the image folder; with --texts: the "
                                                     "images TSV")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="one JSON object on stdout")] = False,
) -> None:
    """R@1/5/10 text->image and image->text, and their mean, on a TSV of pairs (--data), a
    Karpathy split (--karpathy, --images DIR) or Chinese-CLIP/MUGE's files (--texts, --images
    TSV). Duplicate images or texts across rows are scored once, and any of their true
    partners counts: an image is found when any of its captions ranks within k."""
    from clipsearch.finetune.evaluate import evaluate as run_eval
    from clipsearch.finetune.evaluate import evaluate_set
    from clipsearch.inputs.pairs import PairFile
    from clipsearch.inputs.readers import InputError
    from clipsearch.inputs.retrieval import read_karpathy, read_muge

    _logging(quiet=True)
    given = [name for name, value in (("--data", data), ("--karpathy", karpathy), ("--texts", texts)) if value]
    if len(given) != 1:
        raise _fail("clipsearch evaluate: give one of --data, --karpathy (with --images) and --texts (with --images)")
    if (karpathy or texts) and images is None:
        raise _fail(f"clipsearch evaluate: {given[0]} needs --images")
    try:
        if data is not None:
            res = run_eval(_load(model, pretrained, device), PairFile(data, input_schema))
        else:
            dataset = read_karpathy(karpathy, images, split) if karpathy else read_muge(texts, images)  # type: ignore[arg-type]
            res = evaluate_set(_load(model, pretrained, device), dataset)
    except InputError as exc:
        raise _fail(f"clipsearch evaluate: {exc}") from None
    if json_out:
        typer.echo(json.dumps({"t2i": res["t2i"], "i2t": res["i2t"], "mean_recall": res["mean_recall"]}))
        return
    counts = res["counts"]
    rows = f"{counts['rows']} rows" if "rows" in counts else f"{counts['pairs']} pairs"
    typer.echo(f"{rows}, {counts['images']} images, {counts['texts']} texts")
    for way in ("t2i", "i2t"):
        typer.echo(f"{way}: " + "  ".join(f"R@{k[1:]} {v:.2f}" for k, v in res[way].items()))
    typer.echo(f"mean recall: {res['mean_recall']:.2f}")


def evaluate_zeroshot(
    images: Annotated[Path, typer.Option(help="a folder with one subfolder of images per class, or a TSV of "
                                              "label<TAB>base64image")],
    model: Model = "clipsearch-tiny",
    pretrained: Pretrained = None,
    device: Device = "auto",
    templates: Annotated[str, typer.Option(
        help="one template ('a photo of a {c}.'), a file of them (JSON list or one per line), or a dataset whose "
             "CLIP-paper templates clip_benchmark ships: cifar10, cifar100, food101, pets, eurosat, imagenet1k, ...")]
    = "a photo of a {c}.",
    lang: Annotated[str, typer.Option(help="the language of clip_benchmark's template sets: en, cn, jp, it, ar")]
    = "en",
    classnames: Annotated[Path | None, typer.Option(
        help="class names, one per line, in the folders' sorted order (default: the folder names)")] = None,
    report: Annotated[Path | None, typer.Option(help="write the JSON report here too")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="the JSON report on stdout")] = False,
) -> None:
    """Zero-shot classification accuracy as the CLIP paper measures it: each class's prompts (its
    name in every template) embedded and averaged into one vector; top-1 and top-5 accuracy,
    mean per-class recall and each class's recall."""
    from clipsearch.core.fsutil import atomic_write_bytes
    from clipsearch.finetune.zeroshot_eval import evaluate_zeroshot as run
    from clipsearch.finetune.zeroshot_eval import load_templates
    from clipsearch.inputs.labelled import read_labelled
    from clipsearch.inputs.readers import InputError

    _logging(quiet=True)
    try:
        chosen = load_templates(templates, lang)
        res = run(_load(model, pretrained, device), read_labelled(images, classnames), chosen)
    except InputError as exc:
        raise _fail(f"clipsearch evaluate-zeroshot: {exc}") from None
    text = json.dumps(res, ensure_ascii=False, indent=2)
    if report is not None:
        atomic_write_bytes(report, (text + "\n").encode())
    if json_out:
        typer.echo(text)
        return
    typer.echo("| class | images | top-1 recall |\n|---|---:|---:|")
    for row in res["per_class"]:
        recall = "" if row["recall"] is None else f"{row['recall']:.1f}"
        typer.echo(f"| {row['class']} | {row['images']} | {recall} |")
    typer.echo(f"{res['images']} images, {res['classes']} classes, {res['templates']} templates: top-1 "
               f"{res['top1']:.2f}  top-5 {res['top5']:.2f}  mean per-class recall {res['mean_per_class_recall']:.2f}")


def predict(
    input: Annotated[Path, typer.Option("--input", "-i", help="TSV: texts, images, or pairs (id column kept)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="feature TSV: id, text_feature, image_feature")],
    model: Model = "clipsearch-tiny",
    pretrained: Pretrained = None,
    device: Device = "auto",
    modality: Annotated[str, typer.Option(help="auto | text | image | both")] = "auto",
    input_schema: Annotated[str | None, typer.Option(help="TSV columns, e.g. id,text,image")] = None,
) -> None:
    """Write L2-normalized features (the same vectors /embed returns) as comma-joined floats,
    one row per input row. Load them back with clipsearch.finetune.predict.load_features or pandas."""
    from clipsearch.finetune.predict import predict as run_predict
    from clipsearch.inputs.readers import InputError

    _logging(quiet=True)
    try:
        summary = run_predict(_load(model, pretrained, device), input, output, modality, input_schema)
    except (InputError, ValueError) as exc:
        raise _fail(f"clipsearch predict: {exc}") from None
    typer.echo(f"wrote {summary.rows} rows ({', '.join(summary.columns)}) to {output}; {len(summary.bad)} bad items")
    for source, reason in summary.bad[:10]:
        typer.echo(f"  {source}: {reason}", err=True)


def _read_images(command: str, paths: list[Path]) -> list[Any]:
    """Image files decoded as the service would, or a one-line error naming the bad file."""
    import base64

    from clipsearch.core.errors import ClipsearchError
    from clipsearch.inputs.pairs import decode_offline_image

    images = []
    for path in paths:
        try:
            images.append(decode_offline_image(base64.b64encode(path.read_bytes()).decode(), field=str(path)))
        except OSError as exc:
            raise _fail(f"clipsearch {command}: {path}: {exc.strerror or exc}") from None
        except ClipsearchError as exc:
            raise _fail(f"clipsearch {command}: {exc.message}") from None
    return images


def classify(
    image: Annotated[Path, typer.Option(help="image file")],
    labels: Annotated[str, typer.Option(help="comma-separated labels")],
    template: Annotated[str, typer.Option(help="prompt template, {} is the label")] = "a photo of a {}",
    model: Model = "clipsearch-tiny",
    pretrained: Pretrained = None,
    device: Device = "auto",
) -> None:
    """Zero-shot classification of one image (the offline twin of POST /classify)."""
    from clipsearch.model import zeroshot

    names = [x.strip() for x in labels.split(",") if x.strip()]
    if not names:
        raise _fail("clipsearch classify: --labels: give at least one label")
    pil = _read_images("classify", [image])[0]
    clip = _load(model, pretrained, device)
    result = zeroshot.classify(clip.encode_images([pil])[0], clip.encode_texts(zeroshot.prompts(names, template)),
                               names, clip.logit_scale, clip.logit_bias)
    typer.echo(json.dumps({"labels": result}, indent=2, ensure_ascii=False))


def similarity(
    texts: Annotated[list[str], typer.Option("--text", help="a text; repeatable")],
    images: Annotated[list[Path], typer.Option("--image", help="an image file; repeatable")],
    model: Model = "clipsearch-tiny",
    pretrained: Pretrained = None,
    device: Device = "auto",
) -> None:
    """Cosine matrix (images x texts) and per-image softmax probabilities (the twin of POST /similarity)."""
    from clipsearch.model import zeroshot

    pils = _read_images("similarity", images)
    clip = _load(model, pretrained, device)
    cos, probs = zeroshot.similarity(clip.encode_images(pils), clip.encode_texts(texts), clip.logit_scale,
                                     clip.logit_bias)
    typer.echo(json.dumps({"cosine": cos.round(6).tolist(), "probabilities": probs.round(6).tolist(),
                           "logit_scale": clip.logit_scale, "logit_bias": clip.logit_bias}, indent=2))


@data_app.command("synth")
def synth(
    n: Annotated[int, typer.Option(min=1, help="rows")],
    out: Annotated[Path, typer.Option(help="output TSV (text<TAB>urlsafe base64 JPEG)")],
    seed: int = 0,
    lang: Annotated[str, typer.Option(help="en | zh")] = "en",
    image_size: Annotated[int, typer.Option(min=16)] = 128,
) -> None:
    """Write a deterministic captioned image set (shapes, colours, sizes, positions, backgrounds,
    counts) in EasyNLP's TSV layout."""
    from clipsearch.finetune.synth import write_tsv

    if lang not in ("en", "zh"):
        raise _fail("--lang must be en or zh")
    write_tsv(out, n, seed, lang, image_size)
    typer.echo(f"wrote {n} rows to {out}")


def demo(
    workdir: Annotated[Path, typer.Option(help="where data, model and index go")] = Path("demo-output"),
    port: int = 8000,
    host: str = "127.0.0.1",
    n_train: Annotated[int, typer.Option(min=100)] = 3000,
    epochs: Annotated[int, typer.Option(min=1)] = 10,
    lang: Annotated[str, typer.Option(help="en | zh")] = "en",
    serve: Annotated[bool, typer.Option(help="start the service at the end")] = True,
    retrain: Annotated[bool, typer.Option(help="train again even if an earlier run left a model with the same "
                                                "parameters in --workdir")] = False,
) -> None:
    """The offline demo: synthesize captioned images, train a small CLIP from scratch, evaluate
    it, build the indexes and serve them (no network, no GPU, no downloads). A rerun reuses
    what an earlier run built with the same parameters; --port 0 serves on a free port."""
    from clipsearch.cli.demo import run_demo
    from clipsearch.core.errors import ClipsearchError

    _logging(quiet=True)
    try:
        run_demo(workdir=workdir, port=port, host=host, n_train=n_train, epochs=epochs, lang=lang, serve=serve,
                 retrain=retrain)
    except ClipsearchError as exc:
        raise _fail(f"clipsearch: cannot run the demo: {exc.message}", 2) from None


def register(app: typer.Typer) -> None:
    for fn in (train, evaluate, predict, classify, similarity, demo):
        app.command(help=fn.__doc__)(fn)
    app.command("evaluate-zeroshot", help=evaluate_zeroshot.__doc__)(evaluate_zeroshot)
    app.add_typer(data_app, name="data")
