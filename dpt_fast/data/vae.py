"""The Stable Diffusion KL-f8 VAE (diffusers `AutoencoderKL`), loaded from a local path only.

    from dpt_fast.data.vae import load_vae, encode_moments, decode
    vae = load_vae("sd-vae-ft-ema", device="cuda")     # a diffusers folder, or a single .safetensors/.ckpt
    z = LatentDataset(root).sample(idx, generator=g)   # [n, 4, 32, 32], already times SCALE
    images = decode(vae, z.cuda())                     # uint8 [n, 3, 256, 256], for sample grids and FID

Latents follow the paper (and the official U-ViT code): the encoder's moments (mean, logvar) are stored,
training draws z = (mean + exp(logvar / 2) * eps) * 0.18215, and decoding divides by 0.18215 first.
Nothing is downloaded: a missing path or a wrong checkpoint is a one-line UserError.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..utils import UserError, log

SCALE = 0.18215  # SD KL-f8 latent scale (LDM / U-ViT / DPT)

# diffusers config of the SD v1 KL-f8 autoencoder, for single-file checkpoints that carry no config.
SD_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": SCALE,
}

_WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def _from_single_file(path: Path, config: dict | None):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from ..models.weights import read_weights

    sd = read_weights(path, hint="pass the SD VAE (.safetensors or weights-only .ckpt) or a diffusers AutoencoderKL folder")
    vae = AutoencoderKL.from_config(config or SD_VAE_CONFIG)
    if not any(k.startswith(("encoder.down_blocks", "decoder.up_blocks")) for k in sd):
        sd = convert_ldm_vae_checkpoint(sd, vae.config)  # original LDM/SD key names -> diffusers
    try:
        missing, unexpected = vae.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches: another architecture
        first = str(e).strip().splitlines()[1].strip() if len(str(e).strip().splitlines()) > 1 else str(e)[:160]
        raise UserError(f"{path}: weights do not fit a KL-f8 AutoencoderKL ({first}); pass the SD VAE or a diffusers folder") from None
    if missing:
        raise UserError(
            f"{path}: not a KL-f8 AutoencoderKL checkpoint ({len(missing)} weights missing, e.g. {missing[0]}); "
            "pass the SD VAE or a diffusers AutoencoderKL folder"
        )
    if unexpected:
        log.info("VAE checkpoint: ignored %d extra tensors (e.g. %s)", len(unexpected), unexpected[0])
    return vae


def load_vae(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config: dict | None = None,
):
    """A diffusers `AutoencoderKL` in eval mode, from a local path; nothing is downloaded.

    path: a diffusers model folder (config.json + weights), a pipeline folder with a `vae/` sub-folder, or a
    single checkpoint file (.safetensors, or .ckpt/.pt/.pth/.bin read with weights_only=True) in diffusers
    or original LDM key names. config: the architecture of a single-file checkpoint (default: SD KL-f8).
    """
    from diffusers import AutoencoderKL

    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(
            f"--vae {p}: no such file or folder; pass a local diffusers AutoencoderKL folder or a .safetensors/.ckpt file (nothing is downloaded)"
        )
    if p.is_dir():
        sub = None
        if not (p / "config.json").is_file():
            if (p / "vae" / "config.json").is_file():
                sub = "vae"
            else:
                raise UserError(f"--vae {p}: no config.json here or in {p / 'vae'}; pass a diffusers AutoencoderKL folder")
        try:
            vae = AutoencoderKL.from_pretrained(p, subfolder=sub, local_files_only=True, low_cpu_mem_usage=False)
        except (OSError, ValueError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--vae {p}: cannot load an AutoencoderKL ({first})") from None
    elif p.suffix in _WEIGHT_SUFFIXES:
        vae = _from_single_file(p, config)
    else:
        raise UserError(f"--vae {p}: expected a folder or a {'/'.join(_WEIGHT_SUFFIXES)} file")
    vae = vae.to(device).eval().requires_grad_(False)
    if dtype != torch.float32:
        vae = vae.to(dtype)
    n = sum(t.numel() for t in vae.parameters())
    log.info("VAE: %s (%.1fM parameters, latent channels %d) on %s", p, n / 1e6, vae.config.latent_channels, device)
    return vae


@torch.no_grad()
def encode_moments(vae, images: torch.Tensor, flip: bool = True) -> torch.Tensor:
    """uint8 [n, 3, H, W] -> float32 moments [n, 2, 2c, H/8, W/8] (flip=True) or [n, 1, 2c, H/8, W/8].

    Along dim 1: the image, then its horizontal mirror. Along dim 2: mean (c channels), then logvar (c).
    """
    param = next(vae.parameters())
    x = images.to(param.device, non_blocking=True).to(param.dtype).div_(127.5).sub_(1.0)
    if flip:
        x = torch.cat([x, x.flip(-1)])
    dist = vae.encode(x).latent_dist
    m = torch.cat([dist.mean, dist.logvar], dim=1).float()  # [v*n, 2c, h, w]
    views = 2 if flip else 1
    return m.view(views, len(images), *m.shape[1:]).transpose(0, 1).contiguous()


def sample_latents(moments: torch.Tensor, generator: torch.Generator | None = None, scale: float = SCALE,
                   eps: torch.Tensor | None = None) -> torch.Tensor:
    """moments [n, 2c, h, w] (mean, logvar) -> z [n, c, h, w] = (mean + exp(logvar / 2) * eps) * scale; eps
    ~ N(0, I) from `generator` unless given."""
    mean, logvar = moments.float().chunk(2, dim=1)
    if eps is None:
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps) * scale


@torch.no_grad()
def decode(vae, z: torch.Tensor, batch_size: int = 64, scale: float = SCALE) -> torch.Tensor:
    """Scaled latents [n, c, h, w] -> uint8 images [n, 3, 8h, 8w] (SD VAE) on z's device, in batches."""
    param = next(vae.parameters())
    out = []
    for i in range(0, len(z), batch_size):
        x = vae.decode(z[i : i + batch_size].to(param.device, param.dtype) / scale).sample
        out.append(x.float().add_(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8).to(z.device))
    if not out:
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        return torch.zeros((0, 3, z.shape[-2] * f, z.shape[-1] * f), dtype=torch.uint8, device=z.device)
    return torch.cat(out)
