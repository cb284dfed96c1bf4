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


def _sampler_share(benchmark, make_solver, net, x, y, sample_kwargs, repeat: int = 3) -> float:
    """The sampler's share of a sampling run: the same run with the network replaced by a constant (its output at
    the first call), timed with the benchmark's own timer, over the benchmark's mean."""
    with torch.no_grad():
        const = net(torch.cat([x, x]), torch.full((2 * x.shape[0],), 500.0, device=x.device), torch.cat([y, y]))
    solver = make_solver(lambda xx, t, yy: const[: xx.shape[0]])
    timer = getattr(benchmark, "_timer", time.perf_counter)

    def run():
        with torch.no_grad():
            solver.sample(x, **sample_kwargs)
        if x.is_cuda:
            torch.cuda.synchronize()

    run()
    t0 = timer()
    for _ in range(repeat):
        run()
    return (timer() - t0) / repeat / benchmark.stats.stats.mean


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset,batch", [("uvit_digits", 64), ("uvit_mnist", 8)])
def test_sampling_loop_cpu(benchmark, preset, batch, backend):
    """Whole DPM-Solver++ runs (10 steps, multistep order 2, CFG 0.4) with a tiny U-ViT: images/s and the sampler's
    share of the time (everything but the network's forward passes)."""
    model = _uvit(preset, "cpu")
    ns = NoiseScheduleVP("linear")
    kw = uvit_kwargs(ModelConfig(preset=preset), NULL + 1)
    y, y_null = torch.arange(batch) % NULL, torch.full((batch,), NULL)
    x = torch.randn(batch, kw["in_chans"], kw["img_size"], kw["img_size"])
    sample_kwargs = dict(steps=10, order=2, method="multistep")

    def make_solver(net):
        fn = model_wrapper(net, ns, guidance_type="classifier-free", condition=y, unconditional_condition=y_null,
                           guidance_scale=1.4, model_time_fn=model_time)
        return DPMSolver(fn, ns, "dpmsolver++", backend=backend)

    solver = make_solver(model)

    def run():
        with torch.no_grad():
            return solver.sample(x, **sample_kwargs)

    benchmark.group = f"loop-cpu-{preset}"
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["images_per_second"] = batch / benchmark.stats.stats.mean
    benchmark.extra_info["sampler_overhead_share"] = _sampler_share(benchmark, make_solver, model, x, y, sample_kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("path", ["official_two_pass", "one_pass_graph"])
@pytest.mark.parametrize("preset,batch", [("uvit_mnist", 250), ("uvit_h2_latent256", 64)])
def test_generation_gpu(benchmark, preset, batch, path):
    """50-step DPM-Solver++ ("fast": singlestep, order 3), CFG s = 0.4, bf16 model calls.

    official_two_pass: the official U-ViT way: two forward passes (cond, uncond) of B rows per step, the update in
    PyTorch, eager. one_pass_graph: ours: one forward of 2B rows, the fused CUDA update, the loop in a CUDA graph.
    Compare the two rows of a group for the speed-up (target >= 3x at U-ViT-H/2; >= 15 images/s on an H100).
    """
    kw = uvit_kwargs(ModelConfig(preset=preset), NULL + 1)
    model = _uvit(preset, "cuda")
    ns = NoiseScheduleVP("linear")
    y, y_null = torch.arange(batch, device="cuda") % NULL, torch.full((batch,), NULL, device="cuda")
    x = torch.randn(batch, kw["in_chans"], kw["img_size"], kw["img_size"], device="cuda")
    sample_kwargs = dict(steps=50, order=3, method="singlestep", t_end=1e-4)

    def bf16(net):
        def call(xx, t, yy):
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):  # required under graph capture
                return net(xx, t, yy)

        return call

    def make_solver(net):
        if path == "official_two_pass":
            def eps(xx, t):
                t_in = model_time(ns, t)
                e_c, e_u = bf16(net)(xx, t_in, y).float(), bf16(net)(xx, t_in, y_null).float()
                return e_c + 0.4 * (e_c - e_u)

            return DPMSolver(eps, ns, "dpmsolver++", backend="python", cuda_graph=False)
        fn = model_wrapper(bf16(net), ns, guidance_type="classifier-free", condition=y, unconditional_condition=y_null,
                           guidance_scale=1.4, model_time_fn=model_time)
        return DPMSolver(fn, ns, "dpmsolver++", backend="auto", cuda_graph=True)

    solver = make_solver(model)

    def run():
        with torch.no_grad():
            out = solver.sample(x, **sample_kwargs)
        torch.cuda.synchronize()
        return out

    benchmark.group = f"generation-gpu-{preset}"
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["images_per_second"] = batch / benchmark.stats.stats.mean
    benchmark.extra_info["sampler_overhead_share"] = _sampler_share(benchmark, make_solver, bf16(model), x, y,
                                                                    sample_kwargs)
