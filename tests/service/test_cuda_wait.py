"""How results come back from the GPU: the same arrays either way, and a sleeping wait that
really sleeps (an event made the wrong way still busy-polls, as vLLM found with
`torch.Event(blocking=True)`)."""

from __future__ import annotations

import time

import numpy as np
import pydantic
import pytest
import torch

from service.cuda_wait import cuda_wait, set_cuda_wait, to_numpy, to_numpy_all
from service.settings import Settings


@pytest.fixture
def restore_mode():
    before = cuda_wait()
    yield
    set_cuda_wait(before)


def test_cpu_tensors_come_back_as_they_are(restore_mode) -> None:
    x = torch.randn(5, 7)
    i = torch.arange(5)
    for mode in ("sleep", "spin"):
        set_cuda_wait(mode)
        got, idx = to_numpy_all(x, i)
        np.testing.assert_array_equal(got, x.numpy())
        np.testing.assert_array_equal(idx, i.numpy())
        assert np.shares_memory(got, x.numpy())  # no copy on the CPU, as .numpy() makes none
        np.testing.assert_array_equal(to_numpy(x), x.numpy())


def test_the_mode_is_checked(restore_mode) -> None:
    with pytest.raises(ValueError, match="cuda_wait"):
        set_cuda_wait("poll")  # type: ignore[arg-type]
    with pytest.raises(pydantic.ValidationError, match="cuda_wait"):
        Settings(model="x", cuda_wait="poll")  # type: ignore[arg-type]
    assert Settings(model="x").cuda_wait == "sleep"


@pytest.mark.gpu
def test_gpu_results_are_exact_and_a_sleeping_wait_sleeps(restore_mode) -> None:
    x = torch.randn(300, 512, device="cuda", dtype=torch.float16)
    top = torch.topk(x.float() @ x.float().T, 10, dim=1)
    thread_cpu: dict[str, float] = {}
    for mode in ("sleep", "spin"):
        set_cuda_wait(mode)
        values, indices = to_numpy_all(top.values, top.indices)
        np.testing.assert_array_equal(values, top.values.cpu().numpy())
        np.testing.assert_array_equal(indices, top.indices.cpu().numpy())
        np.testing.assert_array_equal(to_numpy(x), x.cpu().numpy())
        torch.cuda.synchronize()
        torch.cuda._sleep(int(1e9))  # keeps the GPU busy for a good fraction of a second
        wall, cpu = time.perf_counter(), time.thread_time()
        to_numpy(x)
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
        assert wall > 0.05, "the GPU was not busy: nothing to tell the modes apart"
        thread_cpu[mode] = cpu / wall
    assert thread_cpu["sleep"] < 0.2 < 0.6 < thread_cpu["spin"], thread_cpu
