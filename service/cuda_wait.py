"""How the model thread waits for the GPU: asleep, not spinning on a core.

A plain `tensor.cpu()` waits for the GPU the way CUDA's default schedule does on a machine
with more cores than CUDA contexts: it busy-polls, holding a core at 100 % for as long as the
batch runs. Under load the model thread of each server process is nearly always waiting on its
batch, so N worker processes keep N cores spinning, cores their event loops (each one bound by
its own Python, bench/NOTES.md) and the load generator need. A CUDA event created with
`blocking=True` (cudaEventBlockingSync) puts the waiting thread to sleep until the GPU is done
instead, as vLLM and SGLang do for the same reason; the price is a wake-up (tens of µs) per
batch. `CLIPSEARCH_CUDA_WAIT=spin` keeps CUDA's polling.

A process-wide choice, set once at start-up from the settings like `torch.set_num_threads`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

CudaWait = Literal["sleep", "spin"]

_mode: CudaWait = "sleep"


def set_cuda_wait(mode: CudaWait) -> None:
    global _mode
    if mode not in ("sleep", "spin"):
        raise ValueError(f"cuda_wait must be 'sleep' or 'spin', not {mode!r}")
    _mode = mode


def cuda_wait() -> CudaWait:
    return _mode


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """`t` as a NumPy array on the host. From a GPU: copied into page-locked memory on the
    current stream, then waited for as `set_cuda_wait` chose (asleep by default)."""
    return to_numpy_all(t)[0]


def to_numpy_all(*tensors: torch.Tensor) -> list[np.ndarray]:
    """`to_numpy` of each tensor, with one wait for the GPU for all of them."""
    if all(t.device.type != "cuda" for t in tensors):
        return [t.detach().numpy() for t in tensors]
    hosts = []
    for t in tensors:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
        host.copy_(t.detach(), non_blocking=True)
        hosts.append(host)
    # The copies ran on each device's current stream (a model may live on cuda:1): wait on those.
    for device in dict.fromkeys(t.device for t in tensors if t.device.type == "cuda"):
        stream = torch.cuda.current_stream(device)
        if _mode == "sleep":
            done = torch.cuda.Event(blocking=True)
            done.record(stream)
            done.synchronize()
        else:
            stream.synchronize()
    return [host.numpy() for host in hosts]
