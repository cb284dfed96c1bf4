"""`samples.png`: a grid of generated images, one row per class (class 0 on top), upscaled to be seen."""
from __future__ import annotations

import math
import os

import numpy as np
import torch

from ..utils import UserError, atomic_path


def make_grid(images_uint8, labels, per_class: int = 10, num_classes: int = 0, min_cell: int = 64, pad: int = 2) -> np.ndarray:
    """uint8 [N, C, H, W] (C = 1 or 3) + int labels [N] -> uint8 [rows*(h+pad)+pad, cols*(w+pad)+pad, C] grid.

    Row c holds the first `per_class` images of class c (blank cells when a class has fewer); rows cover
    classes 0 .. max(num_classes, max label + 1) - 1. Each image is upscaled by an integer factor (nearest, so
    pixels stay crisp) to at least `min_cell` pixels a side: 8x8 digits become 64x64, 28x28 MNIST 84x84.
    """
    x = np.asarray(images_uint8.cpu() if torch.is_tensor(images_uint8) else images_uint8)
    y = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels).astype(np.int64).reshape(-1)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
        raise UserError(f"save_grid: expected uint8 images [N, 1 or 3, H, W], got {x.dtype} {x.shape}")
    if y.shape != (len(x),):
        raise UserError(f"save_grid: expected {len(x)} labels, got shape {y.shape}")
    rows = max(num_classes, int(y.max()) + 1 if len(y) else 0, 1)
    c, h, w = x.shape[1:]
    s = max(1, math.ceil(min_cell / max(h, w)))
    ch, cw = h * s + pad, w * s + pad
    grid = np.full((rows * ch + pad, per_class * cw + pad, c), 255, np.uint8)  # white separators and blanks
    for r in range(rows):
        for j, i in enumerate(np.flatnonzero(y == r)[:per_class]):
            img = x[i].transpose(1, 2, 0).repeat(s, axis=0).repeat(s, axis=1)
            grid[pad + r * ch : pad + r * ch + h * s, pad + j * cw : pad + j * cw + w * s] = img
    return grid


def save_grid(images_uint8, labels, path: str | os.PathLike, per_class: int = 10, num_classes: int = 0) -> None:
    """Write `make_grid(...)` as a PNG, atomically (a reader never sees a half-written file)."""
    from PIL import Image

    g = make_grid(images_uint8, labels, per_class, num_classes)
    img = Image.fromarray(g[:, :, 0] if g.shape[2] == 1 else g)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
