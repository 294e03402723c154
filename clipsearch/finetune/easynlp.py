"""EasyNLP's CLIP command line (`easynlp --mode train|evaluate|predict --app_name=clip ...`, as its
CLIP documentation types it) read into clipsearch's train / evaluate / predict.

Flags come as `--flag=value` or `--flag value`. `--tables` names the TSV files (train, then
valid); `--input_schema` (name:type:count, EasyNLP's) names their columns, of which
`--first_sequence` is the text (in predict, the text or the image `--output_schema` asks a
feature of) and `--second_sequence` the image; `--checkpoint_dir` is where train writes and
evaluate and predict read. `--user_defined_parameters` carries `pretrain_model_name_or_path`
(any model spec clipsearch loads), `fix_vision` and `mode`. Flags that mean nothing here are
accepted with a warning line each; any other flag is an error.

predict writes EasyNLP's feature file: one line per input line, the vector's numbers
separated by tabs (an empty line for a row that could not be read).
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from clipsearch.core.errors import ClipsearchError

# Flags EasyNLP takes that change nothing here, and why (the warning line says it).
IGNORED = {
    "worker_cpu": "the CPU threads are torch's default",
    "worker_count": "this starts processes on one machine; for several, run torchrun --nnodes (docs/fine-tuning.md)",
    "sequence_length": "texts are cut at the model's own context length",
    "buckets": "files are read from --tables paths",
    "data_threads": "data is read in the training process",
    "distributed_backend": "NCCL on GPUs, gloo on CPUs",
}
EASYNLP_MODELS = ("clip_", "alibaba-pai/", "pai-clip")


class EasyNLPError(ClipsearchError):
    """An EasyNLP command line that cannot run here (says what to pass instead)."""


@dataclass
class EasyNLPCommand:
    mode: str
    tables: list[Path]
    columns: list[str]
    checkpoint_dir: Path
    model: str | None = None
    learning_rate: float | None = None
    epochs: int | None = None
    seed: int | None = None
    logging_steps: int | None = None
    save_steps: int | None = None
    save_all_checkpoints: bool = False
    batch_size: int | None = None
    fix_vision: bool = False
    outputs: Path | None = None
    feature: str | None = None  # predict: text or image
    processes: int = 1  # train: --worker_gpu, one process per GPU under torchrun
    warnings: list[str] = field(default_factory=list)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="clipsearch easynlp", allow_abbrev=False, add_help=True,
                                 description="EasyNLP's CLIP commands, as typed: --mode train|evaluate|predict")
    ap.add_argument("--mode", required=True, choices=["train", "evaluate", "predict"])
    ap.add_argument("--app_name", default="clip")
    ap.add_argument("--tables", required=True, help="comma-separated TSV files: train[,valid], or one to read")
    ap.add_argument("--input_schema", required=True, help="EasyNLP's name:type:count columns")
    ap.add_argument("--first_sequence", required=True)
    ap.add_argument("--second_sequence")
    ap.add_argument("--checkpoint_dir", required=True)
    ap.add_argument("--learning_rate", type=float)
    ap.add_argument("--epoch_num", type=float)
    ap.add_argument("--random_seed", type=int)
    ap.add_argument("--logging_steps", type=int)
    ap.add_argument("--save_checkpoint_steps", type=int)
    ap.add_argument("--save_all_checkpoints", action="store_true")
    ap.add_argument("--micro_batch_size", type=int, help="rows per process (GPU) and step")
    ap.add_argument("--worker_gpu", type=int, help="train: processes (GPUs) on this machine, under torchrun")
    ap.add_argument("--output_schema")
    ap.add_argument("--outputs")
    ap.add_argument("--user_defined_parameters", default="")
    for name in IGNORED:
        ap.add_argument(f"--{name}")
    return ap


def parse(argv: list[str]) -> EasyNLPCommand:
    """The command line, checked; EasyNLPError says what is wrong in one line."""
    ap = parser()
    known, unknown = ap.parse_known_args(argv)
    if unknown:
        flag = next((u for u in unknown if u.startswith("-")), unknown[0])
        raise EasyNLPError(f"{flag.split('=')[0]}: not an EasyNLP CLIP flag clipsearch knows (clipsearch easynlp "
                           "--help lists them)")
    if known.app_name != "clip":
        raise EasyNLPError(f"--app_name={known.app_name}: only EasyNLP's clip app runs here")
    warnings = [f"--{name}={getattr(known, name)}: ignored ({why})" for name, why in IGNORED.items()
                if getattr(known, name) is not None]
    params = _user_params(known.user_defined_parameters)
    mode = params.pop("mode", "finetune")
    if mode != "finetune":
        warnings.append(f"mode={mode}: ignored (training continues from the given model's weights)")
    tables = [Path(t) for t in known.tables.split(",") if t.strip()]
    cmd = EasyNLPCommand(mode=known.mode, tables=tables, columns=[], checkpoint_dir=Path(known.checkpoint_dir),
                         learning_rate=known.learning_rate, seed=known.random_seed, logging_steps=known.logging_steps,
                         save_steps=known.save_checkpoint_steps, save_all_checkpoints=known.save_all_checkpoints,
                         batch_size=known.micro_batch_size, fix_vision=_true(params.pop("fix_vision", "false")),
                         warnings=warnings)
    if known.worker_gpu is not None and known.worker_gpu < 1:
        raise EasyNLPError(f"--worker_gpu={known.worker_gpu}: give 1 or more")
    if known.worker_gpu and known.worker_gpu > 1:
        if known.mode == "train":
            cmd.processes = known.worker_gpu
        else:
            warnings.append(f"--worker_gpu={known.worker_gpu}: ignored ({known.mode} runs in one process)")
    if known.epoch_num is not None:
        cmd.epochs = max(1, round(known.epoch_num))
    model = params.pop("pretrain_model_name_or_path", None)
    for name in params:
        cmd.warnings.append(f"user_defined_parameters {name}: ignored (not used by the clip app here)")
    if known.mode == "train":
        if model is None:
            raise EasyNLPError("--user_defined_parameters: give pretrain_model_name_or_path=<a model spec clipsearch "
                               "loads> (ViT-B-32, hf:OFA-Sys/chinese-clip-vit-base-patch16, local-dir:/path)")
        cmd.model = check_model(model)
        if len(tables) not in (1, 2):
            raise EasyNLPError(f"--tables={known.tables}: train takes the training file and, after a comma, the "
                               "validation file")
        if known.second_sequence is None:
            raise EasyNLPError("--second_sequence: name the image column for training")
        cmd.columns = _columns(known.input_schema, {known.first_sequence: "text", known.second_sequence: "image"})
    elif known.mode == "evaluate":
        if known.second_sequence is None:
            raise EasyNLPError("--second_sequence: name the image column to evaluate")
        cmd.columns = _columns(known.input_schema, {known.first_sequence: "text", known.second_sequence: "image"})
    else:
        feature = {"text_feat": "text", "image_feat": "image"}.get(known.output_schema or "")
        if feature is None:
            raise EasyNLPError(f"--output_schema={known.output_schema}: predict writes text_feat or image_feat")
        if not known.outputs:
            raise EasyNLPError("--outputs: give the feature file to write")
        cmd.feature, cmd.outputs = feature, Path(known.outputs)
        cmd.columns = _columns(known.input_schema, {known.first_sequence: feature})
    if known.mode != "train" and len(tables) != 1:
        raise EasyNLPError(f"--tables={known.tables}: {known.mode} reads one file")
    return cmd


def check_model(spec: str) -> str:
    """`spec` if clipsearch loads it (its form is checked; weights load when training starts)."""
    from clipsearch.core.errors import ModelLoadError
    from clipsearch.model.clip import resolve_spec

    try:
        resolve_spec(spec, None)
    except ModelLoadError as exc:
        if spec.startswith(EASYNLP_MODELS):
            raise EasyNLPError(
                f"pretrain_model_name_or_path={spec}: an EasyNLP model name, which clipsearch cannot fetch; pass a "
                "model it loads instead, e.g. hf:OFA-Sys/chinese-clip-vit-large-patch14 (Chinese-CLIP), "
                "hf:openai/clip-vit-large-patch14, ViT-B-32 (with --pretrained in the native train) or "
                "local-dir:/path/to/checkpoint") from None
        raise EasyNLPError(f"pretrain_model_name_or_path={spec}: {exc.message}") from None
    return spec


def _user_params(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in shlex.split(text):
        key, sep, value = part.partition("=")
        if not sep:
            raise EasyNLPError(f"--user_defined_parameters: {part!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def _true(value: str) -> bool:
    return value.strip().lower() in ("true", "1", "yes")


def _columns(schema: str, roles: dict[str, str]) -> list[str]:
    """EasyNLP's `name:type:count,...` as clipsearch's column roles: the named sequences as
    text / image, the rest skipped."""
    names = [part.split(":", 1)[0].strip() for part in schema.split(",") if part.strip()]
    missing = [name for name in roles if name not in names]
    if missing:
        raise EasyNLPError(f"--input_schema={schema}: has no column {missing[0]!r} (named by --first_sequence or "
                           "--second_sequence)")
    return [roles.get(name, "_") for name in names]


def model_of(checkpoint_dir: Path) -> str:
    """The model a train run wrote into `checkpoint_dir` (its best), as a spec."""
    best = checkpoint_dir / "best"
    directory = best if best.is_dir() else checkpoint_dir
    if not directory.is_dir():
        raise EasyNLPError(f"--checkpoint_dir={checkpoint_dir}: no model there (train with --mode train first)")
    return f"local-dir:{directory}"


def write_features(vectors: list[list[float] | None], path: Path) -> None:
    """EasyNLP's feature file: a line per input line, its numbers tab-separated."""
    from clipsearch.core.fsutil import atomic_file

    with atomic_file(path, "w", encoding="utf-8") as f:
        for vec in vectors:
            f.write(("" if vec is None else "\t".join(f"{x:.7g}" for x in vec)) + "\n")
