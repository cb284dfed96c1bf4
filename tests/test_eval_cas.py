"""The literature's Classification Accuracy Score (train on generated, test on real), on scikit-learn digits."""
import numpy as np
import pytest
import torch

from dpt_fast.config import DataConfig
from dpt_fast.data import load_dataset
from dpt_fast.eval.accuracy import classification_accuracy_score, classification_accuracy_scores

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 150


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataConfig(name="digits"))


def _per_class(y: np.ndarray, k: int, last: bool) -> np.ndarray:
    """The first (or last) k indices of every class."""
    return np.sort(np.concatenate([np.flatnonzero(y == c)[-k:] if last else np.flatnonzero(y == c)[:k] for c in range(10)]))


def test_real_images_as_generated_score_close_to_the_real_data_reference(digits):
    """'Generated' images that are real ones (not those the reference picks) score about what real data scores."""
    pick = _per_class(digits.y_train, 30, last=True)
    s = classification_accuracy_scores(digits.x_train[pick], digits.y_train[pick], digits.x_train, digits.y_train,
                                       digits.x_test, digits.y_test, 10, steps=STEPS, seed=0)
    assert s["classification_accuracy_score_real"] > 0.8
    assert abs(s["classification_accuracy_score"] - s["classification_accuracy_score_real"]) < 0.06
    assert s["classification_accuracy_score_steps"] == STEPS


def test_shuffled_labels_score_about_chance(digits):
    pick = _per_class(digits.y_train, 30, last=False)
    y = np.random.default_rng(0).permutation(digits.y_train[pick])
    score = classification_accuracy_score(digits.x_train[pick], y, digits.x_test, digits.y_test, 10, steps=STEPS)
    assert score < 0.25


def test_score_is_deterministic_and_leaves_the_global_rng_alone(digits):
    pick = _per_class(digits.y_train, 10, last=False)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = classification_accuracy_score(digits.x_train[pick], digits.y_train[pick], digits.x_test, digits.y_test, 10, steps=40)
    after = torch.rand(3)
    b = classification_accuracy_score(digits.x_train[pick], digits.y_train[pick], digits.x_test, digits.y_test, 10, steps=40)
    assert a == b
    assert torch.equal(before, after)
