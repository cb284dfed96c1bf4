"""The shared feature-space classifier: logistic-regression head, kNN placement, saved representations."""
import numpy as np
import pytest

from dpt_fast.models.classifier import LinearHead, PcaSpace, fit_logreg, knn_embed, load_space
from dpt_fast.stages.stage1 import exact_knn
from dpt_fast.utils import UserError


def _blobs(n_per=20, classes=4, dim=5, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 5, (classes, dim))
    x = np.concatenate([c + rng.normal(0, 1, (n_per, dim)) for c in centres])
    return x.astype(np.float32), np.repeat(np.arange(classes), n_per).astype(np.int64)


def test_logreg_head_separates_blobs_and_survives_a_save_load_round_trip(tmp_path):
    x, y = _blobs()
    head = fit_logreg(x, y, c=1.0, num_classes=4)
    assert (head.predict(x) == y).mean() > 0.95
    p = head.predict_proba(x)
    assert p.dtype == np.float32 and p.shape == (80, 4)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-5)
    head.save(tmp_path / "head.safetensors")
    again = LinearHead.load(tmp_path / "head.safetensors")
    np.testing.assert_allclose(again.predict_proba(x), p, atol=1e-5)


def test_logreg_head_keeps_all_classes_when_some_are_absent_from_the_labels():
    x, y = _blobs(classes=3)
    head = fit_logreg(x, y, c=1.0, num_classes=5)
    p = head.predict_proba(x)
    assert p.shape == (60, 5) and p[:, 3:].max() < 1e-6
    two = fit_logreg(x[y < 2], y[y < 2], c=1.0, num_classes=5)  # scikit-learn's binary parametrisation
    assert (two.predict(x[y < 2]) == y[y < 2]).mean() > 0.95


def test_sample_weight_two_equals_duplicating_the_sample():
    x, y = _blobs(n_per=6, seed=1)
    w = np.ones(len(y))
    w[:5] = 2.0
    a = fit_logreg(x, y, 1.0, 4, sample_weight=w)
    b = fit_logreg(np.concatenate([x, x[:5]]), np.concatenate([y, y[:5]]), 1.0, 4)
    np.testing.assert_allclose(a.predict_proba(x), b.predict_proba(x), atol=1e-3)


def test_knn_embed_places_a_training_point_on_its_own_coordinates_and_new_points_between_neighbours():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(50, 8)).astype(np.float32)
    f[1] = f[0] + 0.05 * f[1]  # two close points; their midpoint has them as its two nearest neighbours
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    coords = rng.normal(size=(50, 3)).astype(np.float32)
    np.testing.assert_allclose(knn_embed(f, f, coords, k=1), coords, atol=1e-6)
    mid = (f[0] + f[1]) / np.linalg.norm(f[0] + f[1])
    out = knn_embed(mid[None], f, coords, k=2, temperature=1e3)  # nearly equal weights
    np.testing.assert_allclose(out[0], (coords[0] + coords[1]) / 2, atol=1e-2)


def test_exact_knn_matches_brute_force_cosine_neighbours():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(300, 16)).astype(np.float32)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    idx, dist = exact_knn(f, 7, batch_size=64)
    ref = np.argsort(-(f @ f.T), axis=1)[:, :7]
    assert idx.dtype == np.int64 and dist.dtype == np.float32
    assert np.array_equal(idx[:, 0], np.arange(300))  # itself first, at distance 0
    assert np.array_equal(np.sort(idx, 1), np.sort(ref, 1))
    np.testing.assert_allclose(dist, 1 - np.take_along_axis(f @ f.T, idx, 1), atol=1e-5)


def test_saved_pca_space_loads_back_and_embeds_identically(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (40, 1, 8, 8), dtype=np.uint8)
    space = PcaSpace.fit(images, 5)
    space.save(tmp_path)
    again = load_space(tmp_path)
    np.testing.assert_allclose(again.embed(images), space.embed(images), atol=1e-5)
    np.testing.assert_allclose(again.embed_train(images, np.array([3, 7])), space.embed(images[[3, 7]]), atol=1e-5)


def test_load_space_without_stage1_output_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--stage 1"):
        load_space(tmp_path / "stage1")
