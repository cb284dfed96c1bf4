"""Data sets and label splits.

`load_dataset(cfg.data)` returns an `ArrayDataset` (uint8 NCHW arrays in memory) for the embedded sets.
"""
from __future__ import annotations

import torch

from ..utils import UserError
from .embedded import ArrayDataset, load_digits, load_mnist5k
from .splits import labelled_indices, load_split, save_split

__all__ = ["ArrayDataset", "load_dataset", "labelled_indices", "load_split", "save_split", "to_float", "to_uint8"]


def load_dataset(data_cfg) -> ArrayDataset:
    """The data set a config names, as in-memory arrays."""
    name = data_cfg.name
    if name == "mnist5k":
        return load_mnist5k()
    if name == "digits":
        return load_digits()
    raise UserError(f"data.name={name} is not available yet; use data.name=mnist5k or data.name=digits")


def to_float(x_uint8) -> torch.Tensor:
    """uint8 [N,C,H,W] (numpy or torch) -> float32 torch tensor in [-1, 1]."""
    t = torch.as_tensor(x_uint8)
    return t.float().div_(127.5).sub_(1.0)


def to_uint8(x_float: torch.Tensor) -> torch.Tensor:
    """float torch tensor in [-1, 1] -> uint8 torch tensor (clamped, rounded)."""
    return x_float.add(1.0).mul(127.5).round_().clamp_(0, 255).to(torch.uint8)
