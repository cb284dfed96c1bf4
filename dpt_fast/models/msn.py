"""MSN's ViT (facebookresearch/msn `src/deit.py`, `deit_*`) as DPT's stage-1 feature extractor.

    encoder = load_msn("vitb4_300ep.pth.tar")   # ViT-B/4 inferred from the weights, fp32, CPU, eval mode
    feats = encoder(images)                      # ImageNet-normalised [B, 3, 224, 224] -> [B, 768]

The feature is DPT's: `encoder.forward_blocks(x, 1)` of the official code (ML-GSAI/DPT `train_classifier.py`,
config `blocks = 1`), i.e. the CLS token after the last block, BEFORE the final LayerNorm. The checkpoint's
`norm.*` (used only by MSN's own `forward`) and projection head `fc.*` are therefore not loaded. Other input
sizes interpolate the patch positions as MSN's `interpolate_pos_encoding` does (bicubic, by the factor
sqrt(new patches / trained patches)).

Architecture (all `deit_*` of MSN): pre-norm blocks, LayerNorm eps 1e-6, qkv bias, exact GELU, MLP ratio 4;
patch size, width and depth are read off the weights, the head count from the width (tiny 3, small 6,
base 12, large / huge 16). Attention runs through `dpt_fast.ops.attention` (torch SDPA: flash / cuDNN under
bf16 autocast on CUDA), the same function the official writes as softmax(q k^T * Dh^-0.5) v.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..utils import UserError
from .weights import read_weights, unwrap

HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}  # deit_tiny .. deit_huge
LN_EPS = 1e-6
_HINT = "pass an MSN checkpoint as written by facebookresearch/msn (e.g. vitb4_300ep.pth.tar)"


class Block(nn.Module):
    """Pre-norm transformer block, parameter names as MSN's `Block` (norm1, attn.qkv, attn.proj, norm2, mlp)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.fc1 = nn.Linear(dim, hidden)
        self.mlp.act = nn.GELU()
        self.mlp.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn.proj(ops.attention(self.attn.qkv(self.norm1(x)), self.num_heads))
        return x + self.mlp(self.norm2(x))


class MSNViT(nn.Module):
    """MSN's VisionTransformer up to its last block. forward: [B, 3, H, W] -> CLS token [B, embed_dim]."""

    def __init__(self, patch_size: int, embed_dim: int, depth: int, num_heads: int, num_patches: int,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        self.patch_size, self.embed_dim, self.num_features = patch_size, embed_dim, embed_dim
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth))

    def pos_encoding(self, npatch: int) -> torch.Tensor:
        """[1, 1 + npatch, D] positions for `npatch` patches: MSN's `interpolate_pos_encoding`."""
        n = self.pos_embed.shape[1] - 1
        if npatch == n:
            return self.pos_embed
        side, dim = math.isqrt(n), self.embed_dim
        grid = self.pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        scale = math.sqrt(npatch / n)
        new = math.isqrt(npatch)
        if math.floor(side * scale) == new:  # what MSN computes (its scale_factor call)
            grid = F.interpolate(grid, scale_factor=scale, mode="bicubic")
        else:  # float rounding makes MSN's own call fail here; the same sampling, sized explicitly
            grid = F.interpolate(grid, size=(new, new), mode="bicubic")
        return torch.cat([self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)

    def forward_blocks(self, x: torch.Tensor, num_blocks: int = 1) -> torch.Tensor:
        """The CLS tokens after the last `num_blocks` blocks, concatenated: [B, num_blocks * D] (MSN / DPT)."""
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"MSN's positions are interpolated for square inputs only, got {tuple(x.shape[-2:])}")
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        # under autocast the patches are bf16 and cat/add promote: the residual stream stays fp32, as in MSN/DPT
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        x = x + self.pos_encoding(x.shape[1] - 1)
        cls = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if len(self.blocks) - i <= num_blocks:
                cls.append(x[:, 0])
        return torch.cat(cls, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """DPT's stage-1 feature: the CLS token after the last block, before the final norm. [B, D]."""
        return self.forward_blocks(x, 1)


def infer_msn_kwargs(sd: Mapping[str, torch.Tensor], source: str = "state dict") -> dict:
    """MSNViT constructor kwargs read off the tensor shapes of an MSN encoder state dict."""
    if any(k.startswith("patch_embed.stem.") for k in sd):
        raise UserError(f"{source}: a conv-stem ViT (MSN's vitc_* / deit_small_convstem), which dpt_fast does not "
                        "implement; use a deit_* (patch) checkpoint")
    for key in ("patch_embed.proj.weight", "pos_embed", "cls_token", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight"):
        if key not in sd:
            raise UserError(f"{source}: no '{key}', so this is not an MSN ViT encoder (keys start "
                            f"{', '.join(list(sd)[:4])}); {_HINT}")
    dim, chans, p, _ = sd["patch_embed.proj.weight"].shape
    if chans != 3:
        raise UserError(f"{source}: patch_embed takes {chans} channels, not RGB; {_HINT}")
    n = sd["pos_embed"].shape[1] - 1
    if math.isqrt(n) ** 2 != n:
        raise UserError(f"{source}: pos_embed has {n} patch positions, not a square grid; {_HINT}")
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    return dict(patch_size=p, embed_dim=dim, depth=depth, num_patches=n,
                mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim, qkv_bias="blocks.0.attn.qkv.bias" in sd)


def load_msn(path_or_state_dict: Union[str, Path, Mapping[str, torch.Tensor]],
             num_heads: Optional[int] = None) -> MSNViT:
    """The MSN encoder of an official checkpoint, as DPT's stage-1 feature extractor (fp32, CPU, eval mode).

    Reads the `target_encoder` (what DPT loads) of a facebookresearch/msn `.pth.tar` with
    `torch.load(weights_only=True)` (optimizer state, prototypes, epoch and lr entries pass; nothing is
    unpickled as code), or a plain / safetensors state dict of the encoder. `num_heads` is needed only for a
    width that is not one of MSN's (192, 384, 768, 1024, 1280).
    """
    if isinstance(path_or_state_dict, (str, Path)):
        source = str(path_or_state_dict)
        sd = read_weights(path_or_state_dict, _HINT)
    else:
        source, sd = "state dict", unwrap(path_or_state_dict, "state dict", _HINT)
    arch = infer_msn_kwargs(sd, source)
    heads = num_heads or HEADS_BY_WIDTH.get(arch["embed_dim"])
    if heads is None:
        raise UserError(f"{source}: width {arch['embed_dim']} is not one of MSN's ({', '.join(map(str, HEADS_BY_WIDTH))}); "
                        "pass num_heads=...")
    model = MSNViT(num_heads=heads, **arch)
    sd = {k: v for k, v in sd.items() if not k.startswith(("fc.", "norm.", "pred."))}  # unused by the feature
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or wrong:
        what = "; ".join(f"{name}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                         for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)) if keys)
        raise UserError(f"{source}: does not match the inferred MSN ViT ({what}); {_HINT}")
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model.eval().requires_grad_(False)
