"""Contrastive fine-tuning on TSV pairs (EasyNLP's `train` mode), of an open_clip model or a
transformers CLIP, Chinese-CLIP or SigLIP checkpoint.

Symmetric CLIP loss with the learnable logit scale clamped to [0, ln 100] (SigLIP models,
which carry a logit bias, train with their pairwise sigmoid loss instead); AdamW with
no weight decay on gains, biases, embeddings and the logit scale; linear warm-up then
cosine decay; AMP on the GPU; gradient accumulation; `--freeze-vision` trains the text
side only (EasyNLP's fix_vision). Each epoch ends with validation by mean recall; the
best model is written atomically as a `local-dir:` checkpoint at OUTPUT/best (in the
layout of the model it started from), which
`serve`, `index build` and `evaluate` load directly. Periodic training checkpoints
(model, optimizer, schedule, step, RNG) go to OUTPUT/checkpoints/ and `--resume`
continues from one exactly where it stopped. Under torchrun the same loop runs
data-parallel on the global batch (`distributed`); rank 0 alone validates and writes.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch
import torch.nn.functional as F

from clipsearch.core.fsutil import atomic_write_bytes
from clipsearch.finetune import distributed
from clipsearch.finetune.data import PairDataset, collate
from clipsearch.finetune.distributed import GlobalBatches, Towers, World, world_from_env
from clipsearch.finetune.evaluate import evaluate
from clipsearch.inputs.pairs import PairFile
from clipsearch.inputs.readers import InputError
from clipsearch.model.clip import load_for_training

log = logging.getLogger(__name__)

MAX_LOGIT_SCALE = math.log(100.0)


@dataclass
class TrainOptions:
    train: Path
    valid: Path | None
    output: Path
    model: str = "clipsearch-tiny"
    pretrained: str | None = None
    device: str = "auto"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 50
    accum_steps: int = 1
    freeze_vision: bool = False
    augment: bool = False
    seed: int = 42
    logging_steps: int = 20
    save_steps: int = 0  # 0: one checkpoint per epoch
    save_all_checkpoints: bool = False
    resume: str | None = None  # a checkpoint path, or "auto" for the newest in OUTPUT/checkpoints
    workers: int = 0
    schema: str | None = None
    amp: bool = True
    progress: bool = True


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy over the in-batch similarity matrix (CLIP's loss)."""
    image_features = F.normalize(image_features, dim=-1)
    text_features = F.normalize(text_features, dim=-1)
    logits = logit_scale.exp() * image_features @ text_features.T
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def sigmoid_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor) -> torch.Tensor:
    """SigLIP's loss: every image-text pair of the batch is a binary match / no-match decision."""
    image_features = F.normalize(image_features, dim=-1)
    text_features = F.normalize(text_features, dim=-1)
    logits = logit_scale.exp() * image_features @ text_features.T + logit_bias
    labels = 2 * torch.eye(len(logits), device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / len(logits)


def pair_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
              logit_bias: torch.Tensor | None) -> torch.Tensor:
    """The loss the model was trained with: sigmoid when it has a logit bias, CLIP's otherwise."""
    if logit_bias is not None:
        return sigmoid_loss(image, text, logit_scale, logit_bias)
    return clip_loss(image, text, logit_scale)


def contrastive_loss(model: Any, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """`pair_loss` of one batch through `model`'s two encoders."""
    return pair_loss(*Towers(model)(pixels, tokens))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name or \
            "embedding" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _latest_checkpoint(directory: Path) -> Path | None:
    found = sorted(directory.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    return found[-1] if found else None


class MetricsLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "ab") as f:
            f.write(orjson.dumps(record) + b"\n")


def train(opts: TrainOptions) -> dict[str, Any]:
    """Run training; returns the best validation metrics and where the best model is. Under
    torchrun each process trains its share of every global batch of `batch_size` × processes
    rows (see `distributed`); rank 0 alone validates and writes."""
    world = world_from_env()
    device = distributed.start(world, opts.device)
    try:
        return _train(opts, world, device)
    finally:
        distributed.stop(world)


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])


def _pad(batch: tuple[torch.Tensor, torch.Tensor] | None, rows: int, filler: tuple[torch.Tensor, torch.Tensor]
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` with filler rows appended up to `rows` (a rank with a smaller share than the others)."""
    pixels = [] if batch is None else [batch[0]]
    tokens = [] if batch is None else [batch[1]]
    missing = rows - (0 if batch is None else len(batch[0]))
    if missing:
        pixels.append(filler[0].unsqueeze(0).expand(missing, *filler[0].shape))
        tokens.append(filler[1].unsqueeze(0).expand(missing, *filler[1].shape))
    return torch.cat(pixels), torch.cat(tokens)


def _train(opts: TrainOptions, world: World, device_name: str) -> dict[str, Any]:
    from tqdm import tqdm

    _seed_everything(opts.seed)
    opts.output.mkdir(parents=True, exist_ok=True)
    ckpt_dir = opts.output / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    trainable = load_for_training(opts.model, opts.pretrained, device_name, seed=opts.seed)
    if world.distributed:  # the same weights everywhere, each rank its own augmentation and dropout
        _seed_everything(opts.seed + world.rank)
    model: Any = trainable.model  # open_clip CLIP: typed attributes (visual, logit_scale) torch cannot express
    device = next(model.parameters()).device
    if opts.freeze_vision:
        for p in model.visual.parameters():
            p.requires_grad = False
    towers = distributed.wrap(model, world, device)
    train_pairs = PairFile(opts.train, opts.schema)
    valid_pairs = PairFile(opts.valid, opts.schema) if opts.valid else None
    transform = trainable.preprocess_train if opts.augment else trainable.preprocess_val
    dataset = PairDataset(train_pairs, transform, trainable.tokenizer)
    batches_per_epoch = math.ceil(len(dataset) / (opts.batch_size * world.size))
    steps_per_epoch = math.ceil(batches_per_epoch / opts.accum_steps)
    total_steps = steps_per_epoch * opts.epochs
    optimizer = torch.optim.AdamW(param_groups(model, opts.weight_decay), lr=opts.lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(opts.warmup_steps, total_steps))
    use_amp = opts.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    metrics = MetricsLog(opts.output / "metrics.jsonl")

    step, start_epoch, best = 0, 0, {"mean_recall": -1.0}
    resume = _latest_checkpoint(ckpt_dir) if opts.resume == "auto" else (Path(opts.resume) if opts.resume else None)
    if resume is not None:
        state = torch.load(resume, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, start_epoch, best = state["step"], state["epoch"], state["best"]
        ranks = state.get("rng_ranks") or [state["rng"]]
        if len(ranks) == world.size:
            _set_rng_state(ranks[world.rank])
        else:  # resumed on another number of processes: a fresh, still reproducible stream per rank
            _seed_everything(opts.seed + world.rank + 7919 * step)
        if world.main:
            log.info("resumed from %s at step %d (epoch %d)", resume, step, start_epoch)

    def save_checkpoint(epoch: int) -> None:
        rngs = world.objects(_rng_state())  # every rank takes part; rank 0 writes
        if not world.main:
            return
        state = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "step": step, "epoch": epoch, "best": best,
            "rng": rngs[0], "rng_ranks": rngs, "world_size": world.size,
            "options": {k: str(v) for k, v in asdict(opts).items()},
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        path = ckpt_dir / f"step-{step}.pt"
        atomic_write_bytes(path, buf.getvalue())
        if not opts.save_all_checkpoints:
            for old in ckpt_dir.glob("step-*.pt"):
                if old != path:
                    old.unlink(missing_ok=True)

    def train_mode() -> None:
        model.train()
        if opts.freeze_vision:
            model.visual.eval()

    def validate(epoch: int) -> dict[str, Any] | None:
        nonlocal best
        if valid_pairs is None:
            return None
        result = None
        if world.main:
            model.eval()
            result = evaluate(trainable.as_clip_model(device), valid_pairs)
            metrics.write({"epoch": epoch + 1, "step": step, "valid": result})
            log.info("epoch %d valid mean recall %.2f (t2i R@1/5/10 %s)", epoch + 1, result["mean_recall"],
                     "/".join(f"{v:.1f}" for v in result["t2i"].values()))
            if result["mean_recall"] > best["mean_recall"]:
                best = {**result, "epoch": epoch + 1, "step": step}
                trainable.save(opts.output / "best", extra_files={"metrics.json": json.dumps(best, indent=2).encode()})
            train_mode()
        world.barrier()
        return result

    train_mode()
    bar = tqdm(total=total_steps, initial=step, unit="step", desc="training",
               disable=not (opts.progress and world.main), dynamic_ncols=True)
    t_log, samples = time.perf_counter(), 0
    for epoch in range(start_epoch, opts.epochs):
        done = (step - epoch * steps_per_epoch) * opts.accum_steps  # micro-batches trained before a resume
        sampler = GlobalBatches(len(dataset), opts.batch_size, world, seed=opts.seed + epoch, start=done)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                             num_workers=opts.workers)
        micro = done
        optimizer.zero_grad(set_to_none=True)
        for batch in loader:
            micro += 1
            rows = 0 if batch is None else len(batch[0])
            counts = world.row_counts(rows, device)
            if sum(counts) < 2:
                continue
            pixels, tokens = (t.to(device, non_blocking=True) for t in _pad(batch, max(counts), dataset.filler()))
            sync = micro % opts.accum_steps == 0 or micro == batches_per_epoch
            no_sync = getattr(towers, "no_sync", None)
            with contextlib.nullcontext() if sync or no_sync is None else no_sync():
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    image, text, scale, bias = towers(pixels, tokens)
                    loss = pair_loss(world.gather(image, counts), world.gather(text, counts), scale, bias)
                scaler.scale(loss / opts.accum_steps).backward()
            samples += sum(counts)
            if not sync:
                continue
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if not isinstance(getattr(model, "logit_bias", None), torch.Tensor):
                with torch.no_grad():
                    model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch + 1)
            if world.main and (step % opts.logging_steps == 0 or step == 1):
                now = time.perf_counter()
                metrics.write({"step": step, "epoch": epoch + 1, "loss": round(loss.item(), 6),
                               "lr": scheduler.get_last_lr()[0],
                               "logit_scale": round(model.logit_scale.exp().item(), 3),
                               "samples_per_s": round(samples / max(now - t_log, 1e-9), 1)})
                t_log, samples = now, 0
            if opts.save_steps and step % opts.save_steps == 0:
                save_checkpoint(epoch)
        if step == 0:  # every row was bad (or alone in its batch): never write untrained weights as best
            raise InputError(f"{opts.train}: no training step ran in epoch {epoch + 1}: no batch held two usable "
                             "pairs (bad images or empty texts are skipped; see the warnings)")
        validate(epoch)
        save_checkpoint(epoch + 1)
    bar.close()
    if valid_pairs is None and world.main:  # no validation set: the last model is the best we know
        trainable.save(opts.output / "best")
    world.barrier()
    return {"best": best, "best_dir": str(opts.output / "best"), "steps": step, "processes": world.size,
            "global_batch": opts.batch_size * world.size}
