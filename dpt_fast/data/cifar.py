"""CIFAR-10 from its python batches (`cifar-10-batches-py`), without running pickle code.

`data.name=cifar10 data.root=DIR`, DIR being the `cifar-10-batches-py` folder or its parent. Train = the
five `data_batch_*` (50,000 images), test = `test_batch` (10,000), classes from `batches.meta`.

The batches *are* pickles (written by Python 2's cPickle), and unpickling can call any importable function.
`_SafeUnpickler` resolves only the globals a pickled numpy array needs (numpy's `_reconstruct`, `ndarray`
and `dtype`, plus `_codecs.encode` restricted to latin1, which batches re-pickled by Python 3 use for byte
strings) and refuses every other one, so a tampered file fails with a UserError instead of running code.
Everything else in the batches is plain dicts, lists, ints and strings.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from ..utils import UserError
from .embedded import ArrayDataset

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"


def _numpy_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    allowed = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = _reconstruct
    for mod in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "ndarray")] = np.ndarray
        allowed[(mod, "dtype")] = np.dtype
    allowed[("_codecs", "encode")] = _latin1_encode
    return allowed


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """What Python 3 pickles (protocol < 3) call to rebuild a bytes object; only the latin1 form is accepted."""
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError(f"refusing codec {encoding!r}")
    return text.encode("latin1", errors)


class _SafeUnpickler(pickle.Unpickler):
    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str):
        obj = self._allowed.get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return obj


def read_batch(path: Path) -> dict:
    """One CIFAR python batch -> dict with str keys ('data', 'labels', ...); UserError if unsafe or broken."""
    try:
        with open(path, "rb") as f:
            # latin1: Python 2 byte strings (the array buffers among them) arrive as str without decoding errors
            d = _SafeUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise UserError(f"{path} is missing; data.root must be the {FOLDER} folder (or its parent) of the CIFAR-10 python version") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise UserError(f"{path}: not a readable CIFAR-10 python batch ({e}); re-extract cifar-10-python.tar.gz") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: not a CIFAR-10 python batch (no dict inside)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


def _images_labels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = read_batch(path)
    if "data" not in d or "labels" not in d:
        raise UserError(f"{path}: missing 'data' or 'labels'; is this the CIFAR-10 (not CIFAR-100) python version?")
    x = np.asarray(d["data"])
    y = np.asarray(d["labels"], dtype=np.int64)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y):
        raise UserError(f"{path}: expected uint8 data [N, 3072] and N labels, got {x.dtype} {x.shape} and {len(y)}")
    return x.reshape(-1, 3, 32, 32), y  # rows are R(1024) G(1024) B(1024), each row-major 32x32


def find_folder(root: str | Path) -> Path:
    root = Path(root).expanduser()
    for cand in (root, root / FOLDER):
        if (cand / TEST_BATCH).is_file() or (cand / TRAIN_BATCHES[0]).is_file():
            return cand
    raise UserError(f"{root}: no {FOLDER}/{TRAIN_BATCHES[0]} here; point data.root at the extracted CIFAR-10 python version")


def load_cifar10(root: str | Path) -> ArrayDataset:
    folder = find_folder(root)
    parts = [_images_labels(folder / b) for b in TRAIN_BATCHES]
    x_test, y_test = _images_labels(folder / TEST_BATCH)
    meta = read_batch(folder / META) if (folder / META).is_file() else {}
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get("label_names", [])]
    num = int(max(y_test.max(initial=0), *(y.max(initial=0) for _, y in parts))) + 1
    classes = names if len(names) >= num else [str(i) for i in range(num)]
    return ArrayDataset(
        name="cifar10",
        x_train=np.ascontiguousarray(np.concatenate([x for x, _ in parts])),
        y_train=np.concatenate([y for _, y in parts]),
        x_test=np.ascontiguousarray(x_test),
        y_test=y_test,
        classes=classes,
    )
