import importlib
import logging

import pytest
import torch
import torch.nn.functional as F

from dpt_fast import ops
from dpt_fast.utils import UserError

attn_mod = importlib.import_module("dpt_fast.ops.attention")  # the module (ops.attention is the function)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def per_head_loop(qkv: torch.Tensor, H: int, scale: float) -> torch.Tensor:
    """Attention written head by head from the definition, in fp64."""
    B, L, three_d = qkv.shape
    Dh = three_d // 3 // H
    q, k, v = qkv.double().view(B, L, 3, H, Dh).unbind(2)
    out = torch.empty(B, L, H, Dh, dtype=torch.float64)
    for h in range(H):
        w = torch.softmax(q[:, :, h] @ k[:, :, h].transpose(1, 2) * scale, dim=-1)
        out[:, :, h] = w @ v[:, :, h]
    return out.reshape(B, L, H * Dh)


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_flash", "math"])
@pytest.mark.parametrize("L, H, Dh", [(17, 2, 72), (10, 3, 64), (5, 1, 8)])
def test_backend_matches_per_head_definition(backend, L, H, Dh):
    torch.manual_seed(0)
    qkv = torch.randn(2, L, 3 * H * Dh)
    scale = Dh ** -0.5
    out = ops.attention(qkv, H, backend=backend)
    assert out.shape == (2, L, H * Dh)
    torch.testing.assert_close(out.double(), per_head_loop(qkv, H, scale), atol=1e-5, rtol=1e-5)


def test_custom_scale_is_used():
    torch.manual_seed(0)
    qkv = torch.randn(1, 6, 3 * 16)
    for backend in ("sdpa", "math"):
        torch.testing.assert_close(ops.attention(qkv, 2, 0.3, backend=backend).double(), per_head_loop(qkv, 2, 0.3),
                                   atol=1e-5, rtol=1e-5)  # fp32 kernels against an fp64 definition


def test_gradients_agree_between_sdpa_and_math():
    torch.manual_seed(0)
    base = torch.randn(2, 17, 3 * 2 * 72)
    grads = []
    for backend in ("sdpa", "math"):
        qkv = base.clone().requires_grad_()
        ops.attention(qkv, 2, backend=backend).sin().sum().backward()
        grads.append(qkv.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_bf16_reaches_sdpa_without_upcast(monkeypatch):
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, **kw)

    monkeypatch.setattr(attn_mod.F, "scaled_dot_product_attention", spy)
    lin = torch.nn.Linear(32, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.attention(lin(torch.randn(2, 5, 32)), 2)
    assert seen == [(torch.bfloat16,) * 3] and out.dtype == torch.bfloat16


def test_env_var_forces_backend_and_logs_it_once(monkeypatch, caplog):
    monkeypatch.setattr(attn_mod, "_logged", set())
    monkeypatch.setenv("DPT_FAST_ATTN", "math")
    calls = []
    monkeypatch.setattr(attn_mod, "attention_math", lambda q, k, v, s: calls.append(1) or q)
    qkv = torch.randn(1, 4, 3 * 8)
    with caplog.at_level(logging.INFO, logger="dpt_fast"):
        ops.attention(qkv, 1)
        ops.attention(qkv, 1)
    assert len(calls) == 2
    assert [r.getMessage() for r in caplog.records].count("attention backend: math on cpu (float32)") == 1


def test_bad_or_missing_backend_is_a_user_error(monkeypatch):
    monkeypatch.setenv("DPT_FAST_ATTN", "flashy")
    with pytest.raises(UserError, match="DPT_FAST_ATTN='flashy' is not one of"):
        ops.attention_backend()
    monkeypatch.setenv("DPT_FAST_ATTN", "xformers")
    try:
        import xformers  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="xformers is not installed"):
            ops.attention(torch.randn(1, 4, 24), 1)


def test_model_output_is_the_same_with_every_cpu_backend(monkeypatch):
    from dpt_fast.models import UViT

    torch.manual_seed(0)
    m = UViT(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 700.0]), torch.tensor([0, 2])
    outs = []
    for backend in ("sdpa", "math"):
        monkeypatch.setenv("DPT_FAST_ATTN", backend)
        outs.append(m(x, t, y))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def _torch_claims(backend: str, qkv: torch.Tensor, H: int) -> bool:
    """Whether torch says its `backend` kernel runs these inputs (SDPAParams as `ops.attention` passes them)."""
    from torch.backends import cuda as bc

    B, L, three_d = qkv.shape
    q = qkv.view(B, L, 3, H, three_d // 3 // H).permute(2, 0, 3, 1, 4)[0]
    params = bc.SDPAParams(q, q, q, None, 0.0, False, False)
    check = {"sdpa_flash": bc.can_use_flash_attention, "sdpa_efficient": bc.can_use_efficient_attention,
             "sdpa_cudnn": bc.can_use_cudnn_attention}[backend]
    return bool(check(params, False))


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "math", "xformers"])
@pytest.mark.parametrize("Dh", [64, 72])
def test_cuda_bf16_backends_match_fp64_math_forward_and_backward(backend, Dh):
    """U-ViT shapes (258 tokens; 16 heads of 64 = L/2, of 72 = H/2). A backend is skipped only when it is not
    installed (xformers) or torch itself says its kernel does not take these inputs; one that claims support
    and raises fails the test."""
    if backend == "xformers":
        pytest.importorskip("xformers")
    torch.manual_seed(0)
    H = 16
    qkv = torch.randn(4, 258, 3 * H * Dh, device="cuda")
    q16 = qkv.bfloat16().requires_grad_()
    if backend in attn_mod._SDPA_KERNELS and not _torch_claims(backend, q16, H):
        pytest.skip(f"torch: {backend} does not take bf16 head dim {Dh} on this GPU/build")
    ref_in = q16.detach().double().requires_grad_()
    ref = ops.attention(ref_in, H, backend="math")
    out = ops.attention(q16, H, backend=backend)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref.detach(), atol=2e-2, rtol=2e-2)
    grad = torch.randn(out.shape, device="cuda", dtype=torch.float64, generator=torch.Generator("cuda").manual_seed(1))
    ref.backward(grad)
    out.backward(grad.bfloat16())
    assert q16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(q16.grad.double(), ref_in.grad, atol=5e-2, rtol=5e-2)
