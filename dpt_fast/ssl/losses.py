"""FreeMatch's and FixMatch's loss terms and FreeMatch's self-adaptive thresholds, as the official code computes
them (TorchSSL `models/freematch/freematch.py`, `freematch_utils.py`, `models/freematch_entropy/freematch_utils.py`
and `models/fixmatch/fixmatch_utils.py`, which DPT's `cifar10_experiment/TorchSSL` runs).

Per iteration, with p = softmax(logits of the weak views) of the unlabelled batch:

    FreeMatch (self-adaptive thresholding, EMA momentum m = 0.999):
        time_p     <- m time_p + (1 - m) mean_b max_k p_bk                     global threshold tau_t
        p_model    <- m p_model + (1 - m) mean_b p_b                           class-wise expectation
        label_hist <- m label_hist + (1 - m) histogram(argmax p) / B           class histogram (for SAF)
        mask_b      = max_k p_bk >= time_p * p_model[argmax p_b] / max p_model  (after the update)
    FixMatch:  mask_b = max_k p_bk >= p_cutoff (0.95)
    unsupervised loss = mean_b( mask_b * CE(logits_strong_b, argmax p_b) )        (over all B, hard labels)
    fairness (SAF, FreeMatch only) = sum_k pm_k log(pq_k + 1e-12) with
        pm = SumNorm(p_model / label_hist),  pq = SumNorm(mean(p_strong[mask]) / hist(argmax p_strong[mask]))
    total = CE(labelled) + lambda_u * unsupervised + lambda_f * fairness

The state starts at p_model = label_hist = 1/C, time_p = 1/C. The fairness term is added with the official sign
(the code adds sum pm log pq, the negative cross entropy, as the paper's L_f = -H(.,.)); with no strong view
passing the mask it is 0, as in USB (TorchSSL would return NaN there).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ThresholdState:
    """FreeMatch's EMA statistics: time_p (scalar tensor), p_model [C], label_hist [C] (float32)."""

    time_p: torch.Tensor
    p_model: torch.Tensor
    label_hist: torch.Tensor

    @classmethod
    def initial(cls, num_classes: int, device: torch.device | str = "cpu") -> "ThresholdState":
        p = torch.full((num_classes,), 1.0 / num_classes, device=device)
        return cls(p.mean(), p, p.clone())

    def to_json(self) -> dict:
        """Exact float32 values as Python floats (a float32 round-trips through a JSON double)."""
        return {"time_p": float(self.time_p), "p_model": self.p_model.tolist(), "label_hist": self.label_hist.tolist()}

    @classmethod
    def from_json(cls, d: dict, device: torch.device | str = "cpu") -> "ThresholdState":
        f = lambda v: torch.tensor(v, dtype=torch.float32, device=device)  # noqa: E731
        return cls(f(d["time_p"]), f(d["p_model"]), f(d["label_hist"]))


@torch.no_grad()
def update_thresholds(state: ThresholdState, probs_w: torch.Tensor, momentum: float = 0.999) -> ThresholdState:
    """One EMA step of FreeMatch's statistics from the weak views' probabilities [B, C] (official order)."""
    max_probs, max_idx = probs_w.max(dim=-1)
    time_p = state.time_p * momentum + max_probs.mean() * (1 - momentum)
    p_model = state.p_model * momentum + probs_w.mean(dim=0) * (1 - momentum)
    hist = torch.bincount(max_idx, minlength=probs_w.shape[1]).to(probs_w.dtype)
    label_hist = state.label_hist * momentum + (hist / hist.sum()) * (1 - momentum)
    return ThresholdState(time_p, p_model, label_hist)


@torch.no_grad()
def freematch_mask(probs_w: torch.Tensor, state: ThresholdState) -> torch.Tensor:
    """bool [B]: the weak view's confidence reaches its class's self-adaptive threshold."""
    max_probs, max_idx = probs_w.max(dim=-1)
    local = state.p_model / state.p_model.max()
    return max_probs >= state.time_p * local[max_idx]


@torch.no_grad()
def fixmatch_mask(probs_w: torch.Tensor, p_cutoff: float = 0.95) -> torch.Tensor:
    return probs_w.max(dim=-1).values >= p_cutoff


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy (TorchSSL's ce_loss: log_softmax + nll)."""
    return F.nll_loss(F.log_softmax(logits, dim=-1), labels)


def consistency_loss(logits_s: torch.Tensor, probs_w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hard pseudo-label cross entropy of the strong views, masked, averaged over the whole unlabelled batch."""
    pseudo = probs_w.argmax(dim=-1)
    return (F.nll_loss(F.log_softmax(logits_s, dim=-1), pseudo, reduction="none") * mask.float()).mean()


def fairness_loss(mask: torch.Tensor, logits_s: torch.Tensor, state: ThresholdState) -> torch.Tensor:
    """FreeMatch's self-adaptive fairness term (TorchSSL `entropy_loss`), scalar; 0 when nothing passes the mask."""
    if not bool(mask.any()):
        return logits_s.sum() * 0.0
    prob_s = logits_s[mask].softmax(dim=-1)
    hist_s = torch.bincount(prob_s.argmax(dim=-1), minlength=logits_s.shape[1]).to(logits_s.dtype)
    hist_s = hist_s / hist_s.sum()

    def inv(v: torch.Tensor) -> torch.Tensor:  # 1 / v with the infinities (empty classes) set to 0
        r = 1.0 / v
        return torch.where(torch.isinf(r), torch.zeros_like(r), r).detach()

    mod_model = state.p_model.view(1, -1) * inv(state.label_hist.view(1, -1))
    mod_model = mod_model / mod_model.sum(dim=-1, keepdim=True)
    mod_mean = prob_s.mean(dim=0, keepdim=True) * inv(hist_s)
    mod_mean = mod_mean / mod_mean.sum(dim=-1, keepdim=True)
    return (mod_model * torch.log(mod_mean + 1e-12)).sum(dim=1).mean()
