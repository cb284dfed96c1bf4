"""The paper's logistic regression (`dpt_fast.models.logreg`): fitting and labelling at ImageNet shapes.

    pytest bench/bench_logreg.py --benchmark-only --benchmark-columns=mean,rounds
    DPT_FAST_BENCH_LARGE=1 pytest bench/bench_logreg.py --benchmark-only -k stage1   # minutes on a CPU

Rows are synthetic backbone-like features (class means + noise, centred and L2-normalised as BackboneSpace
writes them; at 768 dims and 1,000 classes the noise leaves the nearest true mean right 57 % of the time, about
DPT's 1-label top-1); how many L-BFGS iterations a fit needs depends on the data, so real MSN features can take
more or fewer (`logreg_iterations` in extra_info, and in stage{1,3}/metrics.json of a real run).
Shapes: `stage1` = ImageNet with 2 labels per class (2,000 x 768 -> 1,000 classes, ViT-B/4 width), `stage3` =
2 labels + K = 128 generated images per class (130,000 rows; `stage3_tenth`: 13 per class, for CPUs), `label` =
pseudo-labels of all 1,281,167 ImageNet training rows (`label_quarter`: a quarter of them, for CPUs with little
memory). `small` is a quick shape that runs on every CPU.
"""
import os

import numpy as np
import pytest
import torch

from dpt_fast.models.logreg import fit_paper_logreg

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
LARGE = os.environ.get("DPT_FAST_BENCH_LARGE") == "1"
FIT = {"small": (1000, 128, 100), "stage1": (2000, 768, 1000), "stage3_tenth": (13_000, 768, 1000),
       "stage3": (130_000, 768, 1000)}
LABEL = {"small": (20_000, 128, 100), "label_quarter": (320_000, 768, 1000), "label": (1_281_167, 768, 1000)}


def rows(n, d, k, seed=0, chunk=65536):
    """float32 [n, d] rows (made `chunk` at a time: the full ImageNet shape is 3.9 GB) and int64 labels [n]."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, d, generator=torch.Generator().manual_seed(99))
    y = torch.arange(n) % k
    x = np.empty((n, d), np.float32)
    for i in range(0, n, chunk):
        xc = means[y[i:i + chunk]] + 8.0 * torch.randn(len(y[i:i + chunk]), d, generator=g)
        x[i:i + chunk] = torch.nn.functional.normalize(xc - xc.mean(1, keepdim=True), dim=1).numpy()
    return x, y.numpy()


@pytest.fixture(scope="module", autouse=True)
def warm():
    """The first torch optimizer of a process pays a one-time import (seconds); keep it out of the timings."""
    x, y = rows(20, 8, 2)
    fit_paper_logreg(x, y, 2, max_iter=1)


def _fit(benchmark, shape, device):
    x, y = rows(*FIT[shape])
    info = {}
    head = benchmark.pedantic(fit_paper_logreg, args=(x, y, FIT[shape][2]), kwargs={"device": device, "info": info},
                              rounds=1, iterations=1)
    benchmark.extra_info.update(info, rows=len(x), dim=x.shape[1], classes=FIT[shape][2], device=device,
                                torch_threads=torch.get_num_threads(),
                                train_accuracy=float((head.predict(x) == y).mean()))


def _label(benchmark, shape, device):
    n, d, k = LABEL[shape]
    x, _ = rows(n, d, k)
    head = fit_paper_logreg(x[:2000], np.arange(2000) % k, k, device=device, max_iter=20)
    pred, _ = benchmark.pedantic(head.label_prob, args=(x,), kwargs={"device": device}, rounds=1, iterations=1)
    benchmark.extra_info.update(rows=n, dim=d, classes=k, device=device, torch_threads=torch.get_num_threads(),
                                rows_per_second=n / benchmark.stats.stats.mean)


@pytest.mark.parametrize("shape", ["small", "stage1", "stage3_tenth"])
def test_fit_cpu(benchmark, shape):
    if shape != "small" and not LARGE:
        pytest.skip("set DPT_FAST_BENCH_LARGE=1 for ImageNet shapes on the CPU")
    _fit(benchmark, shape, "cpu")


@pytest.mark.parametrize("shape", ["small", "label_quarter"])
def test_label_cpu(benchmark, shape):
    if shape != "small" and not LARGE:
        pytest.skip("set DPT_FAST_BENCH_LARGE=1 for ImageNet shapes on the CPU")
    _label(benchmark, shape, "cpu")


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["stage1", "stage3"])
def test_fit_gpu(benchmark, shape):
    _fit(benchmark, shape, "cuda")


@requires_cuda
@pytest.mark.gpu
def test_label_gpu(benchmark):
    _label(benchmark, "label", "cuda")
