"""`clipsearch easynlp ...`: EasyNLP's CLIP commands as its users type them."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from clipsearch.finetune.easynlp import EasyNLPCommand

HELP = ("EasyNLP's CLIP commands, as typed (easynlp --mode train|evaluate|predict --app_name=clip --tables=... "
        "--input_schema=text:str:1,image:str:1 --first_sequence=text --second_sequence=image --checkpoint_dir=... "
        "--user_defined_parameters='pretrain_model_name_or_path=MODEL fix_vision=True mode=finetune'), run by "
        "clipsearch's train, evaluate and predict. pretrain_model_name_or_path is any model spec clipsearch loads. "
        "Flags as --flag=value or --flag value; flags that mean nothing here are accepted with a warning. "
        "docs/fine-tuning.md shows each command beside the native one. Flags: clipsearch easynlp --help.")


def easynlp(ctx: typer.Context) -> None:
    from clipsearch.core.errors import ModelLoadError
    from clipsearch.finetune.distributed import world_from_env
    from clipsearch.finetune.easynlp import EasyNLPError, model_of, parse, parser, write_features
    from clipsearch.inputs.readers import InputError

    argv = list(ctx.args)
    if not argv or "--help" in argv or "-h" in argv:
        typer.echo(HELP + "\n")
        typer.echo(parser().format_help())
        return
    try:
        cmd = parse(argv)
        for warning in cmd.warnings if world_from_env().main else []:
            typer.echo(f"warning: {warning}", err=True)
        schema = ",".join(cmd.columns)
        if cmd.mode == "train":
            if cmd.processes > 1:
                from clipsearch.cli.finetune import launch_torchrun

                launch_torchrun(cmd.processes, "--worker_gpu")
            _train(cmd, schema)
        elif cmd.mode == "evaluate":
            _evaluate(cmd, schema, model_of(cmd.checkpoint_dir))
        else:
            _predict(cmd, schema, model_of(cmd.checkpoint_dir), write_features)
    except (EasyNLPError, InputError, ModelLoadError, FileNotFoundError) as exc:
        typer.echo(f"clipsearch easynlp: {getattr(exc, 'message', exc)}", err=True)
        raise typer.Exit(2) from None


def _train(cmd: EasyNLPCommand, schema: str) -> None:
    from clipsearch.finetune.train import TrainOptions, train

    given: dict[str, Any] = {"lr": cmd.learning_rate, "epochs": cmd.epochs, "seed": cmd.seed,
                             "logging_steps": cmd.logging_steps, "save_steps": cmd.save_steps,
                             "batch_size": cmd.batch_size}
    opts = TrainOptions(train=cmd.tables[0], valid=cmd.tables[1] if len(cmd.tables) > 1 else None,
                        output=cmd.checkpoint_dir, model=cmd.model or "", freeze_vision=cmd.fix_vision,
                        save_all_checkpoints=cmd.save_all_checkpoints, schema=schema,
                        **{k: v for k, v in given.items() if v is not None})
    from clipsearch.finetune.distributed import world_from_env

    result = train(opts)
    if world_from_env().main:
        typer.echo(json.dumps(result, indent=2))


def _evaluate(cmd: EasyNLPCommand, schema: str, spec: str) -> None:
    from clipsearch.finetune.evaluate import evaluate
    from clipsearch.inputs.pairs import PairFile
    from clipsearch.model.load import load_model

    res = evaluate(load_model(spec), PairFile(cmd.tables[0], schema))
    for way, name in (("t2i", "text-to-image"), ("i2t", "image-to-text")):
        typer.echo(f"{name}: " + "  ".join(f"R@{k[1:]} {v:.2f}" for k, v in res[way].items()))
    typer.echo(f"mean recall: {res['mean_recall']:.2f}")
    typer.echo(json.dumps({"t2i": res["t2i"], "i2t": res["i2t"], "mean_recall": res["mean_recall"]}))


def _predict(cmd: EasyNLPCommand, schema: str, spec: str, write_features: Callable[..., Any]) -> None:
    from clipsearch.finetune.predict import predict
    from clipsearch.model.load import load_model

    with tempfile.TemporaryDirectory() as tmp:
        native = Path(tmp) / "features.tsv"
        summary = predict(load_model(spec), cmd.tables[0], native, cmd.feature or "text", schema,
                          batch_size=cmd.batch_size or 256)
        lines = native.read_text(encoding="utf-8").splitlines()[1:]
    vectors = [[float(x) for x in line.split("\t")[1].split(",")] if line.split("\t")[1] else None
               for line in lines]
    write_features(vectors, cmd.outputs)  # outputs and feature: parse() requires them in predict
    typer.echo(f"wrote {len(vectors)} {cmd.feature} features to {cmd.outputs}; {len(summary.bad)} rows unreadable")
