"""Multi-head self-attention dispatch: xformers / torch SDPA (flash, mem-efficient, cuDNN) / plain math.

    out = attention(qkv, num_heads, scale)   # qkv [B, L, 3*H*Dh] as the qkv Linear gives it -> [B, L, H*Dh]

Each backend gets q/k/v as strided views of `qkv` in its preferred layout, in the input dtype: under bf16
autocast the flash / cuDNN kernels run on bf16 directly (the official U-ViT's `.float()` before SDPA forces
a slower fp32 kernel). Head dims that are multiples of 8 (64, 72 for U-ViT-H) run on every fused backend.

Choice: `DPT_FAST_ATTN` = `xformers` | `sdpa` | `sdpa_flash` | `sdpa_efficient` | `sdpa_cudnn` | `math`
forces one; unset (or `auto`) uses torch SDPA, which itself picks flash / cuDNN / mem-efficient on CUDA and
its fused CPU kernel on CPU. xformers is optional (CUDA only) and imported only when asked for.
The backend that runs is logged once per (backend, device type).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from ..utils import UserError, log

BACKENDS = ("auto", "xformers", "sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "math")
_logged: set[tuple[str, str]] = set()


def attention_backend() -> str:
    """The backend named by DPT_FAST_ATTN ('auto' when unset); a bad value is a UserError."""
    name = os.environ.get("DPT_FAST_ATTN", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise UserError(f"DPT_FAST_ATTN={name!r} is not one of {', '.join(BACKENDS)}; unset it or pick one")
    return "sdpa" if name == "auto" else name


def _log_once(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    key = (backend, device.type)
    if key not in _logged:
        _logged.add(key)
        log.info("attention backend: %s on %s (%s)", backend, device.type, str(dtype).replace("torch.", ""))


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference attention on [B, H, L, Dh] tensors: softmax(q k^T * scale) v, the softmax in fp32."""
    attn = torch.matmul(q, k.transpose(-2, -1)).float() * scale
    return torch.matmul(attn.softmax(dim=-1).to(v.dtype), v)


_SDPA_KERNELS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION",
                 "sdpa_cudnn": "CUDNN_ATTENTION"}


def attention(qkv: torch.Tensor, num_heads: int, scale: Optional[float] = None,
              backend: Optional[str] = None) -> torch.Tensor:
    """Self-attention of qkv [B, L, 3*H*Dh] (q, k, v stacked as 'B L (3 H Dh)') -> [B, L, H*Dh].

    `scale` defaults to Dh^-0.5; `backend` overrides DPT_FAST_ATTN (for benchmarks and tests).
    """
    B, L, three_d = qkv.shape
    D = three_d // 3
    Dh = D // num_heads
    scale = Dh ** -0.5 if scale is None else scale
    backend = backend or attention_backend()
    if not torch.compiler.is_compiling():
        _log_once(backend, qkv.device, qkv.dtype)

    if backend == "xformers":
        try:
            import xformers.ops as xops
        except ImportError:
            raise UserError("DPT_FAST_ATTN=xformers but xformers is not installed; pip install xformers "
                            "(CUDA only) or unset DPT_FAST_ATTN") from None
        q, k, v = qkv.view(B, L, 3, num_heads, Dh).unbind(2)  # each [B, L, H, Dh]
        return xops.memory_efficient_attention(q, k, v, scale=scale).reshape(B, L, D)

    q, k, v = qkv.view(B, L, 3, num_heads, Dh).permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, Dh]
    if backend == "math":
        out = attention_math(q, k, v, scale)
    elif backend == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, _SDPA_KERNELS[backend])):
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2).reshape(B, L, D)
