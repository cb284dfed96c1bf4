import numpy as np
import pytest

from dpt_fast.data import labelled_indices, load_dataset, load_split, save_split, to_float, to_uint8
from dpt_fast.config import DataConfig
from dpt_fast.utils import UserError


def test_mnist5k_fixed_stratified_split():
    ds = load_dataset(DataConfig(name="mnist5k"))
    assert ds.x_train.shape == (4000, 1, 28, 28) and ds.x_test.shape == (1000, 1, 28, 28)
    assert ds.x_train.dtype == np.uint8
    assert np.bincount(ds.y_train).tolist() == [400] * 10
    assert np.bincount(ds.y_test).tolist() == [100] * 10
    again = load_dataset(DataConfig(name="mnist5k"))
    assert np.array_equal(ds.x_test, again.x_test)


def test_digits_shape_and_range():
    ds = load_dataset(DataConfig(name="digits"))
    assert ds.x_train.shape[1:] == (1, 8, 8) and len(ds.x_train) + len(ds.x_test) == 1797
    assert ds.x_train.max() == 255 and ds.num_classes == 10


@pytest.mark.parametrize("k", [1, 2, 5])
def test_k_per_class_split_is_seeded(k):
    y = np.repeat(np.arange(10), 40)
    a = labelled_indices(y, labels_per_class=k, seed=0)
    assert len(a) == 10 * k and np.bincount(y[a]).tolist() == [k] * 10
    assert np.array_equal(a, labelled_indices(y, labels_per_class=k, seed=0))
    assert not np.array_equal(a, labelled_indices(y, labels_per_class=k, seed=1))


def test_fraction_split():
    y = np.repeat(np.arange(10), 400)
    idx = labelled_indices(y, fraction=0.01, seed=0)
    assert np.bincount(y[idx]).tolist() == [4] * 10


def test_split_json_roundtrip_and_errors(tmp_path):
    idx = np.array([3, 7, 11])
    save_split(tmp_path / "split.json", idx, num_train=20)
    assert np.array_equal(load_split(tmp_path / "split.json", 20), idx)
    with pytest.raises(UserError, match="do not fit"):
        load_split(tmp_path / "split.json", 5)
    with pytest.raises(UserError, match="run --stage 1 first"):
        load_split(tmp_path / "nope.json")


def test_too_many_labels_is_a_user_error():
    with pytest.raises(UserError, match="has only 3 training images"):
        labelled_indices(np.array([0, 0, 0, 1, 1, 1]), labels_per_class=5)


def test_float_uint8_roundtrip():
    x = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    f = to_float(x)
    assert f.min() == -1 and f.max() == 1
    assert np.array_equal(to_uint8(f).numpy(), x)
