"""U-ViT (Bao et al., CVPR 2023): a ViT with long skip connections for diffusion, as DPT's stage-2 backbone.

The architecture and parameter names follow the official `baofff/U-ViT` `libs/uvit.py`, so an official
`nnet.pth` state dict loads into `UViT` key for key (see `dpt_fast.models.official`):

    x [B, C, H, W] --Conv2d(p, stride p)--> patch tokens [B, L, D]
    tokens = [label token, time token, patch tokens] + pos_embed          (token conditioning, the paper's)
    depth//2 in-blocks (each output pushed on a stack), 1 mid-block,
    depth//2 out-blocks, each first mixing Linear(2D -> D)(concat(x, stack.pop()))
    final LayerNorm -> Linear(D -> p*p*C) -> drop the extra tokens -> unpatchify -> optional 3x3 conv

Every block is pre-LN: x + Attn(LN(x)), then x + MLP(LN(x)) with GELU and hidden width mlp_ratio * D.

`conditioning='adaln'` is our DiT-style alternative: no extra tokens; time + class embeddings drive a zero-
initialised per-block shift/scale/gate (adaLN-Zero). Token conditioning stays the default.

The hot ops (attention, LayerNorm(+modulate), bias+GELU) go through `dpt_fast.ops`, which picks Triton /
xformers / SDPA kernels on CUDA and plain PyTorch on CPU.

Time input: `timesteps` is used as given (the official models take 999*t or the discrete index); the caller
converts (`dpt_fast.diffusion.schedule.model_time`).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.utils.checkpoint

from .. import ops


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of (possibly fractional) timesteps [B]: cos features first, then sin.

    Frequencies are max_period^(-i/half) for i < half = dim//2; an odd dim gets a trailing zero.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def unpatchify(x: torch.Tensor, channels: int, patch_size: int) -> torch.Tensor:
    """[B, h*w, p*p*C] -> [B, C, h*p, w*p]: the official 'B (h w) (p1 p2 C) -> B C (h p1) (w p2)'."""
    B, L, _ = x.shape
    h = w = int(math.isqrt(L))
    assert h * w == L and x.shape[2] == patch_size * patch_size * channels
    x = x.reshape(B, h, w, patch_size, patch_size, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, h * patch_size, w * patch_size)


class PatchEmbed(nn.Module):
    """[B, C, H, W] -> [B, (H/p)*(W/p), D] by a stride-p convolution."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[2] % self.patch_size == 0 and x.shape[3] % self.patch_size == 0
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention; the kernel (xformers / SDPA / math) is chosen by `ops.attention`."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, qk_scale: Optional[float] = None):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(ops.attention(self.qkv(x), self.num_heads, self.scale))


class Mlp(nn.Module):
    """Linear -> GELU (exact, erf) -> Linear. fc1's bias is added inside the fused bias+GELU op."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.linear(x, self.fc1.weight)
        return self.fc2(ops.bias_gelu(h, self.fc1.bias))


class Block(nn.Module):
    """Pre-LN transformer block; out-blocks first mix in their long skip with Linear(2D -> D).

    With `adaln=True` the norms have no affine parameters and `adaLN_modulation(c)` gives per-sample
    (shift, scale, gate) for the attention and the MLP branch: x + gate * f(LN(x) * (1 + scale) + shift).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, skip: bool = False, adaln: bool = False,
                 use_checkpoint: bool = False):
        super().__init__()
        # DiT's adaLN norms carry no affine parameters (the modulation replaces them) and use eps 1e-6.
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=not adaln, eps=1e-6 if adaln else 1e-5)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=not adaln, eps=1e-6 if adaln else 1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim)) if adaln else None
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None,
                c: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, skip, c, use_reentrant=False)
        return self._forward(x, skip, c)

    def _forward(self, x: torch.Tensor, skip: Optional[torch.Tensor], c: Optional[torch.Tensor]) -> torch.Tensor:
        if self.skip_linear is not None:
            # Under autocast the Linear gives bf16: back to the residual stream's dtype (fp32 under autocast, as
            # in the in-blocks, where the fp32 embeddings promote it), so that every block adds and normalises in
            # fp32, the setting the fused LayerNorm kernels are built and register-checked for (FWD_SIGNATURE).
            x = self.skip_linear(torch.cat([x, skip], dim=-1)).to(x.dtype)
        # The attention branch's residual add is fused with norm2 (one pass over x instead of two).
        if self.adaLN_modulation is None:
            h = ops.layer_norm(x, self.norm1.weight, self.norm1.bias, self.norm1.eps)
            x, h = ops.add_layer_norm(x, self.attn(h), self.norm2.weight, self.norm2.bias, self.norm2.eps)
            return x + self.mlp(h)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)  # each [B, D]
        h = ops.layer_norm(x, None, None, self.norm1.eps, shift=shift1, scale=scale1)
        x, h = ops.add_layer_norm(x, self.attn(h), None, None, self.norm2.eps, gate=gate1, shift=shift2,
                                  scale=scale2)
        return x + gate2[:, None] * self.mlp(h)


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position table: float32 [grid * grid, dim], row-major patches; half the
    channels encode the row, half the column, each as sin/cos of position * 10000^(-k / (dim / 4))."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def enc(p: torch.Tensor) -> torch.Tensor:
        a = p.reshape(-1, 1) * omega
        return torch.cat([a.sin(), a.cos()], dim=1)

    return torch.cat([enc(rows), enc(cols)], dim=1).float()


class UViT(nn.Module):
    """U-ViT noise predictor: forward(x [B, C, H, W], timesteps [B], y [B] int64 or None) -> [B, C, H, W].

    `num_classes` counts the null class used for classifier-free guidance (e.g. 11 for MNIST, null = 10);
    `num_classes <= 0` builds an unconditional model. With a conditional model `y=None` means the null class
    (num_classes - 1) for every sample.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, mlp_time_embed: bool = False, num_classes: int = -1,
                 use_checkpoint: bool = False, conv: bool = True, skip: bool = True,
                 conditioning: str = "token", pos_embed_init: str = "trunc_normal"):
        super().__init__()
        if conditioning not in ("token", "adaln"):
            raise ValueError(f"conditioning must be 'token' or 'adaln', got {conditioning!r}")
        if pos_embed_init not in ("trunc_normal", "sincos"):
            raise ValueError(f"pos_embed_init must be 'trunc_normal' or 'sincos', got {pos_embed_init!r}")
        self.pos_embed_init = pos_embed_init
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        self.num_features = self.embed_dim = embed_dim
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.num_classes = num_classes
        self.conditioning = conditioning
        adaln = conditioning == "adaln"

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        num_patches = (img_size // patch_size) ** 2
        self.time_embed = nn.Sequential(
            nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(), nn.Linear(4 * embed_dim, embed_dim)
        ) if mlp_time_embed else nn.Identity()
        if num_classes > 0:
            self.label_emb = nn.Embedding(num_classes, embed_dim)
        # Token conditioning prepends [label,] time tokens; adaLN conditions through the modulation instead.
        self.extras = 0 if adaln else (2 if num_classes > 0 else 1)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + num_patches, embed_dim))

        def block(skip_: bool) -> Block:
            return Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, skip=skip_, adaln=adaln,
                         use_checkpoint=use_checkpoint)

        self.in_blocks = nn.ModuleList([block(False) for _ in range(depth // 2)])
        self.mid_block = block(False)
        self.out_blocks = nn.ModuleList([block(skip) for _ in range(depth // 2)])

        self.norm = nn.LayerNorm(embed_dim, elementwise_affine=not adaln, eps=1e-6 if adaln else 1e-5)
        self.final_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, 2 * embed_dim)) if adaln else None
        self.patch_dim = patch_size ** 2 * in_chans
        self.decoder_pred = nn.Linear(embed_dim, self.patch_dim, bias=True)
        self.final_layer = nn.Conv2d(in_chans, in_chans, 3, padding=1) if conv else nn.Identity()
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official init: trunc_normal(std .02) on every Linear and pos_embed, zero biases, LN (1, 0).

        Conv2d and Embedding keep PyTorch's defaults, as in the official code. adaLN-Zero additionally
        zeroes the modulation layers and the output projection, so every block starts as the identity.
        pos_embed_init="sincos" starts the (still learned) patch positions at the 2-D sin-cos table of
        MAE / DiT and the extra tokens' at zero, so patches are told apart from the first step (std .02
        starts them nearly alike). Measured on the MNIST-5k preset at 1,000 training steps: CAS 0.85 / FID 20
        with the sin-cos start against 0.72 / 28 with the official one (README, "Stage-2 tuning").
        """
        if self.pos_embed_init == "sincos":
            grid = self.img_size // self.patch_size
            with torch.no_grad():
                self.pos_embed.zero_()
                self.pos_embed[0, self.extras:] = sincos_pos_embed_2d(self.embed_dim, grid)
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.conditioning == "adaln":
            for m in [*(b.adaLN_modulation[-1] for b in self.blocks()), self.final_adaLN_modulation[-1],
                      self.decoder_pred]:
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    def blocks(self) -> list[Block]:
        """All blocks in forward order."""
        return [*self.in_blocks, self.mid_block, *self.out_blocks]

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def forward_flops(self) -> int:
        """Matmul FLOPs of one forward pass for one image (a training step costs ~3x): the usual
        model-FLOP count for utilisation (MFU), ignoring elementwise ops, norms and softmax."""
        D, L = self.embed_dim, self.pos_embed.shape[1]
        hidden = self.mid_block.mlp.fc1.out_features
        per_block = 2 * L * D * 3 * D + 2 * 2 * L * L * D + 2 * L * D * D + 2 * 2 * L * D * hidden
        skips = sum(b.skip_linear is not None for b in self.out_blocks) * 2 * L * 2 * D * D
        adaln = sum(b.adaLN_modulation is not None for b in self.blocks()) * 2 * D * 6 * D
        patches = (self.img_size // self.patch_size) ** 2
        io = 2 * patches * D * self.patch_dim + 2 * L * D * self.patch_dim  # patch embedding, decoder_pred
        if isinstance(self.final_layer, nn.Conv2d):
            io += 2 * self.in_chans * self.in_chans * 9 * self.img_size ** 2
        if isinstance(self.time_embed, nn.Sequential):
            io += 2 * 2 * D * 4 * D
        if self.final_adaLN_modulation is not None:
            io += 2 * D * 2 * D
        return len(self.blocks()) * per_block + skips + adaln + io

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, C, H, W], timesteps [B] (float, used as given), y [B] int64 class (num_classes-1 = null)."""
        x = self.patch_embed(x)
        B, L, D = x.shape
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(B)
        # In the parameters' dtype: fp32 under autocast (as the official), bf16 for a model cast to bf16.
        t_emb = self.time_embed(timestep_embedding(timesteps, D).to(self.pos_embed.dtype))  # [B, D]
        if self.num_classes > 0:
            if y is None:
                y = torch.full((B,), self.num_classes - 1, dtype=torch.long, device=x.device)
            y_emb = self.label_emb(y)  # [B, D]
        elif y is not None:
            raise ValueError("this U-ViT is unconditional (num_classes <= 0) but a label y was given")

        c = None
        if self.conditioning == "token":
            extra = [y_emb[:, None], t_emb[:, None]] if self.num_classes > 0 else [t_emb[:, None]]
            x = torch.cat([*extra, x], dim=1)
        else:
            c = t_emb + y_emb if self.num_classes > 0 else t_emb
        x = x + self.pos_embed

        skips = []
        for blk in self.in_blocks:
            x = blk(x, c=c)
            skips.append(x)
        x = self.mid_block(x, c=c)
        for blk in self.out_blocks:
            x = blk(x, skips.pop(), c=c)

        if self.final_adaLN_modulation is None:
            x = ops.layer_norm(x, self.norm.weight, self.norm.bias, self.norm.eps)
        else:
            shift, scale = self.final_adaLN_modulation(c).chunk(2, dim=-1)
            x = ops.layer_norm(x, None, None, self.norm.eps, shift=shift, scale=scale)
        x = self.decoder_pred(x)[:, self.extras:]
        x = unpatchify(x, self.in_chans, self.patch_size)
        return self.final_layer(x)


# ----------------------------------------------------------------------------------------------
# Presets. Sizes are the paper's (Table 1; the code's depth counts in+out blocks, the mid block is extra);
# shapes follow the official configs: pixel CIFAR-10 (32, /2), pixel 64 (CelebA / ImageNet 64, /4),
# SD-VAE latents of 256 px images (4x32x32, /2) and of 512 px images (4x64x64, /4). U-ViT-H drops the
# final conv (official imagenet*_uvit_huge configs); mlp_time_embed is off in every official config.
# ----------------------------------------------------------------------------------------------
_SIZES: dict[str, dict[str, Any]] = {
    "s": dict(embed_dim=512, depth=12, num_heads=8),
    "m": dict(embed_dim=768, depth=16, num_heads=12),
    "l": dict(embed_dim=1024, depth=20, num_heads=16),
    "h": dict(embed_dim=1152, depth=28, num_heads=16, conv=False),
}
_SHAPES: dict[str, dict[str, Any]] = {
    "pixel32": dict(img_size=32, patch_size=2, in_chans=3),
    "pixel64": dict(img_size=64, patch_size=4, in_chans=3),
    "latent256": dict(img_size=32, patch_size=2, in_chans=4),
    "latent512": dict(img_size=64, patch_size=4, in_chans=4),
}
_DEFAULTS: dict[str, Any] = dict(mlp_ratio=4.0, qkv_bias=False, qk_scale=None, mlp_time_embed=False, conv=True,
                                 skip=True, pos_embed_init="trunc_normal")

UVIT_PRESETS: dict[str, dict[str, Any]] = {
    f"uvit_{size}{shape['patch_size']}_{shape_name}": {**_DEFAULTS, **shape, **dims}
    for size, dims in _SIZES.items()
    for shape_name, shape in _SHAPES.items()
}
UVIT_PRESETS.update({
    # The embedded default (MNIST-5k, 28x28), sized for a few CPU-minutes of training: 16 tokens of 7x7 pixels
    # (+ label and time tokens), 128 wide, 6 blocks with long skips; 1.5M parameters.
    # No final 3x3 conv (as U-ViT-H): with PyTorch's default init it starts as a random filter that the network
    # must first learn to undo, which costs a short CPU run most of its budget. Sin-cos start for the positions:
    # at 1000 steps CAS 0.85 / FID 20 against 0.72 / 28 with the official std-.02 start (README, stage-2 tuning).
    "uvit_mnist": {**_DEFAULTS, "img_size": 28, "patch_size": 7, "in_chans": 1, "embed_dim": 128, "depth": 6,
                   "num_heads": 2, "conv": False, "pos_embed_init": "sincos"},
    # scikit-learn digits (8x8): tiny, for tests.
    "uvit_digits": {**_DEFAULTS, "img_size": 8, "patch_size": 2, "in_chans": 1, "embed_dim": 64, "depth": 4,
                    "num_heads": 2},
})
# The paper's names for its two ImageNet-256 latent models (U-ViT-L/2 and U-ViT-H/2; docs/PAPER.md).
UVIT_ALIASES: dict[str, str] = {"U-ViT-L/2": "uvit_l2_latent256", "U-ViT-H/2": "uvit_h2_latent256"}

# ModelConfig fields that override a preset when set (0 / None / "" = keep the preset's value).
_CONFIG_KEYS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
                "mlp_time_embed", "conv", "skip", "pos_embed_init")


def uvit_kwargs(model_cfg: Any, num_classes_with_null: int) -> dict[str, Any]:
    """The UViT constructor kwargs for a ModelConfig: its preset, then every field the config sets."""
    from ..utils import UserError

    name = UVIT_ALIASES.get(model_cfg.preset, model_cfg.preset)
    if name not in UVIT_PRESETS:
        raise UserError(f"config key 'model.preset': unknown U-ViT preset {model_cfg.preset!r}; "
                        f"use one of {', '.join([*UVIT_PRESETS, *UVIT_ALIASES])}")
    kwargs = dict(UVIT_PRESETS[name])
    for key in _CONFIG_KEYS:
        value = getattr(model_cfg, key, None)
        if value is not None and value != "" and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0):
            kwargs[key] = value
    kwargs["num_classes"] = num_classes_with_null
    kwargs["use_checkpoint"] = bool(getattr(model_cfg, "use_checkpoint", False))
    kwargs["conditioning"] = getattr(model_cfg, "conditioning", "token") or "token"
    if kwargs["img_size"] % kwargs["patch_size"]:
        raise UserError(f"config keys 'model.img_size' ({kwargs['img_size']}) must be a multiple of "
                        f"'model.patch_size' ({kwargs['patch_size']})")
    if kwargs["embed_dim"] % kwargs["num_heads"]:
        raise UserError(f"config keys 'model.embed_dim' ({kwargs['embed_dim']}) must be a multiple of "
                        f"'model.num_heads' ({kwargs['num_heads']})")
    return kwargs


def build_uvit(model_cfg: Any, num_classes_with_null: int) -> UViT:
    """UViT from a `dpt_fast.config.ModelConfig`: the preset `model_cfg.preset`, overridden by its set fields.

    `num_classes_with_null` counts the null class (MNIST: 11); pass <= 0 for an unconditional model.
    """
    return UViT(**uvit_kwargs(model_cfg, num_classes_with_null))
