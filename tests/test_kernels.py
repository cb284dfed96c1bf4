"""Triton kernels vs their PyTorch references: forward and every gradient, fp32 and bf16.

On CPU the kernels run in the Triton interpreter, which triton enables only if TRITON_INTERPRET=1 is set
before its first import (its own library functions, e.g. tl.sum, are jit-decorated at import). So without
CUDA and without that variable, this file re-runs itself in a subprocess with it set (one test here; for the
detailed view run `TRITON_INTERPRET=1 pytest tests/test_kernels.py`). The interpreter is slow: shapes are
small, and the full matrix of flags runs at the smallest shape only.
"""
import copy
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from dpt_fast.utils import UserError  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"

if DEVICE == "cpu" and not IN_INTERPRETER:

    def test_kernels_in_triton_interpreter_subprocess():
        env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                           env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
        assert " passed" in r.stdout and " failed" not in r.stdout


@pytest.mark.skipif(IN_INTERPRETER, reason="interpreted kernels are not compiled")
def test_kernels_compile_to_cubin_for_sm90_without_a_gpu():
    """The interpreter does not type-check like the compiler: build the real GPU code (TTIR -> PTX -> cubin
    via triton's bundled LLVM and ptxas) for the widest variants, so GPU-only compile errors show up here.
    (Every flag/dtype variant was compiled for sm80 and sm90 once by hand, ~8 min, and checked for
    register spills with ptxas -v: none.)"""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dpt_fast.kernels import bias_gelu, layernorm

    def build(fn, types, consts, warps):
        sig = {n: "constexpr" if n in consts else types[n] for n in fn.arg_names}
        try:
            return triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": warps})
        except (ImportError, FileNotFoundError) as e:  # no CUDA backend / ptxas in this triton build
            pytest.skip(f"triton cannot build CUDA code here: {e}")

    block_m, block_d, fwd_warps, bwd_warps = layernorm._tile(1152)
    flags = dict(HAS_GATE=True, HAS_AFFINE=True, HAS_MOD=True, BLOCK_M=block_m, BLOCK_D=block_d)
    fwd, bwd, gelu = layernorm.FWD_SIGNATURE, layernorm.BWD_SIGNATURE, bias_gelu.SIGNATURE
    tiles = dict(BLOCK_M=bias_gelu._BLOCK_M, BLOCK_N=bias_gelu._BLOCK_N)
    built = [
        build(layernorm._ln_fwd_kernel, fwd, dict(HAS_RES=True, **flags), fwd_warps),
        build(layernorm._ln_bwd_kernel, bwd, dict(HAS_DXNEW=True, STORE_DDELTA=True, **flags), bwd_warps),
        build(bias_gelu._bias_gelu_fwd_kernel, gelu, tiles, bias_gelu._WARPS),
        build(bias_gelu._bias_gelu_bwd_kernel, gelu, tiles, bias_gelu._WARPS),
    ]
    assert all(len(k.asm["cubin"]) > 0 for k in built)


@pytest.mark.skipif(IN_INTERPRETER, reason="checks the model's dtypes, not the kernels")
@pytest.mark.parametrize("conditioning", ["token", "adaln"])
def test_under_bf16_autocast_every_layer_norm_gets_the_dtypes_of_the_aot_signature(monkeypatch, conditioning):
    """The residual stream stays fp32 in every block (in the out-blocks too, after the bf16 skip Linear), the
    branch outputs and modulations are bf16: exactly `layernorm.FWD_SIGNATURE`, which the cubin build above and
    bench/kernel_registers.py compile. Checked on the reference path, which sees the same tensors as the kernel."""
    from dpt_fast.kernels import layernorm
    from dpt_fast.models import UViT

    names = {"float32": "*fp32", "bfloat16": "*bf16"}
    seen = []
    real = layernorm.layer_norm_reference

    def spy(x, weight, bias, eps, delta=None, gate=None, shift=None, scale=None, out_dtype=None):
        args = dict(X=x, DELTA=delta, GATE=gate, W=weight, Bias=bias, SHIFT=shift, SCALE=scale)
        seen.append({k: names[str(v.dtype).replace("torch.", "")] for k, v in args.items() if v is not None})
        x_new, y = real(x, weight, bias, eps, delta, gate, shift, scale, out_dtype)
        seen[-1].update(XNEW=names[str(x_new.dtype).replace("torch.", "")], Y=names[str(y.dtype).replace("torch.", "")])
        return x_new, y

    monkeypatch.setattr(layernorm, "layer_norm_reference", spy)
    monkeypatch.setenv("DPT_FAST_KERNELS", "reference")
    torch.manual_seed(0)
    m = UViT(img_size=8, patch_size=2, in_chans=4, embed_dim=32, depth=4, num_heads=2, num_classes=11,
             conditioning=conditioning)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0]), torch.tensor([0, 10]))
    assert len(seen) == 2 * len(m.blocks()) + 1  # norm1 and add + norm2 of every block, the final norm
    for call in seen:
        assert all(layernorm.FWD_SIGNATURE[k] == v for k, v in call.items()), call


@pytest.fixture(scope="module")
def k():
    if DEVICE == "cpu" and not IN_INTERPRETER:
        pytest.skip("run in the Triton-interpreter subprocess (test_kernels_in_triton_interpreter_subprocess)")
    from dpt_fast.kernels import bias_gelu, layernorm

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the interpreter is single-threaded numpy; extra torch threads only contend
    yield SimpleNamespace(ln=layernorm, bg=bias_gelu)
    torch.set_num_threads(threads)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


# Relative-to-max tolerances: fp32 kernels differ from PyTorch only in summation order; bf16 results are
# within a couple of bf16 ulps (2^-8 = 3.9e-3) of the fp32 truth. A wrong formula gives errors of order 1.
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.2e-2}


def ln_case(B, L, D, dtype, affine, res, gate, mod, seed=0):
    """Inputs (on DEVICE) and output-cotangents of one fused_layer_norm call."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    args = dict(x=r(B, L, D).to(dtype), weight=r(D) * 0.5 + 1 if affine else None, bias=r(D) if affine else None,
                delta=r(B, L, D).to(dtype) if res else None, cond=r(B, 6 * D) * 0.5 if (gate or mod) else None)
    return args, dict(gate=gate, mod=mod, D=D), r(B, L, D), r(B, L, D)


def ln_run(fn, args, flags, gy, gx, upcast=False):
    """Forward + backward of fn; returns [x_new?, y, grad of every tensor input] (inputs upcast to fp32 if asked).

    gate/shift/scale are strided chunks of one [B, 6D] leaf, as the model's adaLN_modulation output is.
    """
    leaves = {n: None if t is None else (t.float() if upcast else t).detach().clone().requires_grad_()
              for n, t in args.items()}
    cond, D = leaves["cond"], flags["D"]
    x_new, y = fn(leaves["x"], leaves["weight"], leaves["bias"], 1e-5, delta=leaves["delta"],
                  gate=cond[:, :D] if flags["gate"] else None, shift=cond[:, D:2 * D] if flags["mod"] else None,
                  scale=cond[:, 2 * D:3 * D] if flags["mod"] else None)
    loss = (y.float() * gy).sum()
    if args["delta"] is not None:
        loss = loss + (x_new.float() * gx).sum()
    loss.backward()
    out = ([x_new] if args["delta"] is not None else []) + [y]
    assert all(t.grad.dtype == t.dtype for t in leaves.values() if t is not None)
    return out + [t.grad for t in leaves.values() if t is not None]


def check_ln(k, B, L, D, dtype, affine, res, gate, mod):
    args, flags, gy, gx = ln_case(B, L, D, dtype, affine, res, gate, mod)
    got = ln_run(k.ln.fused_layer_norm, args, flags, gy, gx)
    want = ln_run(k.ln.layer_norm_reference, args, flags, gy, gx, upcast=True)  # fp32 truth, same inputs
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape
        assert rel_err(a, b) <= TOL[dtype], f"output/grad #{i}: rel err {rel_err(a, b):.2e}"


FLAGS = {  # (affine, res, gate, mod)
    "ln": (True, False, False, False),
    "ln_no_affine": (False, False, False, False),
    "add_ln": (True, True, False, False),
    "adaln_norm1": (False, False, False, True),
    "adaln_norm2": (False, True, True, True),
    "everything": (True, True, True, True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("flags", list(FLAGS), ids=list(FLAGS))
def test_layer_norm_kernel_every_variant_small(k, flags, dtype):
    check_ln(k, 2, 17, 72, dtype, *FLAGS[flags])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B, L, D", [(1, 258, 72), (1, 17, 512), (1, 17, 1152)])
@pytest.mark.parametrize("flags", ["add_ln", "adaln_norm2"])
def test_layer_norm_kernel_wide_and_long(k, B, L, D, flags, dtype):
    check_ln(k, B, L, D, dtype, *FLAGS[flags])


def test_layer_norm_kernel_output_dtype_and_mixed_residual(k):
    # Under autocast the residual stream is fp32 and the branch output bf16: x_new stays fp32, y is bf16.
    x = torch.randn(1, 5, 72, device=DEVICE)
    delta = torch.randn(1, 5, 72, device=DEVICE).bfloat16()
    w, b = torch.ones(72, device=DEVICE), torch.zeros(72, device=DEVICE)
    x_new, y = k.ln.fused_layer_norm(x, w, b, 1e-5, delta=delta, out_dtype=torch.bfloat16)
    assert x_new.dtype == torch.float32 and y.dtype == torch.bfloat16
    torch.testing.assert_close(x_new, x + delta.float())


def test_layer_norm_kernel_rejects_bad_modulation_shape(k):
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="shift must be"):
        k.ln.fused_layer_norm(x, None, None, 1e-5, shift=torch.zeros(3, 8), scale=torch.zeros(3, 8))


def bg_run(fn, h, bias, gy, upcast=False):
    h = (h.float() if upcast else h).detach().clone().requires_grad_()
    bias = bias.detach().clone().requires_grad_()
    y = fn(h, bias)
    (y.float() * gy).sum().backward()
    return [y, h.grad, bias.grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M, N", [(17, 72), (258, 512), (17, 1152), (40, 4 * 72)])
def test_bias_gelu_kernel_matches_reference(k, M, N, dtype):
    g = torch.Generator().manual_seed(M + N)
    h = (torch.randn(M, N, generator=g) * 2).to(DEVICE, dtype)
    bias = torch.randn(N, generator=g).to(DEVICE)
    gy = torch.randn(M, N, generator=g).to(DEVICE)
    got = bg_run(k.bg.fused_bias_gelu, h, bias, gy)
    want = bg_run(k.bg.bias_gelu_reference, h, bias, gy, upcast=True)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel_err(a, b) <= TOL[dtype], f"output/grad #{i}: rel err {rel_err(a, b):.2e}"


def test_bias_gelu_kernel_keeps_leading_dims(k):
    h = torch.randn(2, 3, 72, device=DEVICE)
    bias = torch.randn(72, device=DEVICE)
    torch.testing.assert_close(k.bg.fused_bias_gelu(h, bias), k.bg.bias_gelu_reference(h, bias))


def test_gelu_derivative_formula_matches_autograd(k):
    z = torch.linspace(-6, 6, 101, dtype=torch.float64, requires_grad=True)
    torch.nn.functional.gelu(z).sum().backward()
    torch.testing.assert_close(k.bg.gelu_grad_reference(z.detach()), z.grad)


# ---------------------------------------------------------------------------------------------- model level
def tiny_model(conditioning):
    from dpt_fast.models import UViT

    torch.manual_seed(0)
    m = UViT(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=3,
             conditioning=conditioning).to(DEVICE)
    if conditioning == "adaln":  # move off the zero init so every modulation path carries signal
        with torch.no_grad():
            for p in m.parameters():
                if p.abs().sum() == 0 and p.dim() > 0:
                    p.normal_(0, 0.05)
    return m


def model_grads(m, x, t, y):
    m.zero_grad()
    out = m(x, t, y)
    out.square().mean().backward()
    return [out.detach()] + [p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize("conditioning", ["token", "adaln"])
def test_model_kernel_path_matches_reference_path(k, monkeypatch, conditioning):
    m = tiny_model(conditioning)
    g = torch.Generator().manual_seed(3)
    x, t, y = torch.randn(2, 1, 8, 8, generator=g).to(DEVICE), torch.tensor([5.0, 600.0], device=DEVICE), \
        torch.tensor([0, 2], device=DEVICE)
    monkeypatch.setenv("DPT_FAST_KERNELS", "reference")
    ref = model_grads(m, x, t, y)
    monkeypatch.setenv("DPT_FAST_KERNELS", "triton")
    got = model_grads(m, x, t, y)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert rel_err(a, b) <= 1e-4, f"output/param-grad #{i}: rel err {rel_err(a, b):.2e}"
    # gradient checkpointing re-runs the kernels' forward during backward and must give the same gradients
    mc = copy.deepcopy(m)
    for blk in mc.blocks():
        blk.use_checkpoint = True
    for i, (a, b) in enumerate(zip(model_grads(mc, x, t, y), got)):
        assert rel_err(a, b) <= 1e-6, f"checkpointed output/param-grad #{i}: rel err {rel_err(a, b):.2e}"


def test_dispatch_modes(k, monkeypatch):
    from dpt_fast import ops

    x = torch.randn(1, 3, 8)
    monkeypatch.setenv("DPT_FAST_KERNELS", "tritonn")
    with pytest.raises(UserError, match="DPT_FAST_KERNELS='tritonn' is not one of"):
        ops.layer_norm(x, None, None, 1e-5)
    monkeypatch.setenv("DPT_FAST_KERNELS", "auto")
    assert ops.fused.use_triton("layer_norm", x) is False  # CPU tensors -> reference
    monkeypatch.setenv("DPT_FAST_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UserError, match="needs TRITON_INTERPRET=1"):
        ops.layer_norm(x, None, None, 1e-5)
