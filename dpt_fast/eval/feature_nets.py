"""Our feature networks: training (reproducible, CPU), saving/loading as safetensors, and the shipped ones.

The shipped networks live in `dpt_fast/assets/<data>_feature_net.safetensors`, each with a JSON beside it
(architecture, train/test accuracy, sha256 of the weights, the exact command that made it). They are made by

    python scripts/train_feature_net.py --data mnist5k --out dpt_fast/assets/mnist5k_feature_net.safetensors

and play for MNIST-5k / digits the part Inception plays for ImageNet: a fixed judge trained on all labels of
the train split. The architecture is stored in the safetensors header as well, so a file is self-contained.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..models.feature_net import FeatureNet
from ..utils import UserError, file_sha256, log, save_safetensors

ASSETS = Path(__file__).resolve().parents[1] / "assets"
SHIPPED = ("mnist5k", "digits")


def shipped_feature_net(data_name: str) -> Path:
    """Path of the feature network shipped for an embedded data set."""
    if data_name not in SHIPPED:
        raise UserError(
            f"no feature network ships for data.name={data_name}; set eval.feature_net to a local torch-fidelity "
            f"Inception weights file (.pth) or to one trained with scripts/train_feature_net.py (.safetensors)"
        )
    return ASSETS / f"{data_name}_feature_net.safetensors"


# ----------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------
def arch_kwargs(net: FeatureNet) -> dict:
    widths = [s[0][0].out_channels for s in net.stages]
    return {
        "in_chans": net.in_chans,
        "widths": widths,
        "feature_dim": net.feature_dim,
        "num_classes": net.num_classes,
        "img_size": net.img_size,
        "dropout": net.dropout.p,
    }


def save_feature_net(net: FeatureNet, path: str | os.PathLike) -> str:
    """Write the weights (+ architecture in the header) atomically; return the file's sha256."""
    save_safetensors(path, net.state_dict(), {"arch": json.dumps(arch_kwargs(net), sort_keys=True)})
    return file_sha256(path)


def load_feature_net(path: str | os.PathLike, device: str | torch.device = "cpu") -> FeatureNet:
    """Load a FeatureNet from safetensors (no unpickling); eval mode, no grads."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"feature network {path} does not exist; set eval.feature_net to an existing file or train one with scripts/train_feature_net.py")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
        net = FeatureNet(**json.loads(meta["arch"]))
        net.load_state_dict(state)
    except (SafetensorError, KeyError, TypeError, ValueError, RuntimeError, OSError) as e:
        raise UserError(f"{path}: not a feature network made by scripts/train_feature_net.py ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    return net.to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Inference
# ----------------------------------------------------------------------------------------------
def uint8_to_input(x: torch.Tensor) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float32 in [-1, 1], the network's input range (same map as data.to_float)."""
    return x.float().div(127.5).sub(1.0)


@torch.no_grad()
def predict(net: FeatureNet, images_uint8, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, feature_dim] and logits [N, num_classes] (float32, CPU) of uint8 images [N, C, H, W]."""
    x = torch.as_tensor(np.asarray(images_uint8) if not torch.is_tensor(images_uint8) else images_uint8)
    device = next(net.parameters()).device
    feats, logits = [], []
    for i in range(0, len(x), batch_size):
        f, l = net(uint8_to_input(x[i : i + batch_size].to(device)))
        feats.append(f.cpu())
        logits.append(l.cpu())
    if not feats:
        return torch.zeros(0, net.feature_dim), torch.zeros(0, net.num_classes)
    return torch.cat(feats), torch.cat(logits)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def augment(x01: torch.Tensor, gen: torch.Generator, max_shift: float, max_rot_deg: float, max_scale: float) -> torch.Tensor:
    """Random small shifts, rotations and zooms of images in [0, 1] (background 0), one transform per image.

    `max_shift` is a fraction of the image side (0.08 ~ 2 pixels of 28). Generated digits are often a little
    off-centre or tilted; a judge trained on these variations does not punish that as "wrong class".
    """
    b = x01.shape[0]
    u = lambda: torch.rand(b, generator=gen) * 2 - 1  # noqa: E731  uniform in [-1, 1]
    ang = u() * math.radians(max_rot_deg)
    s = 1.0 + u() * max_scale
    tx, ty = u() * 2 * max_shift, u() * 2 * max_shift  # affine_grid's coordinates span 2 per side
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x01.shape), align_corners=False)
    return F.grid_sample(x01, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def train_feature_net(
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    widths: tuple[int, ...] = (16, 32, 64),
    feature_dim: int = 128,
    epochs: int = 15,
    max_steps: int = 0,
    batch_size: int = 128,
    lr: float = 3e-3,
    weight_decay: float = 5e-4,
    max_shift: float = 0.08,
    max_rot_deg: float = 10.0,
    max_scale: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    num_classes: int = 0,
) -> FeatureNet:
    """Train a FeatureNet on uint8 images [N, C, H, W] with int labels [N]; deterministic for a given seed
    and thread count (CPU). AdamW with a one-cycle schedule, cross-entropy, light augmentation.

    `max_steps` > 0 stops early (for the script's smoke test). `num_classes` 0 = max label + 1.
    """
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        x = torch.as_tensor(x_train)
        y = torch.as_tensor(y_train, dtype=torch.int64)
        net = FeatureNet(x.shape[1], tuple(widths), feature_dim, num_classes or int(y.max()) + 1, img_size=int(x.shape[-1]))
        steps_per_epoch = math.ceil(len(x) / batch_size)
        total = epochs * steps_per_epoch if max_steps <= 0 else min(max_steps, epochs * steps_per_epoch)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.15)
        net.train()
        step = 0
        with tqdm(total=total, desc="feature net", unit="step", disable=not progress) as bar:
            while step < total:
                perm = torch.randperm(len(x), generator=gen)
                for i in range(0, len(x), batch_size):
                    idx = perm[i : i + batch_size]
                    xb = augment(x[idx].float() / 255.0, gen, max_shift, max_rot_deg, max_scale) * 2 - 1
                    _, logits = net(xb)
                    loss = F.cross_entropy(logits, y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    step += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.3f}")
                    if step >= total:
                        break
    finally:
        torch.use_deterministic_algorithms(prev_det)
    log.info("feature net: trained %d steps on %d images", total, len(x))
    return net.eval().requires_grad_(False)


def accuracy(net: FeatureNet, images_uint8, labels) -> float:
    """Top-1 of the network's logits on uint8 images [N, C, H, W] with int labels [N]."""
    _, logits = predict(net, images_uint8)
    return float((logits.argmax(1) == torch.as_tensor(labels)).float().mean())
