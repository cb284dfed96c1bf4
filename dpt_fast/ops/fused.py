"""Fused elementwise ops of the U-ViT block: LayerNorm (+ adaLN modulate) and bias + GELU."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
               shift: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """LN(x) over the last dim of x [B, L, D] (affine when weight/bias given), then, with shift/scale [B, D],
    the adaLN modulate LN(x) * (1 + scale[b]) + shift[b]."""
    y = F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    if scale is not None:
        y = y * (1 + scale[:, None]) + shift[:, None]
    return y


def bias_gelu(h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU(h + bias), exact (erf) GELU; h [..., N], bias [N]."""
    return F.gelu(h + bias)
