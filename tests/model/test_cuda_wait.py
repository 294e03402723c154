"""How results come back from the GPU: the same arrays, and a wait that really sleeps (an
event made the wrong way still busy-polls, as vLLM found with `torch.Event(blocking=True)`)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from clipsearch.model.cuda_wait import to_numpy, to_numpy_all


def test_cpu_tensors_come_back_as_they_are() -> None:
    x = torch.randn(5, 7)
    i = torch.arange(5)
    got, idx = to_numpy_all(x, i)
    np.testing.assert_array_equal(got, x.numpy())
    np.testing.assert_array_equal(idx, i.numpy())
    assert np.shares_memory(got, x.numpy())  # no copy on the CPU, as .numpy() makes none
    np.testing.assert_array_equal(to_numpy(x), x.numpy())


@pytest.mark.gpu
def test_gpu_results_are_exact_and_the_wait_sleeps() -> None:
    x = torch.randn(300, 512, device="cuda", dtype=torch.float16)
    top = torch.topk(x.float() @ x.float().T, 10, dim=1)
    values, indices = to_numpy_all(top.values, top.indices)
    np.testing.assert_array_equal(values, top.values.cpu().numpy())
    np.testing.assert_array_equal(indices, top.indices.cpu().numpy())
    np.testing.assert_array_equal(to_numpy(x), x.cpu().numpy())
    ratios = {}
    for how, fetch in (("sleep", to_numpy), ("spin", lambda t: t.cpu().numpy())):
        torch.cuda.synchronize()
        torch.cuda._sleep(int(1e9))  # keeps the GPU busy for a good fraction of a second
        wall, cpu = time.perf_counter(), time.thread_time()
        fetch(x)
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
        if wall <= 0.05:
            pytest.skip("the GPU was not busy: nothing to tell the waits apart")
        ratios[how] = cpu / wall
    assert ratios["sleep"] < 0.2 < 0.6 < ratios["spin"], ratios
