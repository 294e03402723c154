"""CUDA graphs for the model's towers at a few bucketed shapes, so that a lone query does
does not pay for hundreds of kernel launches (a few ms for ViT-B-32 at batch 1).

A graph replays fixed shapes from fixed buffers. `BucketedGraphs` captures a function at
each bucket shape, copies an input into the smallest bucket that holds it (zero-padded:
zero is the pad token, and padded image rows are discarded), replays, and returns a copy
of the rows asked for. Inputs larger than every bucket run eagerly.

The capture step is a parameter: `capture_cuda` on a GPU; `capture_emulated` does what a
graph does (replay recomputes into the same output tensor from whatever the input buffer
holds) in plain torch, so that the bucketing, padding and copying are tested on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Features = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Captured:
    static_in: torch.Tensor
    static_out: torch.Tensor
    replay: Callable[[], None]


Capture = Callable[[Features, torch.Tensor], Captured]


def capture_cuda(fn: Features, static_in: torch.Tensor) -> Captured:
    """Capture `fn(static_in)` as a CUDA graph (torch's documented recipe: warm up on a
    side stream first, so lazy initialisation such as cuBLAS handles stays out of the graph)."""
    device = static_in.device
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(static_in)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: a search running on another thread must not invalidate the capture.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        static_out = fn(static_in)
    return Captured(static_in, static_out, graph.replay)


def capture_emulated(fn: Features, static_in: torch.Tensor) -> Captured:
    """A graph's semantics without CUDA: replay overwrites one output tensor, computed from
    the current contents of one input buffer."""
    static_out = fn(static_in)

    def replay() -> None:
        static_out.copy_(fn(static_in))

    return Captured(static_in, static_out, replay)


class BucketedGraphs:
    """`fn` (rows in, rows out) replayed from graphs captured at `shapes`."""

    def __init__(self, fn: Features, shapes: Sequence[tuple[int, ...]], *, dtype: torch.dtype,
                 device: torch.device, capture: Capture = capture_cuda) -> None:
        self.fn = fn
        self.graphs: dict[tuple[int, ...], Captured] = {}
        # Smallest first, so `bucket` can take the first shape that fits.
        for shape in sorted(set(shapes), key=lambda s: (math.prod(s), s)):
            self.graphs[shape] = capture(fn, torch.zeros(shape, dtype=dtype, device=device))

    def bucket(self, shape: Sequence[int]) -> tuple[int, ...] | None:
        """The smallest captured shape holding `shape` in every dimension, if any."""
        for captured in self.graphs:
            if len(captured) == len(shape) and all(c >= s for c, s in zip(captured, shape, strict=True)):
                return captured
        return None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = self.bucket(x.shape)
        if shape is None:
            return self.fn(x)
        graph = self.graphs[shape]
        if tuple(x.shape) == shape:
            graph.static_in.copy_(x)
        else:
            graph.static_in.zero_()
            graph.static_in[tuple(slice(0, n) for n in x.shape)].copy_(x)
        graph.replay()
        # A copy: the next replay overwrites the graph's output.
        return graph.static_out[: x.shape[0]].clone()


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to and including `max_batch`: at most 2x padding per batch."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch:
        sizes.append(sizes[-1] * 2)
    return sorted({*sizes, max_batch})


def length_buckets(context_length: int) -> list[int]:
    """Token lengths for text graphs when padding can be trimmed: short queries are common."""
    return sorted({n for n in (8, 16, 32) if n < context_length} | {context_length})
