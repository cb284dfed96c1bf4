"""MNIST-format idx files (MNIST, Fashion-MNIST, KMNIST...), plain or gzipped.

`data.name=mnist_idx data.root=DIR` with, in DIR:
    train-images-idx3-ubyte  train-labels-idx1-ubyte  t10k-images-idx3-ubyte  t10k-labels-idx1-ubyte
(each optionally `.gz`). idx layout: 2 zero bytes, a type code (0x08 = uint8), the number of dimensions,
then each dimension as a big-endian uint32, then the data row-major.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from ..utils import UserError
from .embedded import ArrayDataset

FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def _find(root: Path, name: str) -> Path:
    for cand in (root / name, root / f"{name}.gz"):
        if cand.is_file():
            return cand
    # the common mis-spelling with a dot (train-images.idx3-ubyte) gets a pointed hint
    dotted = name.replace("-idx", ".idx")
    near = [p.name for p in (root / dotted, root / f"{dotted}.gz") if p.is_file()]
    hint = f" (found {near[0]}: rename it)" if near else ""
    raise UserError(f"{root / name}[.gz] is missing{hint}; data.root must hold the four MNIST idx files")


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (optionally gzipped) of unsigned bytes -> uint8 array of its shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise UserError(f"{path}: not an idx file (bad magic number)")
    if raw[2] != 0x08:
        raise UserError(f"{path}: idx data type 0x{raw[2]:02x} is not unsigned byte (0x08)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path}: truncated idx header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    n = int(np.prod(shape)) if shape else 0
    if len(raw) - header != n:
        raise UserError(f"{path}: header says {shape} ({n} bytes) but {len(raw) - header} bytes follow; the file is truncated or not idx")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_mnist_idx(root: str | Path) -> ArrayDataset:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"data.root={root}: no such directory; it must hold the four MNIST idx files")
    arrays = {k: read_idx(_find(root, v)) for k, v in FILES.items()}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise UserError(
                f"{root}: {FILES['x_' + split]} holds {x.shape} and {FILES['y_' + split]} {y.shape}; expected [N, H, W] images and N labels"
            )
    num = int(max(arrays["y_train"].max(initial=0), arrays["y_test"].max(initial=0))) + 1
    return ArrayDataset(
        name="mnist_idx",
        x_train=np.ascontiguousarray(arrays["x_train"][:, None]),
        y_train=arrays["y_train"].astype(np.int64),
        x_test=np.ascontiguousarray(arrays["x_test"][:, None]),
        y_test=arrays["y_test"].astype(np.int64),
        classes=[str(i) for i in range(num)],
    )
