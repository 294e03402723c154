"""Data-parallel training under torchrun: one process per GPU (or per CPU share, on gloo).

Every rank walks the same shuffled global batches and takes its contiguous share of each, so
the ranks together see exactly the batches one process would. Features are gathered across
ranks with their gradients (open_clip's `gather_features(gather_with_grad=True)` in
src/open_clip/loss.py): each rank computes the loss of the whole global batch, and DDP's
gradient average gives the gradient of that loss, the same as one process on the global
batch. Shares may differ in size (the last batch, rows that failed to decode): the smaller
ones are padded with filler rows that are encoded and then cut off before the loss, so every
rank runs the same collectives and every parameter gets its (zero) gradient.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# Rank 0 validates and writes checkpoints while the others wait at a barrier: long enough for a
# large validation set.
WAIT = timedelta(hours=3)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (torchrun's RANK, LOCAL_RANK, WORLD_SIZE)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def row_counts(self, n: int, device: torch.device) -> list[int]:
        """Every rank's row count for this step, in rank order."""
        if not self.distributed:
            return [n]
        mine = torch.tensor([n], dtype=torch.long, device=device)
        counts = [torch.zeros_like(mine) for _ in range(self.size)]
        dist.all_gather(counts, mine)
        return [int(c.item()) for c in counts]

    def gather(self, features: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """All ranks' feature rows in rank order, gradients flowing back to each rank's own rows;
        `features` holds max(counts) rows, of which the first counts[rank] are real."""
        if not self.distributed:
            return features
        from torch.distributed._functional_collectives import all_gather_single

        group = dist.group.WORLD
        if group is None:
            raise RuntimeError("no process group: distributed.start() was not called")
        gathered = all_gather_single(features.contiguous(), 0, group)  # differentiable
        parts = gathered.split(features.shape[0])
        return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])

    def objects(self, obj: Any) -> list[Any]:
        """`obj` of every rank, in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out


def world_from_env() -> World:
    """The world torchrun describes in the environment; one process when it is not set."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(rank=int(os.environ.get("RANK", "0")), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                 size=size)


def start(world: World, device: str) -> str:
    """Join the process group (NCCL on GPUs, gloo on CPUs); returns this rank's device."""
    if not world.distributed:
        return device
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(world.local_rank)
        device = f"cuda:{world.local_rank}"
    else:
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=WAIT)
    return device


def stop(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


class GlobalBatches(torch.utils.data.Sampler[list[int]]):
    """One epoch's shuffled global batches of `per_rank * world.size` rows (the permutation
    `DataLoader(shuffle=True)` draws from `seed`, the same on every rank), this rank's
    contiguous share of each; `start` skips batches already trained without reading them."""

    def __init__(self, rows: int, per_rank: int, world: World, seed: int, start: int = 0) -> None:
        self.rows, self.per_rank, self.world, self.seed, self.start = rows, per_rank, world, seed, start
        self.global_batch = per_rank * world.size

    def __len__(self) -> int:
        return max(0, math.ceil(self.rows / self.global_batch) - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed)
        # The draws of DataLoader(shuffle=True, generator=...): one int64 for its workers' base
        # seed, then the permutation; so one process trains in the order it always has.
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        order = torch.randperm(self.rows, generator=generator).tolist()
        for b in range(self.start, math.ceil(self.rows / self.global_batch)):
            batch = order[b * self.global_batch:(b + 1) * self.global_batch]
            share = math.ceil(len(batch) / self.world.size)
            yield batch[self.world.rank * share:(self.world.rank + 1) * share]


class Towers(torch.nn.Module):
    """Both encoders, and the logit scale (and bias) the loss uses, as one forward: what DDP
    wraps, so every trained parameter is reached from its outputs."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        model: Any = self.model
        bias = getattr(model, "logit_bias", None)
        return (model.encode_image(pixels), model.encode_text(tokens), model.logit_scale,
                bias if isinstance(bias, torch.Tensor) else None)


def wrap(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """`Towers(model)`, under DistributedDataParallel when there are several ranks."""
    towers = Towers(model)
    if not world.distributed:
        return towers
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(towers, device_ids=ids)
