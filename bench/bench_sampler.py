"""Sampler benchmarks: the fused step update (C++ vs Python), the whole sampling loop with a U-ViT, the sampler's
overhead as a share of the step time, and on GPU our one-pass CFG + CUDA graph vs the official two-pass path.

    pytest bench/bench_sampler.py --benchmark-only --benchmark-columns=mean,stddev,rounds

CPU runs take well under a minute; GPU benchmarks skip without CUDA. Derived figures (images/s, overhead share,
speed-ups) are in each benchmark's extra_info (--benchmark-verbose prints them, --benchmark-json saves them).
DPT_FAST_SAMPLER_BACKEND does not apply here: each benchmark names its backend.
"""
import time

import pytest
import torch

from dpt_fast.config import ModelConfig
from dpt_fast.diffusion.schedule import NoiseScheduleVP, model_time
from dpt_fast.models import build_uvit
from dpt_fast.models.uvit import uvit_kwargs
from dpt_fast.ops.dpm_solver_update import cpp_available, dpm_solver_update
from dpt_fast.sampling import DPMSolver, model_wrapper

UPDATE_SHAPES = {"4x32x32": (64, 4, 32, 32), "1x28x28": (64, 1, 28, 28)}
BACKENDS = ["python"] + (["cpp"] if cpp_available("cpu") else [])
NULL = 10


def _step_inputs(shape, device):
    """The heaviest DPT step: multistep DPM-Solver++ order 3 with CFG (2B model rows, three history rows)."""
    ns = NoiseScheduleVP("linear")
    fn = model_wrapper(lambda x, t, y: x, ns, guidance_type="classifier-free", condition=torch.zeros(1),
                       unconditional_condition=torch.ones(1), guidance_scale=1.4)
    plan = DPMSolver(fn, ns, "dpmsolver++")._plan(20, None, None, 3, "time_uniform", "multistep", True, False, "dpmsolver")
    gen = torch.Generator(device=device).manual_seed(0)
    b = shape[0]
    x = torch.randn(shape, device=device, generator=gen)
    out = torch.randn((2 * b, *shape[1:]), device=device, generator=gen)
    hist = torch.randn((3, *shape), device=device, generator=gen)
    return x, out, hist, plan.coeffs[10], plan.slots[10]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", list(UPDATE_SHAPES), ids=list(UPDATE_SHAPES))
def test_update_cpu(benchmark, shape, backend):
    """One fused update at B x C x H x W = 64 x shape; target: cpp >= 2x python."""
    x, out, hist, coeffs, slot = _step_inputs(UPDATE_SHAPES[shape], "cpu")
    benchmark.group = f"update-cpu-{shape}"
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark(dpm_solver_update, x, out, x, hist, coeffs, slot, backend)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["python", "cpp"])
@pytest.mark.parametrize("shape", list(UPDATE_SHAPES), ids=list(UPDATE_SHAPES))
def test_update_gpu(benchmark, shape, backend):
    if backend == "cpp" and not cpp_available("cuda"):
        pytest.skip("CUDA kernels not built")
    x, out, hist, coeffs, slot = _step_inputs(UPDATE_SHAPES[shape], "cuda")
    benchmark.group = f"update-gpu-{shape}"

    def run():
        dpm_solver_update(x, out, x, hist, coeffs, slot, backend)
        torch.cuda.synchronize()

    benchmark(run)


def _uvit(preset: str, device, dtype=torch.float32):
    torch.manual_seed(0)
    return build_uvit(ModelConfig(preset=preset), num_classes_with_null=NULL + 1).to(device=device, dtype=dtype).eval()


def _time(fn, repeat: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset,batch", [("uvit_digits", 64), ("uvit_mnist", 8)])
def test_sampling_loop_cpu(benchmark, preset, batch, backend):
    """Whole DPM-Solver++ runs (10 steps, multistep order 2, CFG 0.4) with a tiny U-ViT: images/s and the sampler's
    share of the time (everything but the network's forward passes)."""
    model = _uvit(preset, "cpu")
    ns = NoiseScheduleVP("linear")
    kw = uvit_kwargs(ModelConfig(preset=preset), NULL + 1)
    size, chans = kw["img_size"], kw["in_chans"]
    y = torch.arange(batch) % NULL
    fn = model_wrapper(model, ns, guidance_type="classifier-free", condition=y,
                       unconditional_condition=torch.full((batch,), NULL), guidance_scale=1.4)
    solver = DPMSolver(fn, ns, "dpmsolver++", backend=backend)
    x = torch.randn(batch, chans, size, size)
    steps = 10

    def run():
        with torch.no_grad():
            return solver.sample(x, steps=steps, order=2, method="multistep")

    benchmark.group = f"loop-cpu-{preset}"
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    x2, t2, y2 = torch.cat([x, x]), torch.full((2 * batch,), 500.0), torch.cat([y, torch.full((batch,), NULL)])
    with torch.no_grad():
        t_model = _time(lambda: model(x2, t2, y2), 3)
    t_loop = benchmark.stats.stats.mean
    benchmark.extra_info["images_per_second"] = batch / t_loop
    benchmark.extra_info["sampler_overhead_share"] = max(0.0, 1.0 - steps * t_model / t_loop)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("path", ["official_two_pass", "one_pass_graph"])
@pytest.mark.parametrize("preset,batch", [("uvit_mnist", 250), ("uvit_h2_latent256", 64)])
def test_generation_gpu(benchmark, preset, batch, path):
    """50-step DPM-Solver++ ("fast": singlestep, order 3), CFG s = 0.4, bf16 model calls.

    official_two_pass: the official U-ViT way: two forward passes (cond, uncond) of B rows per step, the update in
    PyTorch, eager. one_pass_graph: ours: one forward of 2B rows, the fused CUDA update, the loop in a CUDA graph.
    """
    kw = uvit_kwargs(ModelConfig(preset=preset), NULL + 1)
    model = _uvit(preset, "cuda")
    ns = NoiseScheduleVP("linear")
    y, y_null = torch.arange(batch, device="cuda") % NULL, torch.full((batch,), NULL, device="cuda")
    x = torch.randn(batch, kw["in_chans"], kw["img_size"], kw["img_size"], device="cuda")

    def bf16(xx, t, yy):
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):  # required under CUDA graph capture
            return model(xx, t, yy)

    if path == "official_two_pass":
        def eps(xx, t):
            t_in = model_time(ns, t)
            e_c, e_u = bf16(xx, t_in, y).float(), bf16(xx, t_in, y_null).float()
            return e_c + 0.4 * (e_c - e_u)

        solver = DPMSolver(eps, ns, "dpmsolver++", backend="python", cuda_graph=False)
    else:
        fn = model_wrapper(bf16, ns, guidance_type="classifier-free", condition=y, unconditional_condition=y_null,
                           guidance_scale=1.4)
        solver = DPMSolver(fn, ns, "dpmsolver++", backend="auto", cuda_graph=True)

    def run():
        with torch.no_grad():
            out = solver.sample(x, steps=50, order=3, method="singlestep", t_end=1e-4)
        torch.cuda.synchronize()
        return out

    benchmark.group = f"generation-gpu-{preset}"
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    t_loop = benchmark.stats.stats.mean
    # The network alone, as this path calls it: 50 forwards of 2B rows, or 100 of B rows.
    rows, calls = (batch, 100) if path == "official_two_pass" else (2 * batch, 50)
    xx, tt, yy = x.repeat(rows // batch, 1, 1, 1), torch.full((rows,), 500.0, device="cuda"), y.repeat(rows // batch)

    def forward():
        with torch.no_grad():
            bf16(xx, tt, yy)
        torch.cuda.synchronize()

    t_model = _time(forward, 5)
    benchmark.extra_info["images_per_second"] = batch / t_loop
    benchmark.extra_info["sampler_overhead_share"] = max(0.0, 1.0 - calls * t_model / t_loop)
