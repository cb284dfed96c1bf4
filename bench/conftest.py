"""Shared helpers of the benchmark suite (`pytest bench/ --benchmark-only`).

CPU benchmarks use small shapes and finish in seconds; GPU shapes are marked `gpu` and skip without CUDA.
GPU timings synchronise the device inside the timed function, so each round measures finished work.
Rates (images/s, TFLOP/s, GB/s) go to `benchmark.extra_info` (shown by --benchmark-verbose, saved by
--benchmark-json).
"""
from typing import Callable

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def synced(fn: Callable[[], object], device: torch.device | str) -> Callable[[], object]:
    """fn followed by a CUDA synchronise when `device` is a CUDA device (so the timer sees the real cost)."""
    if torch.device(device).type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def record_rate(benchmark, work: float, unit: str, scale: float = 1.0) -> None:
    """Store work / mean-seconds (e.g. FLOPs -> TFLOP/s with scale 1e-12) in the benchmark's extra_info."""
    if benchmark.stats is not None and benchmark.stats.stats.mean > 0:
        benchmark.extra_info[unit] = float(f"{work * scale / benchmark.stats.stats.mean:.4g}")


@pytest.fixture
def sync() -> Callable:
    """`sync(fn, device)`: see `synced` (a fixture, so bench files need not import this conftest)."""
    return synced


@pytest.fixture
def rate(benchmark) -> Callable:
    """`rate(work, unit, scale)`: see `record_rate`, for this test's benchmark."""
    return lambda work, unit, scale=1.0: record_rate(benchmark, work, unit, scale)
