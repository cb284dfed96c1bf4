"""Streaming feature extraction overhead: ImageFolder -> 256 px crops -> features in a memory-mapped cache.

    pytest bench/bench_stream.py --benchmark-only --benchmark-columns=mean,stddev,rounds

`decode_only` runs `ImageDecoder` over the files; `cached_features` runs the same decode through
`dpt_fast.data.stream.FolderSource` + `cached_features` with a trivial embedding (a corner pixel), writing
float32 rows into a fresh .npy each round, chunks of 16 committed one by one. The difference is the cost of the
streaming and the resumable cache, with the backbone left out (it is the same work in memory or not).
"""
import os
import shutil

import pytest
import torch

from bench_data import _folder
from dpt_fast.data.dali import ImageDecoder, dali_available
from dpt_fast.data.stream import FolderSource, cached_features

IMAGES = 64
SIZE = 256


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("jpegs_stream"), IMAGES)


def _decode(index, backend):
    return sum(len(pos) for pos, _ in ImageDecoder(index.entries(), SIZE, batch_size=32, backend=backend))


def _features(index, backend, out):
    shutil.rmtree(out, ignore_errors=True)
    src = FolderSource(index, SIZE)
    src.backend = backend
    f = cached_features(lambda x: x[:, :, 0, 0].float(), src, out / "f.npy", key={}, dim=3, batch_size=32,
                        chunk_rows=16, progress=False)
    return len(f)


@pytest.mark.parametrize("backend", ["pil", "dali_cpu"])
@pytest.mark.parametrize("what", ["decode_only", "cached_features"])
def test_stream_cpu(benchmark, index, tmp_path, backend, what):
    if backend.startswith("dali") and not dali_available():
        pytest.skip("NVIDIA DALI is not installed")
    if what == "decode_only":
        n = benchmark.pedantic(_decode, args=(index, backend), rounds=3, warmup_rounds=1)
    else:
        n = benchmark.pedantic(_features, args=(index, backend, tmp_path / "cache"), rounds=3, warmup_rounds=1)
    assert n == IMAGES
    benchmark.extra_info.update(images=n, threads=os.cpu_count(), torch_threads=torch.get_num_threads(),
                                images_per_second=n / benchmark.stats.stats.mean)
