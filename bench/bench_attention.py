"""Attention backends, forward + backward, as the U-ViT calls them (qkv [B, L, 3*H*Dh] -> [B, L, H*Dh]).

    pytest bench/bench_attention.py --benchmark-only --benchmark-columns=mean,stddev,rounds --benchmark-verbose

CPU: a small shape (digits/MNIST scale), fp32. GPU: the U-ViT-L/2 (16 heads x 64) and U-ViT-H/2 (16 heads x 72)
latent-256 shapes, 258 tokens, batch 128, bf16. TFLOP/s (4*B*H*L^2*Dh forward, x3.5 with backward) goes to
extra_info["TFLOP/s"]. A backend that is not available here (xformers not installed, no cuDNN attention
for this GPU/build) is skipped.
"""
import pytest
import torch

from dpt_fast import ops

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def attention_step(benchmark, sync, rate, backend, B, L, H, Dh, dtype, device):
    if backend == "xformers":
        pytest.importorskip("xformers")
    torch.manual_seed(0)
    qkv = torch.randn(B, L, 3 * H * Dh, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(B, L, H * Dh, device=device, dtype=dtype)

    def step():
        out = ops.attention(qkv, H, backend=backend)
        out.backward(grad)
        qkv.grad = None
        return out

    try:
        step()
    except RuntimeError as e:  # e.g. no kernel of this SDPA backend for this dtype / GPU
        pytest.skip(f"{backend} unavailable: {str(e).splitlines()[0]}")
    benchmark.pedantic(sync(step, device), rounds=10 if device == "cuda" else 5, warmup_rounds=2)
    rate(3.5 * 4 * B * H * L * L * Dh, "TFLOP/s", 1e-12)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_attention_cpu_small(benchmark, sync, rate, backend):
    torch.set_num_threads(1)
    attention_step(benchmark, sync, rate, backend, B=8, L=18, H=4, Dh=48, dtype=torch.float32, device="cpu")


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "xformers", "math"])
@pytest.mark.parametrize("model, Dh", [("L2", 64), ("H2", 72)])
def test_attention_gpu_latent256(benchmark, sync, rate, backend, model, Dh):
    attention_step(benchmark, sync, rate, backend, B=128, L=258, H=16, Dh=Dh, dtype=torch.bfloat16, device="cuda")
