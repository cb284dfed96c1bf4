"""A U-ViT training step: the bare step (forward, epsilon-MSE loss, backward, AdamW) and the real stage-2 loop.

    pytest bench/bench_uvit.py --benchmark-only --benchmark-columns=mean,stddev,rounds --benchmark-verbose

`train_step`: the bare step. CPU: the embedded presets (uvit_digits batch 64, uvit_mnist batch 16), fp32. GPU:
U-ViT-L/2 and U-ViT-H/2 on latent-256 (4x32x32, 258 tokens), batch 128, bf16 autocast, with the Triton kernels
(`kernels`), without them (`reference`) and under torch.compile (`compiled`). extra_info: images/s and, on GPU,
model TFLOP/s (3 x forward matmul FLOPs, `UViT.forward_flops`).
`train_loop`: the real `train_diffusion` loop around the same step (per-step draws, data gather, gradient clipping,
EMA, the loss window; `dpt_fast.profile.profile_train`), same shapes; its steady-state images/s is in extra_info
(the benchmark's own time includes building the model). For MFU: `python -m dpt_fast.profile`.
"""
import os

import pytest
import torch

from dpt_fast.models import UVIT_PRESETS, UViT
from dpt_fast.profile import profile_train

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_train_step(preset, batch, device, bf16=False, compiled=False, num_classes=11, use_checkpoint=False):
    """A closure running one training step of `preset` on random data, plus the model."""
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: filling U-ViT-H/2 on a CPU takes seconds
        model = UViT(**UVIT_PRESETS[preset], num_classes=num_classes, use_checkpoint=use_checkpoint)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.03, betas=(0.99, 0.99),
                            fused=device == "cuda")
    net = torch.compile(model) if compiled else model
    p = UVIT_PRESETS[preset]
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(batch, p["in_chans"], p["img_size"], p["img_size"], device=device, generator=g)
    y = torch.randint(0, num_classes, (batch,), device=device, generator=g)

    def step():
        t = torch.rand(batch, device=device) * 999
        noise = torch.randn_like(x0)
        xt = 0.7 * x0 + 0.7 * noise
        with torch.autocast(device_type="cuda" if device == "cuda" else "cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = (net(xt, t, y).float() - noise).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, model


@pytest.mark.parametrize("preset, batch", [("uvit_digits", 64), ("uvit_mnist", 16)])
def test_uvit_train_step_cpu(benchmark, sync, rate, preset, batch):
    torch.set_num_threads(1)
    step, _ = make_train_step(preset, batch, "cpu")
    step()
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    rate(batch, "images/s")


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["kernels", "reference", "compiled"])
@pytest.mark.parametrize("preset", ["uvit_l2_latent256", "uvit_h2_latent256"])
def test_uvit_train_step_gpu_latent256(benchmark, sync, rate, monkeypatch, preset, mode):
    monkeypatch.setenv("DPT_FAST_KERNELS", "reference" if mode == "reference" else "auto")
    batch = 128
    step, model = make_train_step(preset, batch, "cuda", bf16=True, compiled=mode == "compiled", num_classes=1001)
    for _ in range(3):  # compile / autotune / allocator warm-up outside the timing
        step()
    benchmark.pedantic(sync(step, "cuda"), rounds=10, warmup_rounds=1)
    rate(batch, "images/s")
    rate(3 * model.forward_flops() * batch, "TFLOP/s", 1e-12)
    benchmark.extra_info["max_memory_GiB"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 1)
    benchmark.extra_info["attention"] = os.environ.get("DPT_FAST_ATTN", "auto")


@pytest.mark.parametrize("preset, batch", [("uvit_digits", 64)])
def test_uvit_train_loop_cpu(benchmark, preset, batch):
    torch.set_num_threads(1)
    r = benchmark.pedantic(profile_train, args=(preset, batch, 5, "cpu"), rounds=1, iterations=1)
    benchmark.extra_info["images/s"] = round(r["images_per_second"], 1)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["uvit_l2_latent256", "uvit_h2_latent256"])
def test_uvit_train_loop_gpu_latent256(benchmark, preset):
    r = benchmark.pedantic(profile_train, args=(preset, 128, 10, "cuda"), rounds=1, iterations=1)
    benchmark.extra_info.update({"images/s": round(r["images_per_second"], 1), "TFLOP/s": round(r["tflops"], 1),
                                 "max_memory_GiB": round(r["peak_memory_bytes"] / 2**30, 1)})
