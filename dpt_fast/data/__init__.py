"""Data sets and label splits.

`load_dataset(cfg.data)` returns an `ArrayDataset` (uint8 NCHW arrays in memory): the embedded sets
(mnist5k, digits), CIFAR-10 python batches (cifar10), MNIST idx files (mnist_idx) and small ImageFolders
decoded at `data.image_size` (imagefolder). Large ImageFolders are prepared once into memory-mapped shards
(`python -m dpt_fast.data.prepare`) and read with `dpt_fast.data.latents.LatentDataset` (data.name=latents);
`dpt_fast.data.stream` streams the images of any of them in batches (stages 1 and 3 on latents).
"""
from __future__ import annotations

import torch

from ..utils import UserError
from .embedded import ArrayDataset, load_digits, load_mnist5k
from .splits import labelled_indices, load_split, read_subset_file, save_split, select_labelled, write_subset_file

__all__ = [
    "ArrayDataset",
    "load_dataset",
    "labelled_indices",
    "load_split",
    "save_split",
    "read_subset_file",
    "write_subset_file",
    "select_labelled",
    "to_float",
    "to_uint8",
]


def load_dataset(data_cfg, progress: bool = True) -> ArrayDataset:
    """The data set a config names, as in-memory arrays (`progress`: bars while an ImageFolder is decoded).

    data.name=latents is not in memory: stage 2 reads it with `dpt_fast.data.latents.LatentDataset`, stages 1
    and 3 stream its source images with `dpt_fast.data.stream.open_real_data`.
    """
    name = data_cfg.name
    if name == "mnist5k":
        return load_mnist5k()
    if name == "digits":
        return load_digits()
    if name in ("cifar10", "mnist_idx", "imagefolder") and not data_cfg.root:
        raise UserError(f"data.name={name} needs data.root=DIR (the folder holding the data set)")
    if name == "cifar10":
        from .cifar import load_cifar10

        return load_cifar10(data_cfg.root)
    if name == "mnist_idx":
        from .mnist_idx import load_mnist_idx

        return load_mnist_idx(data_cfg.root)
    if name == "imagefolder":
        from .imagefolder import load_imagefolder

        return load_imagefolder(data_cfg, progress=progress)
    if name == "latents":
        raise UserError(
            "data.name=latents holds VAE latents, not images: read it with dpt_fast.data.latents.LatentDataset(data.root), "
            "its source images with dpt_fast.data.stream.open_real_data"
        )
    raise UserError(f"data.name={name} is unknown; use mnist5k, digits, cifar10, mnist_idx, imagefolder or latents")


def to_float(x_uint8) -> torch.Tensor:
    """uint8 [N,C,H,W] (numpy or torch) -> float32 torch tensor in [-1, 1]."""
    t = torch.as_tensor(x_uint8)
    return t.float().div_(127.5).sub_(1.0)


def to_uint8(x_float: torch.Tensor) -> torch.Tensor:
    """float torch tensor in [-1, 1] -> uint8 torch tensor (clamped, rounded)."""
    return x_float.add(1.0).mul(127.5).round_().clamp_(0, 255).to(torch.uint8)
