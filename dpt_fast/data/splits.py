"""Labelled subsets of the training set: k per class or a fraction, seeded, saved as `split.json`."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..utils import UserError, read_json, write_json


def labelled_indices(y: np.ndarray, labels_per_class: int = 1, fraction: float = 0.0, seed: int = 0) -> np.ndarray:
    """Sorted int64 indices of the labelled training images.

    fraction > 0: that share of each class (at least one image per class); otherwise `labels_per_class`
    images of each class. Same (y, k, fraction, seed) -> same indices on every machine.
    """
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = max(1, int(round(fraction * len(idx)))) if fraction > 0 else labels_per_class
        if k > len(idx):
            raise UserError(f"split.labels_per_class={k} but class {c} has only {len(idx)} training images; lower it")
        out.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(out)).astype(np.int64)


def save_split(path: str | os.PathLike, labelled: np.ndarray, num_train: int, **meta) -> None:
    write_json(path, {"labelled": [int(i) for i in labelled], "num_train": int(num_train), **meta})


def load_split(path: str | os.PathLike, num_train: int | None = None) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing; run --stage 1 first")
    d = read_json(path)
    if not isinstance(d, dict) or "labelled" not in d:
        raise UserError(f"{path}: expected a JSON object with a 'labelled' list of indices; delete it and re-run --stage 1")
    idx = np.asarray(d["labelled"], dtype=np.int64)
    if num_train is not None and (idx.size == 0 or idx.min() < 0 or idx.max() >= num_train):
        raise UserError(f"{path}: labelled indices do not fit a training set of {num_train} images; delete it and re-run --stage 1")
    return idx
