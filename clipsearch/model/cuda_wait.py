"""Results back from the GPU with the waiting thread asleep, not spinning on a core.

A plain `tensor.cpu()` waits the way CUDA's default schedule does: it busy-polls a core for
as long as the batch runs, a core per server process that the event loops need. A CUDA
event created with `blocking=True` (cudaEventBlockingSync) puts the thread to sleep until
the GPU is done instead, as vLLM and SGLang do.
"""

from __future__ import annotations

import numpy as np
import torch


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """`t` as a NumPy array on the host (from a GPU: via page-locked memory, waited for asleep)."""
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
        done = torch.cuda.Event(blocking=True)
        done.record(torch.cuda.current_stream(device))
        done.synchronize()
    return [host.numpy() for host in hosts]
