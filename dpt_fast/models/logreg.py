"""The paper's classifier: multinomial logistic regression, L2 penalty lambda = 0.0025 / N, no intercept.

    head = fit_paper_logreg(x, y, num_classes=1000, device="cuda")   # x: rows as BackboneSpace gives them
    pred, prob = head.label_prob(x_all, device="cuda")               # pseudo-labels, chunked, on the GPU

DPT (ML-GSAI/DPT `train_classifier.py`, from MSN's `logistic_eval.py`) fits cyanure's
`Classifier(loss='multiclass-logistic', penalty='l2', fit_intercept=False, lambda_1=0.0025 / N)` on MSN
features preprocessed by cyanure's `preprocess(centering=True, normalize=True, columns=False)`: each row minus
its own mean, then divided by its L2 norm (what `BackboneSpace` writes). Cyanure's objective is

    min_W  (1/N) sum_i w_i CE(W x_i, y_i) + (lambda / 2) ||W||^2,      W [K, D], no intercept,

strongly convex, so its minimiser is unique; we find it with full-batch L-BFGS in float64 (on the GPU when
there is one: A100/H100 run float64 matrix products at their float32 rate) and stop, as cyanure does, when
the relative duality gap (P - D) / P falls below `tol`, or after `max_iter` iterations. The dual point of W
is alpha_i = w_i (onehot(y_i) - p_i), so D = (1/N) sum_i w_i H(p_i) - (lambda / 2) ||W - grad P / lambda||^2
costs nothing beyond the gradient. tests/test_logreg.py compares the solution with cyanure's.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch

from ..utils import log
from .classifier import LinearHead, fit_logreg

PAPER_LAMBDA = 0.0025  # lambda * N of the official config (`config.lambd`, divided by the rows fitted on)


def _rows(x) -> torch.Tensor:
    return x if torch.is_tensor(x) else torch.from_numpy(np.ascontiguousarray(x))


class _Objective:
    """P(W), its gradient and the duality gap over rows held on `device`, `chunk` rows of logits at a time."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, num_classes: int, lam: float, chunk: int):
        self.x, self.y, self.w, self.k, self.lam, self.chunk = x, y, w, num_classes, lam, chunk
        self.n = len(x)

    @torch.no_grad()
    def __call__(self, W: torch.Tensor) -> tuple[float, torch.Tensor, float]:
        """(P(W), grad P(W) [D, K], relative duality gap) for W [D, K]."""
        loss = torch.zeros((), dtype=W.dtype, device=W.device)
        ent = torch.zeros_like(loss)
        grad = torch.zeros_like(W)
        for i in range(0, self.n, self.chunk):
            xc, yc, wc = self.x[i:i + self.chunk], self.y[i:i + self.chunk], self.w[i:i + self.chunk]
            z = xc @ W
            lse = torch.logsumexp(z, dim=1)
            p = torch.exp(z - lse[:, None])
            loss += (wc * (lse - z.gather(1, yc[:, None])[:, 0])).sum()
            ent += (wc * (lse - (p * z).sum(1))).sum()
            p[torch.arange(len(yc), device=p.device), yc] -= 1.0
            grad += xc.T @ (p * wc[:, None])
        grad /= self.n
        grad += self.lam * W
        primal = loss / self.n + 0.5 * self.lam * W.square().sum()
        dual = ent / self.n - 0.5 * self.lam * (W - grad / self.lam).square().sum()
        return float(primal), grad, float((primal - dual) / primal.clamp_min(1e-300))


def fit_paper_logreg(x, y, num_classes: int, lam: Optional[float] = None, sample_weight=None,
                     device: torch.device | str = "cpu", max_iter: int = 2000, tol: float = 1e-6,
                     check_every: int = 10, chunk_bytes: int = 1 << 28, info: Optional[dict] = None) -> LinearHead:
    """The paper's head on rows x [N, D] (float) with labels y int [N] in [0, num_classes).

    lam: the L2 strength of the objective above; None = the paper's 0.0025 / N. sample_weight: per-row
    weights w_i (default 1). Stops at relative duality gap <= tol (cyanure's criterion; the official scripts
    use 1e-3 with 10,000 / 100 epochs in stage 1 / 3) or after max_iter L-BFGS iterations. A class absent
    from y still gets a row of the head (pushed below the others by the softmax). Returns a LinearHead with
    coef [num_classes, D] and a zero intercept; `info`, when given, receives lambda, iterations, the final
    relative duality gap and the seconds taken.
    """
    t0 = time.time()
    device = torch.device(device)
    X = _rows(x).to(device, torch.float64)
    Y = _rows(np.asarray(y, np.int64)).to(device)
    n, d = X.shape
    weights = torch.ones(n, dtype=torch.float64, device=device) if sample_weight is None else \
        _rows(np.asarray(sample_weight, np.float64)).to(device)
    lam = PAPER_LAMBDA / n if lam is None else float(lam)
    obj = _Objective(X, Y, weights, num_classes, lam, max(1, chunk_bytes // (8 * num_classes)))
    W = torch.zeros(d, num_classes, dtype=torch.float64, device=device, requires_grad=True)
    opt = torch.optim.LBFGS([W], lr=1, max_iter=check_every, max_eval=25 * check_every, history_size=20,
                            tolerance_grad=0.0, tolerance_change=0.0, line_search_fn="strong_wolfe")

    def closure():
        value, g, _ = obj(W.detach())
        W.grad = g
        return value

    best, gap = float("inf"), float("inf")
    while opt.state[W].get("n_iter", 0) < max_iter:
        opt.step(closure)
        value, _, gap = obj(W.detach())
        if gap <= tol or not value < best:  # converged, or no progress left at float64 precision
            break
        best = value
    iters, seconds = int(opt.state[W].get("n_iter", 0)), time.time() - t0
    log.info("paper logistic regression: %d x %d -> %d classes, lambda %.3g, %d L-BFGS iterations, relative "
             "duality gap %.2g, %.1f s on %s", n, d, num_classes, lam, iters, gap, seconds, device.type)
    if info is not None:
        info.update(logreg_lambda=lam, logreg_iterations=iters, logreg_duality_gap=gap, logreg_seconds=seconds)
    coef = W.detach().T.contiguous().cpu().numpy()
    return LinearHead(coef, np.zeros(num_classes, np.float64))


def fit_head(paper: bool, x, y, c: float, num_classes: int, sample_weight=None,
             device: torch.device | str = "cpu") -> tuple[LinearHead, dict]:
    """The classifier stages 1 and 3 fit, and what metrics.json says of it ({"classifier": name, ...}).

    paper=True (stage1.method=features): `fit_paper_logreg` with lambda = 1 / (C N), N the rows fitted on
    (C = 400: the paper's 0.0025 / N), no intercept. Otherwise scikit-learn's multinomial logistic regression
    with an intercept and inverse strength C (`classifier.fit_logreg`), the small-data methods' classifier.
    """
    if paper:
        info = {"classifier": "paper_logreg"}
        head = fit_paper_logreg(x, y, num_classes, lam=1.0 / (c * len(x)), sample_weight=sample_weight,
                                device=device, info=info)
        return head, info
    return fit_logreg(x, y, c, num_classes, sample_weight=sample_weight), {"classifier": "sklearn_logreg"}
