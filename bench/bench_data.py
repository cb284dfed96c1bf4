"""Image decoding throughput: JPEG -> 256 x 256 center crop (uint8 NCHW), DALI CPU vs PIL, DALI `mixed` on GPU.

    pytest bench/bench_data.py --benchmark-only --benchmark-columns=mean,stddev,rounds

The images/s figure of each run is in the benchmark's extra_info (printed with --benchmark-verbose or saved
with --benchmark-json). The set is synthetic: ImageNet-typical 500x375 / 375x500 quality-90 4:2:0 JPEGs
with natural-image-like spectra (~100 KB each, like ImageNet), made once per session.
"""
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dpt_fast.data.dali import ImageDecoder, dali_available
from dpt_fast.data.imagefolder import scan_imagefolder

CPU_IMAGES = 32  # unique files; each round decodes them REPEAT times so pipeline start-up is amortised
REPEAT = 4
GPU_IMAGES = 512
SIZE = 256


def _jpeg(rng, h, w) -> bytes:
    # 1/f-like texture: a few octaves of upsampled noise, as natural images compress (~100 KB at q90)
    x = np.zeros((h, w, 3), np.float32)
    for octave in (4, 16, 64):
        base = rng.normal(0, 1, (h // octave + 2, w // octave + 2, 3)).astype(np.float32)
        up = np.stack([np.asarray(Image.fromarray(base[..., c], "F").resize((w, h), Image.BICUBIC)) for c in range(3)], -1)
        x += up * octave
    x = np.clip(128 + x + rng.normal(0, 20, x.shape), 0, 255).astype(np.uint8)
    b = io.BytesIO()
    Image.fromarray(x).save(b, "JPEG", quality=90)
    return b.getvalue()


def _folder(root, n):
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"class{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        h, w = (375, 500) if i % 3 else (500, 375)
        (d / f"{i:05d}.JPEG").write_bytes(_jpeg(rng, h, w))
    return scan_imagefolder(root, progress=False)


@pytest.fixture(scope="module")
def cpu_set(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("jpegs"), CPU_IMAGES)


def _run(entries, backend, batch_size, device=None):
    n = 0
    for pos, images in ImageDecoder(entries, SIZE, batch_size=batch_size, backend=backend, device=device):
        n += len(pos)
    if images.is_cuda:
        torch.cuda.synchronize()
    return n


@pytest.mark.parametrize("backend", ["pil", "dali_cpu"])
def test_decode_crop_cpu(benchmark, cpu_set, backend):
    if backend.startswith("dali") and not dali_available():
        pytest.skip("NVIDIA DALI is not installed")
    entries = cpu_set.entries() * REPEAT
    n = benchmark.pedantic(_run, args=(entries, backend, 32), rounds=3, warmup_rounds=1)
    assert n == len(entries)
    benchmark.extra_info.update(images=n, threads=os.cpu_count(), images_per_second=n / benchmark.stats.stats.mean)


def test_check_images(benchmark, cpu_set, tmp_path):
    """The validation pass of scan_imagefolder (1/8-scale JPEG decode), per image, one process."""
    root = cpu_set.root
    index = benchmark.pedantic(scan_imagefolder, args=(root,), kwargs=dict(workers=1, progress=False), rounds=3)
    benchmark.extra_info.update(images=len(index), images_per_second=len(index) / benchmark.stats.stats.mean)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not dali_available(), reason="needs CUDA and DALI")
def test_decode_crop_dali_gpu(benchmark, tmp_path_factory):
    index = _folder(tmp_path_factory.mktemp("jpegs_gpu"), GPU_IMAGES)
    entries = index.entries() * 4
    n = benchmark.pedantic(_run, args=(entries, "dali_gpu", 256, "cuda"), rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(images=n, images_per_second=n / benchmark.stats.stats.mean)
