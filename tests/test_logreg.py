"""The paper's logistic regression (`models.logreg`) against cyanure, the official solver, on the same rows.

DPT's call (ML-GSAI/DPT train_classifier.py): `preprocess(embs, normalize=True, columns=False, centering=True)`,
then `Classifier(loss='multiclass-logistic', penalty='l2', fit_intercept=False, lambda_1=0.0025 / N,
lambda_2=0.0025 / N, tol=1e-3, solver='auto', max_iter=10000)` (stage 1; max_iter=100 in stage 3).
"""
import numpy as np
import pytest
import torch

from dpt_fast.models.logreg import PAPER_LAMBDA, fit_paper_logreg

cyanure = pytest.importorskip("cyanure")
from cyanure.data_processing import preprocess  # noqa: E402
from cyanure.estimators import Classifier  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def features(n, d, k, seed):
    """Backbone-like rows: class means + noise, far from centred and unit norm (cyanure's preprocess fixes that)."""
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(99).normal(size=(k, d)) + 2.0
    y = np.arange(n) % k
    return (means[y] + 1.2 * rng.normal(size=(n, d))).astype(np.float32), y


def official(x, y, tol=1e-3, max_iter=10000):
    """DPT's stage-1 classifier on float32 rows preprocessed in place, as the official script does."""
    x = torch.from_numpy(x.copy())
    preprocess(x, normalize=True, columns=False, centering=True)
    lam = PAPER_LAMBDA / len(x)
    clf = Classifier(loss="multiclass-logistic", penalty="l2", fit_intercept=False, lambda_1=lam, lambda_2=lam,
                     tol=tol, solver="auto", max_iter=max_iter, verbose=False, n_threads=1)
    return clf.fit(x.numpy(), y), x.numpy()


def rows(x):
    """What BackboneSpace writes: each row minus its mean, then L2-normalised."""
    x = x - x.mean(1, keepdims=True)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_preprocessing_is_cyanures_row_centring_and_normalisation():
    x, _ = features(30, 16, 3, 0)
    _, theirs = official(x, np.arange(30) % 3)
    np.testing.assert_allclose(rows(x), theirs, atol=1e-6)


def test_same_solution_as_cyanure_solved_tightly():
    x, y = features(300, 48, 10, 0)
    xt, _ = features(200, 48, 10, 1)
    clf, xp = official(x.astype(np.float64), y, tol=1e-9, max_iter=100000)
    head = fit_paper_logreg(rows(x), y, 10, tol=1e-10)
    assert not head.intercept.any()
    np.testing.assert_allclose(head.coef, clf.coef_.T, atol=1e-4 * np.abs(clf.coef_).max())
    for z in (rows(x), rows(xt)):
        np.testing.assert_allclose(head.predict_proba(z), clf.predict_proba(z), atol=2e-5)
        assert np.array_equal(head.predict(z), clf.predict(z))


def test_at_the_official_tolerance_cyanure_stops_near_our_optimum():
    """tol=1e-3 (relative duality gap) leaves cyanure a little short of the optimum we reach: objective at
    least as low, the same predictions on nearly every held-out row, probabilities within 2e-2."""
    x, y = features(1000, 64, 50, 0)
    xt, _ = features(1000, 64, 50, 1)
    clf, _ = official(x, y)
    head = fit_paper_logreg(rows(x), y, 50)
    lam = PAPER_LAMBDA / len(x)

    def objective(w):  # w [D, K]
        z = rows(x).astype(np.float64) @ w
        z -= z.max(1, keepdims=True)
        ce = np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]
        return ce.mean() + 0.5 * lam * (w ** 2).sum()

    assert objective(head.coef.T) <= objective(clf.coef_.astype(np.float64))
    assert (head.predict(rows(xt)) == clf.predict(rows(xt))).mean() >= 0.99
    assert np.abs(head.predict_proba(rows(xt)) - clf.predict_proba(rows(xt))).max() < 0.02


def test_sample_weight_two_equals_the_row_twice():
    x, y = features(120, 16, 4, 0)
    x = rows(x)
    w = np.ones(120)
    w[:10] = 2.0
    lam = 1e-3
    a = fit_paper_logreg(x, y, 4, lam=lam, sample_weight=w, tol=1e-12)
    b = fit_paper_logreg(np.concatenate([x, x[:10]]), np.concatenate([y, y[:10]]), 4, lam=lam * 120 / 130, tol=1e-12)
    np.testing.assert_allclose(a.coef, b.coef, atol=1e-6)


def test_a_class_without_rows_is_never_predicted():
    x, y = features(60, 16, 3, 0)
    head = fit_paper_logreg(rows(x), y, 5)
    assert head.coef.shape == (5, 16) and set(head.predict(rows(x))) <= {0, 1, 2}


@requires_cuda
@pytest.mark.gpu
def test_gpu_fit_and_labelling_equal_the_cpu_ones():
    x, y = features(500, 64, 20, 0)
    cpu = fit_paper_logreg(rows(x), y, 20, tol=1e-10)
    gpu = fit_paper_logreg(rows(x), y, 20, tol=1e-10, device="cuda")
    np.testing.assert_allclose(gpu.coef, cpu.coef, atol=1e-5 * np.abs(cpu.coef).max())
    p_cpu, p_gpu = cpu.label_prob(rows(x), rows=64), cpu.label_prob(rows(x), rows=64, device="cuda")
    assert np.array_equal(p_cpu[0], p_gpu[0]) and np.allclose(p_cpu[1], p_gpu[1], atol=1e-6)
