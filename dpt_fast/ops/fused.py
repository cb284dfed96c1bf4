"""Fused elementwise ops of the U-ViT block: (residual add +) LayerNorm (+ adaLN modulate), and bias + GELU.

Each op runs the Triton kernel of `dpt_fast.kernels` or its PyTorch reference (same math, same file):

    DPT_FAST_KERNELS=auto       (default) Triton for CUDA tensors, the reference on CPU
    DPT_FAST_KERNELS=triton     Triton everywhere (CPU tensors need TRITON_INTERPRET=1 set before start)
    DPT_FAST_KERNELS=reference  the PyTorch reference everywhere

Under `torch.compile` the reference is traced, so that Inductor fuses it with its neighbours itself.
Under autocast the outputs come in the autocast dtype (what the next Linear consumes), computed in fp32.
The choice is logged once per (op, backend, device type).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..kernels import bias_gelu as _bg
from ..kernels import layernorm as _ln
from ..utils import UserError, log

MODES = ("auto", "triton", "reference")
_logged: set[tuple[str, str, str]] = set()


def kernels_mode() -> str:
    """DPT_FAST_KERNELS ('auto' when unset); a bad value is a UserError."""
    mode = os.environ.get("DPT_FAST_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise UserError(f"DPT_FAST_KERNELS={mode!r} is not one of {', '.join(MODES)}; unset it or pick one")
    return mode


def use_triton(op: str, t: torch.Tensor) -> bool:
    """Whether `op` on tensor `t` runs the Triton kernel (see the module docstring); logs the choice once."""
    if torch.compiler.is_compiling():
        return False
    mode = kernels_mode()
    if mode == "triton":
        if _ln.triton is None:
            raise UserError("DPT_FAST_KERNELS=triton but triton is not installed; pip install triton or unset it")
        if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise UserError("DPT_FAST_KERNELS=triton on CPU needs TRITON_INTERPRET=1 in the environment at start; "
                            "set it or unset DPT_FAST_KERNELS")
        triton_ = True
    else:
        triton_ = mode == "auto" and t.is_cuda and _ln.triton is not None
    key = (op, "triton" if triton_ else "reference", t.device.type)
    if key not in _logged:
        _logged.add(key)
        log.info("kernel %s: %s on %s", *key)
    return triton_


def _out_dtype(t: torch.Tensor) -> Optional[torch.dtype]:
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
               shift: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """LN(x) over the last dim of x [B, L, D] (affine when weight/bias [D] are given), then, with shift/scale
    [B, D], the adaLN modulate LN(x) * (1 + scale[b]) + shift[b]."""
    fn = _ln.fused_layer_norm if use_triton("layer_norm", x) else _ln.layer_norm_reference
    return fn(x, weight, bias, eps, shift=shift, scale=scale, out_dtype=_out_dtype(x))[1]


def add_layer_norm(x: torch.Tensor, delta: torch.Tensor, weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], eps: float, gate: Optional[torch.Tensor] = None,
                   shift: Optional[torch.Tensor] = None,
                   scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add and the next LayerNorm in one pass: x_new = x + gate[b] * delta (gate optional),
    y = layer_norm(x_new, ...). Returns (x_new, y); x, delta [B, L, D], gate [B, D]."""
    fn = _ln.fused_layer_norm if use_triton("add_layer_norm", x) else _ln.layer_norm_reference
    return fn(x, weight, bias, eps, delta=delta, gate=gate, shift=shift, scale=scale, out_dtype=_out_dtype(x))


def bias_gelu(h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU(h + bias), exact (erf) GELU; h [..., N] (a Linear's output without its bias), bias [N]."""
    fn = _bg.fused_bias_gelu if use_triton("bias_gelu", h) else _bg.bias_gelu_reference
    return fn(h, bias, out_dtype=_out_dtype(h))
