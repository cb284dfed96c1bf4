"""Evaluation cost: FID + IS + precision/recall + CAS of 1,000 generated vs 1,000 real MNIST-5k images on CPU
with the shipped feature network (torch-fidelity does the metrics), and the sample grid.

    pytest bench/bench_eval.py --benchmark-only --benchmark-columns=mean,stddev,rounds
"""
import numpy as np
import pytest

from dpt_fast.config import DataConfig
from dpt_fast.data import load_dataset
from dpt_fast.eval import generation_metrics, save_grid


@pytest.fixture(scope="module")
def mnist():
    return load_dataset(DataConfig(name="mnist5k"))


def test_generation_metrics_1000_vs_1000_mnist(benchmark, mnist):
    real = mnist.x_train[np.random.default_rng(0).permutation(len(mnist.x_train))[:1000]]
    m = benchmark.pedantic(generation_metrics, args=(mnist.x_test, mnist.y_test, real, "mnist5k"), rounds=3, warmup_rounds=0)
    benchmark.extra_info.update({k: m[k] for k in ("fid", "is", "precision", "recall", "cas")})
    assert m["fid"] < 2.0 and m["cas"] > 0.97


def test_save_grid_mnist(benchmark, mnist, tmp_path):
    benchmark(save_grid, mnist.x_test, mnist.y_test, tmp_path / "samples.png")
