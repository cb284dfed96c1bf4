"""FreeMatch / FixMatch loss terms and FreeMatch's threshold updates against the official code on fixed logits.

The `_official_*` functions are faithful copies of TorchSSL (DPT's `cifar10_experiment/TorchSSL`):
`FreeMatch.cal_time_p_and_p_model`, `freematch_utils.consistency_loss` (models/freematch),
`freematch_utils.entropy_loss` (models/freematch_entropy), `fixmatch_utils.consistency_loss`, `train_utils.ce_loss`
and the `FreeMatch.train` loop's loss assembly; `get_optimizer`'s weight-decay split and
`get_cosine_schedule_with_warmup`.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from dpt_fast.config import load_config
from dpt_fast.diffusion.train import param_groups
from dpt_fast.models.wrn import WideResNet
from dpt_fast.ssl.losses import (ThresholdState, consistency_loss, fairness_loss, fixmatch_mask, freematch_mask,
                                 supervised_loss, update_thresholds)
from dpt_fast.ssl.train import lr_at


# ---------------------------------- official code (copies) ----------------------------------
def _ce_loss(logits, targets, use_hard_labels=True, reduction="none"):
    if use_hard_labels:
        log_pred = F.log_softmax(logits, dim=-1)
        return F.nll_loss(log_pred, targets, reduction=reduction)
    log_pred = F.log_softmax(logits, dim=-1)
    return torch.sum(-targets * log_pred, dim=1)


def _cal_time_p_and_p_model(logits_x_ulb_w, time_p, p_model, label_hist):
    prob_w = torch.softmax(logits_x_ulb_w, dim=1)
    max_probs, max_idx = torch.max(prob_w, dim=-1)
    if time_p is None:
        time_p = max_probs.mean()
    else:
        time_p = time_p * 0.999 + max_probs.mean() * 0.001
    if p_model is None:
        p_model = torch.mean(prob_w, dim=0)
    else:
        p_model = p_model * 0.999 + torch.mean(prob_w, dim=0) * 0.001
    if label_hist is None:
        label_hist = torch.bincount(max_idx, minlength=p_model.shape[0]).to(p_model.dtype)
        label_hist = label_hist / label_hist.sum()
    else:
        hist = torch.bincount(max_idx, minlength=p_model.shape[0]).to(p_model.dtype)
        label_hist = label_hist * 0.999 + (hist / hist.sum()) * 0.001
    return time_p, p_model, label_hist


def _freematch_consistency_loss(dataset, logits_s, logits_w, time_p, p_model, name="ce", use_hard_labels=True):
    logits_w = logits_w.detach()
    pseudo_label = torch.softmax(logits_w, dim=-1)
    max_probs, max_idx = torch.max(pseudo_label, dim=-1)
    p_cutoff = time_p
    p_model_cutoff = p_model / torch.max(p_model, dim=-1)[0]
    threshold = p_cutoff * p_model_cutoff[max_idx]
    if dataset == "svhn":
        threshold = torch.clamp(threshold, min=0.9, max=0.95)
    mask = max_probs.ge(threshold)
    masked_loss = _ce_loss(logits_s, max_idx, use_hard_labels, reduction="none") * mask.float()
    return masked_loss.mean(), mask


def _replace_inf_to_zero(val):
    val[val == float("inf")] = 0.0
    return val


def _entropy_loss(mask, logits_s, logits_w, prob_model, label_hist):
    logits_s = logits_s[mask]
    prob_s = logits_s.softmax(dim=-1)
    _, pred_label_s = torch.max(prob_s, dim=-1)
    hist_s = torch.bincount(pred_label_s, minlength=logits_s.shape[1]).to(logits_w.dtype)
    hist_s = hist_s / hist_s.sum()
    prob_model = prob_model.reshape(1, -1)
    label_hist = label_hist.reshape(1, -1)
    prob_model_scaler = _replace_inf_to_zero(1 / label_hist).detach()
    mod_prob_model = prob_model * prob_model_scaler
    mod_prob_model = mod_prob_model / mod_prob_model.sum(dim=-1, keepdim=True)
    mean_prob_scaler_s = _replace_inf_to_zero(1 / hist_s).detach()
    mod_mean_prob_s = prob_s.mean(dim=0, keepdim=True) * mean_prob_scaler_s
    mod_mean_prob_s = mod_mean_prob_s / mod_mean_prob_s.sum(dim=-1, keepdim=True)
    loss = mod_prob_model * torch.log(mod_mean_prob_s + 1e-12)
    loss = loss.sum(dim=1)
    return loss.mean(), hist_s.mean()


def _fixmatch_consistency_loss(logits_s, logits_w, name="ce", T=1.0, p_cutoff=0.0, use_hard_labels=True):
    logits_w = logits_w.detach()
    pseudo_label = torch.softmax(logits_w, dim=-1)
    max_probs, max_idx = torch.max(pseudo_label, dim=-1)
    mask = max_probs.ge(p_cutoff).float()
    masked_loss = _ce_loss(logits_s, max_idx, use_hard_labels, reduction="none") * mask
    return masked_loss.mean(), mask.mean()


def _official_lr_lambda(current_step, num_training_steps, num_cycles=7.0 / 16.0, num_warmup_steps=0):
    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1, num_warmup_steps))
    num_cos_steps = float(current_step - num_warmup_steps)
    num_cos_steps = num_cos_steps / float(max(1, num_training_steps - num_warmup_steps))
    return max(0.0, math.cos(math.pi * num_cycles * num_cos_steps))


# ---------------------------------- fixed logits ----------------------------------
def _logits(seed, b=56, c=10, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g) * scale


def test_freematch_threshold_updates_and_losses_match_the_official_code_over_many_iterations():
    c = 10
    # TorchSSL's start: p_model = label_hist = 1/C, time_p = p_model.mean()
    start = ThresholdState.initial(c)
    assert torch.equal(start.p_model, torch.ones(c) / c) and torch.equal(start.label_hist, torch.ones(c) / c)
    assert torch.equal(start.time_p, (torch.ones(c) / c).mean())
    # a state from later in training (uneven classes, tau = 0.6), so that the mask keeps some views only
    g = torch.Generator().manual_seed(99)
    time_p = torch.tensor(0.6)
    p_model = torch.softmax(torch.randn(c, generator=g), 0)
    label_hist = torch.softmax(torch.randn(c, generator=g), 0)
    ours = ThresholdState(time_p.clone(), p_model.clone(), label_hist.clone())
    mixed = 0  # iterations where the mask keeps some views and drops others
    for it in range(30):
        lw = _logits(2 * it, scale=1.0 + it / 5)  # confidence grows, as in training: the mask opens and closes
        ls = _logits(2 * it + 1).requires_grad_(True)
        ll, yl = _logits(100 + it, b=8), torch.arange(8) % c
        # official: update, then mask and loss with the updated statistics
        time_p, p_model, label_hist = _cal_time_p_and_p_model(lw, time_p, p_model, label_hist)
        unsup_ref, mask_ref = _freematch_consistency_loss("cifar10", ls, lw, time_p, p_model)
        if mask_ref.any():
            ent_ref, _ = _entropy_loss(mask_ref, ls, lw, p_model, label_hist)
        else:
            ent_ref = torch.zeros(())
        total_ref = _ce_loss(ll, yl, reduction="mean") + 1.0 * unsup_ref + 0.01 * ent_ref
        grad_ref = torch.autograd.grad(total_ref, ls)[0]

        probs_w = lw.softmax(dim=-1)
        ours = update_thresholds(ours, probs_w, 0.999)
        mask = freematch_mask(probs_w, ours)
        unsup = consistency_loss(ls, probs_w, mask)
        ent = fairness_loss(mask, ls, ours)
        total = supervised_loss(ll, yl) + 1.0 * unsup + 0.01 * ent
        grad = torch.autograd.grad(total, ls)[0]

        torch.testing.assert_close(ours.time_p, time_p, rtol=0, atol=0)
        torch.testing.assert_close(ours.p_model, p_model, rtol=0, atol=0)
        torch.testing.assert_close(ours.label_hist, label_hist, rtol=0, atol=0)
        assert torch.equal(mask, mask_ref)
        mixed += bool(mask.any() and not mask.all())
        torch.testing.assert_close(unsup, unsup_ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ent, ent_ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(total, total_ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-8)
    assert 0.1 < float(ours.time_p) < 1.0  # the statistics moved away from their start
    assert mixed >= 10


def test_freematch_mask_is_classwise():
    c = 4
    state = ThresholdState(torch.tensor(0.8), torch.tensor([0.4, 0.2, 0.2, 0.2]), torch.ones(c) / c)
    probs = torch.tensor([[0.75, 0.25, 0, 0], [0.1, 0.5, 0.2, 0.2], [0.05, 0.35, 0.3, 0.3]])
    # thresholds: class 0 -> 0.8 * 1.0, class 1 -> 0.8 * 0.5 = 0.4
    assert freematch_mask(probs, state).tolist() == [False, True, False]


def test_fixmatch_mask_and_loss_match_the_official_code():
    for seed in range(5):
        lw, ls = _logits(seed, scale=6.0), _logits(seed + 50)
        ref, ref_rate = _fixmatch_consistency_loss(ls, lw, p_cutoff=0.95)
        probs = lw.softmax(-1)
        mask = fixmatch_mask(probs, 0.95)
        torch.testing.assert_close(consistency_loss(ls, probs, mask), ref, rtol=1e-6, atol=1e-7)
        assert mask.float().mean() == ref_rate
    assert 0 < ref_rate < 1


def test_fairness_is_zero_when_no_strong_view_passes():
    ls = _logits(0).requires_grad_(True)
    out = fairness_loss(torch.zeros(len(ls), dtype=torch.bool), ls, ThresholdState.initial(10))
    assert out.item() == 0.0
    out.backward()  # still part of the graph
    assert torch.equal(ls.grad, torch.zeros_like(ls))


def test_threshold_state_round_trips_exactly_through_json():
    import json

    s = update_thresholds(ThresholdState.initial(10), _logits(3).softmax(-1), 0.999)
    back = ThresholdState.from_json(json.loads(json.dumps(s.to_json())))
    assert torch.equal(back.time_p, s.time_p) and torch.equal(back.p_model, s.p_model)
    assert torch.equal(back.label_hist, s.label_hist)


def test_learning_rate_is_torchssl_cosine_schedule():
    lcfg = load_config("base", ["learner.iterations=1000"]).learner
    for it in (0, 1, 500, 999, 1000):
        assert lr_at(it, lcfg) == pytest.approx(0.03 * _official_lr_lambda(it, 1000), rel=1e-12)


def test_weight_decay_skips_the_parameters_torchssl_skips_on_wrn28_2():
    net = WideResNet(num_classes=10)
    decay, no_decay = param_groups(net, 5e-4)
    # TorchSSL get_optimizer(bn_wd_skip=True): names containing 'bn' or 'bias' get no weight decay
    ref_no_decay = {id(p) for n, p in net.named_parameters() if "bn" in n or "bias" in n}
    assert {id(p) for p in no_decay["params"]} == ref_no_decay
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(net.parameters()))
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
