"""CIFAR-10 python batches (read without running pickle code) and MNIST idx files, on tiny synthetic files."""
import gzip
import os
import pickle
import struct

import numpy as np
import pytest

from dpt_fast.config import DataConfig
from dpt_fast.data import load_dataset
from dpt_fast.data.cifar import read_batch
from dpt_fast.data.mnist_idx import read_idx
from dpt_fast.utils import UserError

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _pickle_like_cifar(obj) -> bytes:
    """Pickle as the CIFAR batches are: protocol 2, numpy arrays referenced via numpy.core.multiarray."""
    return pickle.dumps(obj, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def _write_cifar(folder, n=4, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        d = {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": [b"x.png"] * n}
        (folder / name).write_bytes(_pickle_like_cifar(d))
        batches[name] = (data, labels)
    (folder / "batches.meta").write_bytes(_pickle_like_cifar({b"label_names": [s.encode() for s in NAMES], b"num_vis": 3072}))
    return batches


def test_cifar10_batches_load_as_nchw_arrays(tmp_path):
    batches = _write_cifar(tmp_path / "cifar-10-batches-py")
    ds = load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))  # the parent folder works too
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32) and ds.x_train.dtype == np.uint8
    assert ds.classes == NAMES and ds.name == "cifar10"
    data, labels = batches["data_batch_2"]
    # a row is R(1024) G(1024) B(1024), each row-major 32x32
    assert np.array_equal(ds.x_train[4, 1, 0, :], data[0, 1024:1056]) and ds.y_train[4:8].tolist() == labels
    assert np.array_equal(ds.x_test.reshape(4, -1), batches["test_batch"][0])


def test_cifar10_refuses_pickles_that_would_run_code(tmp_path):
    _write_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(UserError, match="refusing to load global (posix|os).system"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))
    assert not (tmp_path / "pwned").exists()


def test_cifar10_missing_batch_names_the_expected_file(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(UserError, match=r"data_batch_4 is missing"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))
    with pytest.raises(UserError, match="no cifar-10-batches-py/data_batch_1 here"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path / "elsewhere")))
    with pytest.raises(UserError, match="needs data.root"):
        load_dataset(DataConfig(name="cifar10"))


def test_cifar_batch_with_wrong_shape_is_a_user_error(tmp_path):
    (tmp_path / "b").write_bytes(_pickle_like_cifar({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    from dpt_fast.data.cifar import _images_labels

    with pytest.raises(UserError, match=r"expected uint8 data \[N, 3072\]"):
        _images_labels(tmp_path / "b")
    assert read_batch(tmp_path / "b")["labels"] == [0, 1]


def _idx(array: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def _write_mnist(root, gz=False, n_train=6, n_test=3):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    for name, a in arrays.items():
        raw = _idx(a)
        if gz:
            with gzip.open(root / f"{name}.gz", "wb") as f:
                f.write(raw)
        else:
            (root / name).write_bytes(raw)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files_load(tmp_path, gz):
    arrays = _write_mnist(tmp_path, gz=gz)
    ds = load_dataset(DataConfig(name="mnist_idx", root=str(tmp_path)))
    assert ds.x_train.shape == (6, 1, 28, 28) and ds.x_test.shape == (3, 1, 28, 28) and ds.x_train.dtype == np.uint8
    assert np.array_equal(ds.x_train[:, 0], arrays["train-images-idx3-ubyte"])
    assert ds.y_test.tolist() == [0, 1, 2] and ds.y_train.dtype == np.int64 and len(ds.classes) >= 3


def test_mnist_idx_missing_or_misnamed_file_names_the_expected_one(tmp_path):
    _write_mnist(tmp_path)
    os.rename(tmp_path / "t10k-labels-idx1-ubyte", tmp_path / "t10k-labels.idx1-ubyte")
    with pytest.raises(UserError, match=r"t10k-labels-idx1-ubyte\[.gz\] is missing \(found t10k-labels.idx1-ubyte: rename it\)"):
        load_dataset(DataConfig(name="mnist_idx", root=str(tmp_path)))
    (tmp_path / "t10k-labels.idx1-ubyte").unlink()
    with pytest.raises(UserError, match=r"t10k-labels-idx1-ubyte\[.gz\] is missing;"):
        load_dataset(DataConfig(name="mnist_idx", root=str(tmp_path)))


def test_idx_corrupt_files_are_user_errors(tmp_path):
    good = _idx(np.zeros((2, 3, 3)))
    (tmp_path / "short").write_bytes(good[:-1])
    (tmp_path / "magic").write_bytes(b"\x01" + good[1:])
    (tmp_path / "int32").write_bytes(good[:2] + b"\x0c" + good[3:])
    with pytest.raises(UserError, match="truncated or not idx"):
        read_idx(tmp_path / "short")
    with pytest.raises(UserError, match="bad magic"):
        read_idx(tmp_path / "magic")
    with pytest.raises(UserError, match="not unsigned byte"):
        read_idx(tmp_path / "int32")
    _write_mnist(tmp_path / "m", n_train=6)
    (tmp_path / "m" / "train-labels-idx1-ubyte").write_bytes(_idx(np.zeros(5)))
    with pytest.raises(UserError, match="expected \\[N, H, W\\] images and N labels"):
        load_dataset(DataConfig(name="mnist_idx", root=str(tmp_path / "m")))


def test_latents_name_points_to_latent_dataset():
    with pytest.raises(UserError, match="LatentDataset"):
        load_dataset(DataConfig(name="latents", root="x"))
