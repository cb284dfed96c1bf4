"""The C++/CUDA fused step update against its PyTorch reference, for every step of every solver."""
import os
import struct

import pytest
import torch

from dpt_fast.diffusion.schedule import NoiseScheduleVP, scaled_linear_betas
from dpt_fast.ops.dpm_solver_update import (
    cpp_available,
    dpm_solver_update,
    dpm_solver_update_reference,
    resolve_backend,
)
from dpt_fast.sampling import DPMSolver, model_wrapper
from dpt_fast.utils import UserError

needs_cpp = pytest.mark.skipif(not cpp_available("cpu"), reason="C++ extension dpt_fast._C not built")
needs_cuda_kernel = pytest.mark.skipif(not cpp_available("cuda") or not torch.cuda.is_available(), reason="needs CUDA and the CUDA kernels")


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _plans():
    """The coefficient rows of every (algorithm, method, order), with and without CFG, on both schedules."""
    out = []
    for kind, ns in [("linear", NoiseScheduleVP("linear")), ("discrete", NoiseScheduleVP("discrete", betas=scaled_linear_betas()))]:
        for alg in ("dpmsolver", "dpmsolver++"):
            for cfg in (False, True):
                fn = model_wrapper(lambda x, t, y: x, ns, guidance_type="classifier-free", condition=torch.zeros(1),
                                   unconditional_condition=torch.ones(1), guidance_scale=1.4 if cfg else 1.0)
                solver = DPMSolver(fn, ns, alg)
                for method in ("singlestep", "multistep", "singlestep_fixed"):
                    for order in (1, 2, 3):
                        plan = solver._plan(10, None, None, order, "time_uniform", method, True, True, "dpmsolver")
                        out.append((f"{kind}-{alg}-{method}-{order}-{'cfg' if cfg else 'nocfg'}", plan, cfg))
    return out


PLANS = _plans()


@needs_cpp
@pytest.mark.parametrize("name,plan,cfg", PLANS, ids=[p[0] for p in PLANS])
@pytest.mark.parametrize("shape", [(8, 4, 32, 32), (3, 1, 5, 7)])
def test_cpp_update_matches_the_reference_for_every_step_in_fp32(name, plan, cfg, shape):
    gen = torch.Generator().manual_seed(0)
    b = shape[0]
    x_eval, x_base = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    model_out = torch.randn((2 * b if cfg else b, *shape[1:]), generator=gen)
    hist0 = torch.randn((plan.hist, *shape), generator=gen)
    for e in range(plan.times.numel()):
        h_cpp, h_ref = hist0.clone(), hist0.clone()
        x_cpp = dpm_solver_update(x_eval, model_out, x_base, h_cpp, plan.coeffs[e], plan.slots[e], backend="cpp")
        x_ref = dpm_solver_update_reference(x_eval, model_out, x_base, h_ref, plan.coeffs[e], plan.slots[e])
        assert _rel(x_cpp, x_ref) <= 1e-6, (e, _rel(x_cpp, x_ref))
        assert _rel(h_cpp, h_ref) <= 1e-6, (e, _rel(h_cpp, h_ref))


@needs_cpp
@pytest.mark.parametrize("dtype,out_dtype,tol", [(torch.float64, torch.float64, 1e-14), (torch.float32, torch.bfloat16, 1e-6),
                                                  (torch.float32, torch.float16, 1e-6), (torch.bfloat16, torch.bfloat16, 1e-2)])
def test_cpp_update_supports_mixed_precision_model_outputs(dtype, out_dtype, tol):
    gen = torch.Generator().manual_seed(1)
    shape = (4, 3, 9, 9)
    x = torch.randn(shape, generator=gen).to(dtype)
    out = torch.randn((8, *shape[1:]), generator=gen).to(out_dtype)
    hist = torch.randn((3, *shape), generator=gen).to(dtype)
    coeffs = torch.tensor([1.4, 0.7, -0.2, 0.95, 0.3, -0.6, 0.1], dtype=torch.float64)
    h_cpp, h_ref = hist.clone(), hist.clone()
    a = dpm_solver_update(x, out, x, h_cpp, coeffs, 1, backend="cpp")
    b = dpm_solver_update_reference(x, out, x, h_ref, coeffs, 1)
    assert a.dtype == dtype and _rel(a, b) <= tol and _rel(h_cpp, h_ref) <= tol


@needs_cpp
def test_op_is_registered_as_a_torch_op_with_a_meta_kernel_for_compile():
    op = torch.ops.dpt_fast.dpm_solver_update
    assert "Tensor(a!) hist" in str(op.default._schema)
    x = torch.empty((2, 3), device="meta")
    out = op(x, torch.empty((4, 3), device="meta"), x, torch.empty((2, 2, 3), device="meta"), torch.zeros(6, dtype=torch.float64), 1)
    assert out.shape == (2, 3) and out.device.type == "meta"


@needs_cpp
def test_op_traces_into_a_single_torch_compile_graph():
    coeffs = torch.tensor([1.4, 1.0, -0.5, 0.9, 0.2, -0.3], dtype=torch.float64)

    def step(x, out, hist):
        return torch.ops.dpt_fast.dpm_solver_update(x, out, x, hist, coeffs, 1) * 2.0

    x, out = torch.randn(2, 8), torch.randn(4, 8)
    h1, h2 = torch.randn(2, 2, 8), None
    h2 = h1.clone()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, out, h1), step(x, out, h2))
    torch.testing.assert_close(h1, h2)  # the in-place history write survives functionalization


@needs_cpp
def test_bad_arguments_are_rejected_with_messages_naming_them():
    x, hist = torch.randn(2, 3), torch.zeros(2, 2, 3)
    good = torch.zeros(6, dtype=torch.float64)
    with pytest.raises(ValueError, match="model_out"):
        dpm_solver_update(x, torch.randn(3, 3), x, hist, good, 0, backend="cpp")
    with pytest.raises(ValueError, match="coeffs"):
        dpm_solver_update(x, x, x, hist, torch.zeros(6), 0, backend="cpp")
    with pytest.raises(ValueError, match="slot"):
        dpm_solver_update(x, x, x, hist, good, 5, backend="cpp")
    with pytest.raises(RuntimeError, match="contiguous"):  # the C++ checks, reached directly
        torch.ops.dpt_fast.dpm_solver_update(x, x, x, torch.zeros(2, 3, 2).transpose(1, 2), good, 0)


def fatbin_cubins(path) -> dict[int, bytes]:
    """{sm: cubin ELF} of the CUDA kernels embedded in a shared library (its .nv_fatbin section), read without a
    GPU or CUDA tools. Fatbin layout: a 16-byte header (magic 0xBA55ED50, u16 version, u16 header size, u64 body
    size), then entries (u16 kind: 1 PTX, 2 ELF; u16 version; u32 header size; u64 payload size; ...; u32 sm at
    byte 28)."""
    data = open(path, "rb").read()
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names = sections[shstrndx][4]
    cubins = {}
    for name, _, _, _, off, size in sections:
        if data[names + name: data.index(b"\0", names + name)] != b".nv_fatbin":
            continue
        pos = off
        while pos + 16 <= off + size and struct.unpack_from("<I", data, pos)[0] == 0xBA55ED50:
            _, _, head, body = struct.unpack_from("<IHHQ", data, pos)
            e = pos + head
            while e < pos + head + body:
                kind, _, ehead, payload = struct.unpack_from("<HHIQ", data, e)
                if kind == 2:
                    cubins[struct.unpack_from("<I", data, e + 28)[0]] = data[e + ehead: e + ehead + payload]
                e += ehead + payload
            pos = (pos + head + body + 7) // 8 * 8
    return cubins


def test_built_extension_holds_the_sm90_cubin_of_the_update_kernel():
    """CI builds the CUDA kernels without a GPU (DPT_FAST_BUILD_CUDA=1) and sets DPT_FAST_EXPECT_CUDA_BUILD=1."""
    if not cpp_available("cpu"):
        pytest.skip("C++ extension dpt_fast._C not built")
    import dpt_fast._C

    cubins = fatbin_cubins(dpt_fast._C.__file__)
    if not cubins and os.environ.get("DPT_FAST_EXPECT_CUDA_BUILD") != "1":
        pytest.skip("dpt_fast._C was built without CUDA kernels (DPT_FAST_BUILD_CUDA=1 builds them)")
    assert cpp_available("cuda"), "the CUDA kernel is not registered for the CUDA dispatch key"
    assert {80, 90} <= set(cubins), f"cubins for sm_{sorted(cubins)}, want sm_80 and sm_90"
    for sm in (80, 90):
        assert cubins[sm][:4] == b"\x7fELF" and b"update_kernel" in cubins[sm]


def test_backend_choice_can_be_forced_by_the_environment(monkeypatch):
    monkeypatch.setenv("DPT_FAST_SAMPLER_BACKEND", "python")
    assert resolve_backend("cpp", "cpu") == "python"
    monkeypatch.setenv("DPT_FAST_SAMPLER_BACKEND", "fortran")
    with pytest.raises(UserError, match="DPT_FAST_SAMPLER_BACKEND"):
        resolve_backend("auto", "cpu")
    monkeypatch.delenv("DPT_FAST_SAMPLER_BACKEND")
    assert resolve_backend("auto", "cpu") == ("cpp" if cpp_available("cpu") else "python")


@needs_cuda_kernel
@pytest.mark.gpu
@pytest.mark.parametrize("name,plan,cfg", PLANS[::5], ids=[p[0] for p in PLANS[::5]])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_cuda_update_matches_the_reference(name, plan, cfg, out_dtype):
    shape = (64, 4, 32, 32)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x_eval, x_base = torch.randn(shape, device="cuda", generator=gen), torch.randn(shape, device="cuda", generator=gen)
    model_out = torch.randn((128 if cfg else 64, *shape[1:]), device="cuda", generator=gen).to(out_dtype)
    hist0 = torch.randn((plan.hist, *shape), device="cuda", generator=gen)
    for e in range(plan.times.numel()):
        h_cuda, h_ref = hist0.clone(), hist0.clone()
        a = dpm_solver_update(x_eval, model_out, x_base, h_cuda, plan.coeffs[e], plan.slots[e], backend="cpp")
        b = dpm_solver_update_reference(x_eval, model_out, x_base, h_ref, plan.coeffs[e], plan.slots[e])
        assert _rel(a, b) <= 1e-6 and _rel(h_cuda, h_ref) <= 1e-6


@needs_cuda_kernel
@pytest.mark.gpu
def test_cuda_update_handles_unaligned_and_odd_sizes():
    x = torch.randn(3 * 5 * 7 + 1, device="cuda")[1:].view(3, 5, 7)  # misaligned storage offset, odd numel
    out, hist = torch.randn(6, 5, 7, device="cuda"), torch.randn(2, 3, 5, 7, device="cuda")
    coeffs = torch.tensor([1.4, 0.7, -0.2, 0.95, 0.3, -0.6], dtype=torch.float64)
    h_ref = hist.clone()
    a = dpm_solver_update(x, out, x, hist, coeffs, 0, backend="cpp")
    b = dpm_solver_update_reference(x, out, x, h_ref, coeffs, 0)
    assert _rel(a, b) <= 1e-6 and _rel(hist, h_ref) <= 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["python", "cpp"])
def test_cuda_graph_sampling_equals_eager_sampling(backend):
    if backend == "cpp" and not cpp_available("cuda"):
        pytest.skip("CUDA kernels not built")
    ns = NoiseScheduleVP("linear")
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 16, 3, padding=1), torch.nn.GELU(), torch.nn.Conv2d(16, 4, 3, padding=1)).cuda()

    def model(x, t, y):
        return net(x + 0.01 * (t.view(-1, 1, 1, 1) / 1000 + y.view(-1, 1, 1, 1)))

    y, y_null = torch.arange(8, device="cuda") % 3, torch.full((8,), 10, device="cuda")
    fn = model_wrapper(model, ns, guidance_type="classifier-free", condition=y, unconditional_condition=y_null, guidance_scale=1.4)
    x = torch.randn(8, 4, 16, 16, device="cuda")
    graph_solver = DPMSolver(fn, ns, "dpmsolver++", backend=backend, cuda_graph=True)
    eager = DPMSolver(fn, ns, "dpmsolver++", backend=backend, cuda_graph=False).sample(x, steps=10, order=3, method="singlestep")
    first = graph_solver.sample(x, steps=10, order=3, method="singlestep")
    assert graph_solver._graphs, "the loop was not captured"
    torch.testing.assert_close(first, eager, rtol=1e-5, atol=1e-5)
    x2 = torch.randn_like(x)
    y.copy_(torch.arange(8, device="cuda") % 5)  # conditioning is read in place by the replay
    replay = graph_solver.sample(x2, steps=10, order=3, method="singlestep")
    eager2 = DPMSolver(fn, ns, "dpmsolver++", backend=backend, cuda_graph=False).sample(x2, steps=10, order=3, method="singlestep")
    torch.testing.assert_close(replay, eager2, rtol=1e-5, atol=1e-5)
