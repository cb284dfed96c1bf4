"""Fused kernels vs eager PyTorch, forward + backward: LayerNorm + adaLN modulate, residual add + LayerNorm,
bias + GELU.

    pytest bench/bench_kernels.py --benchmark-only --benchmark-columns=mean,stddev,rounds --benchmark-verbose

Each op runs as `triton` (the kernel of dpt_fast.kernels), `eager` (the same math as plain PyTorch ops:
what runs without the kernels) and, on GPU, `compiled` (the eager math under torch.compile, Inductor's own
fusion). CPU: eager only, small shapes (the Triton interpreter is no measure of speed). GPU: the U-ViT-H/2
latent-256 shape, B=128 x 258 tokens x D=1152 (MLP hidden 4608), bf16. Effective bandwidth (the minimum bytes
an op must move, forward + backward, over the time) goes to extra_info["GB/s"].
"""
import pytest
import torch
import torch.nn.functional as F

from dpt_fast.kernels import bias_gelu, layernorm

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def eager_ln_modulate(x, shift, scale):
    y = F.layer_norm(x, x.shape[-1:], eps=1e-6)
    return y * (1 + scale[:, None]) + shift[:, None]


def eager_add_ln(x, delta, w, b):
    x = x + delta
    return x, F.layer_norm(x, x.shape[-1:], w, b, 1e-5)


def eager_bias_gelu(h, bias):
    return F.gelu(h + bias)


def variant(impl, op):
    """The callable of `op` for implementation `impl` (triton | eager | compiled)."""
    eager = {"ln_modulate": eager_ln_modulate, "add_ln": eager_add_ln, "bias_gelu": eager_bias_gelu}[op]
    if impl == "eager":
        return eager
    if impl == "compiled":
        return torch.compile(eager)
    return {
        "ln_modulate": lambda x, shift, scale: layernorm.fused_layer_norm(x, None, None, 1e-6, shift=shift,
                                                                          scale=scale)[1],
        "add_ln": lambda x, delta, w, b: layernorm.fused_layer_norm(x, w, b, 1e-5, delta=delta),
        "bias_gelu": bias_gelu.fused_bias_gelu,
    }[op]


def make_inputs(op, B, L, D, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s, dt=dtype: torch.randn(*s, generator=g, device=device, dtype=dt).requires_grad_()  # noqa: E731
    if op == "ln_modulate":
        cond = r(B, 2 * D)
        return (r(B, L, D), cond[:, :D], cond[:, D:]), cond
    if op == "add_ln":
        return (r(B, L, D, dt=torch.float32), r(B, L, D), r(D, dt=torch.float32), r(D, dt=torch.float32)), None
    return (r(B * L, 4 * D), r(4 * D, dt=torch.float32)), None


def bytes_moved(op, B, L, D, dtype):
    """Minimum bytes of forward + backward (each big tensor read/written once per pass)."""
    n, e = B * L * D, torch.finfo(dtype).bits // 8
    return {"ln_modulate": n * e * (2 + 3),  # fwd: x, y; bwd: x, dy, dx
            "add_ln": n * (4 + e + 4 + e) + n * (e + 4 + 4 + 4 + e),  # fwd: x, delta, x_new, y; bwd: dy, dx_new, x_new, dx, ddelta
            "bias_gelu": 4 * n * e * (2 + 3)}[op]


def kernel_step(benchmark, sync, rate, impl, op, B, L, D, dtype, device):
    fn = variant(impl, op)
    inputs, cond = make_inputs(op, B, L, D, dtype, device)
    leaves = [t for t in inputs if t.is_leaf] + ([cond] if cond is not None else [])

    def step():
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        for t in leaves:
            t.grad = None
        return out

    step()
    benchmark.pedantic(sync(step, device), rounds=10 if device == "cuda" else 5, warmup_rounds=2)
    rate(bytes_moved(op, B, L, D, dtype), "GB/s", 1e-9)


@pytest.mark.parametrize("op", ["ln_modulate", "add_ln", "bias_gelu"])
def test_kernels_cpu_eager_small(benchmark, sync, rate, op):
    torch.set_num_threads(1)
    kernel_step(benchmark, sync, rate, "eager", op, B=8, L=18, D=128, dtype=torch.float32, device="cpu")


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "eager", "compiled"])
@pytest.mark.parametrize("op", ["ln_modulate", "add_ln", "bias_gelu"])
def test_kernels_gpu_uvit_h2(benchmark, sync, rate, impl, op):
    kernel_step(benchmark, sync, rate, impl, op, B=128, L=258, D=1152, dtype=torch.bfloat16, device="cuda")
