"""FreeMatch / FixMatch training (TorchSSL's loop), resumable, and the trained classifier's predictions.

    model = train_learner(data, cfg.learner, "freematch", num_classes=10, seed=0, ckpt_dir=..., fingerprint=...)
    probs = predict(model, images_uint8, norm)                      # float32 [N, num_classes], the EMA model

One iteration, as TorchSSL's `FreeMatch.train` / `FixMatch.train`:
  B labelled images and mu * B unlabelled ones, drawn uniformly with replacement (TorchSSL's RandomSampler with
  replacement; the unlabelled set is every training image, the labelled ones included); the labelled images and
  one view of the unlabelled ones get the weak view (flip + padded crop), the unlabelled ones also the strong view
  (RandAugment + Cutout, then flip + crop); the three go through the network as one batch (BatchNorm sees all of
  them); loss = CE(labelled) + lambda_u * masked pseudo-label CE of the strong views [+ lambda_f * fairness]
  (`dpt_fast.ssl.losses`); SGD (Nesterov) with lr * cos(pi * 7/16 * k / K); then the EMA of the parameters
  (decay 0.999, no warm-up; BatchNorm statistics are the trained model's, as TorchSSL's EMA swaps parameters only).

Every random draw of iteration k comes from a generator seeded by (seed, k), so the iteration count is the whole
data-loader and RNG state: a checkpoint (model, EMA, optimizer, FreeMatch's thresholds; `ckpt_every` iterations,
safetensors + JSON via `dpt_fast.diffusion.checkpoint`) continues a killed run to the same final weights.

Differences from TorchSSL, all deliberate: it runs `K + 1` iterations (`it > num_train_iter` ends it), here K;
DPT labels the training images with `model_best.pth`, the EMA weights of the iteration with the best *test*
accuracy, here the final EMA weights label them (the test split never chooses the model).
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..diffusion.checkpoint import latest_checkpoint, load_checkpoint, read_meta, save_checkpoint
from ..diffusion.train import param_groups, step_seed, update_ema
from ..models.wrn import build_net
from ..utils import REBUILD, UserError, load_safetensors, log, safetensors_metadata, save_safetensors
from . import METHODS
from .augment import strong_view, weak_view
from .losses import (ThresholdState, consistency_loss, fairness_loss, fixmatch_mask, freematch_mask, supervised_loss,
                     update_thresholds)

_STREAM = 7  # random stream of the learner's iterations (see diffusion.train.step_seed)

# TorchSSL's CIFAR-10 normalisation (datasets/ssl_dataset.py); other data sets use their training images' statistics.
CIFAR10_NORM = ((125.3, 123.0, 113.9), (63.0, 62.1, 66.7))


@dataclass
class LearnerData:
    """Training images of one run (uint8 [N, C, H, W] tensors on the CPU) and the labels of the labelled ones."""

    x_lab: torch.Tensor
    y_lab: torch.Tensor  # int64 [L]
    x_unl: torch.Tensor  # every training image (TorchSSL's include_lb_to_ulb)
    labelled: np.ndarray | None = None  # indices of the real labelled images among x_unl (they lead x_lab)
    num_classes: int = 0


@dataclass
class Norm:
    """Per-channel mean and std in 0..255 pixel units: the network sees (x - mean) / std."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, data_name: str, images: np.ndarray | torch.Tensor) -> "Norm":
        if data_name == "cifar10":
            return cls(*CIFAR10_NORM)
        x = torch.as_tensor(images).float()
        return cls(tuple(x.mean(dim=(0, 2, 3)).tolist()), tuple(x.std(dim=(0, 2, 3)).clamp(min=1.0).tolist()))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = x.new_tensor(self.mean).view(1, -1, 1, 1)
        s = x.new_tensor(self.std).view(1, -1, 1, 1)
        return (x - m) / s


def net_meta(lcfg, in_chans: int, num_classes: int, norm: Norm) -> dict:
    """What rebuilds the network (saved with its weights)."""
    return {"net": lcfg.net, "in_chans": in_chans, "num_classes": num_classes, "width": lcfg.width,
            "bn_momentum": lcfg.bn_momentum, "mean": list(norm.mean), "std": list(norm.std)}


def _build(meta: dict) -> nn.Module:
    return build_net(meta["net"], meta["in_chans"], meta["num_classes"], meta["width"], meta["bn_momentum"])


def lr_at(it: int, lcfg) -> float:
    """TorchSSL's get_cosine_schedule_with_warmup without warm-up: lr * cos(pi * cycles * it / K)."""
    return lcfg.lr * max(0.0, math.cos(math.pi * lcfg.cosine_cycles * it / lcfg.iterations))


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def train_learner(
    data: LearnerData,
    lcfg,
    method: str,
    *,
    num_classes: int,
    norm: Norm,
    seed: int,
    ckpt_dir: str | Path,
    fingerprint: str,
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "learner",
    on_iter: Callable[[int, nn.Module], None] | None = None,
    init: dict[str, torch.Tensor] | None = None,
) -> tuple[nn.Module, dict]:
    """Train for `lcfg.iterations` in total, resuming from the newest checkpoint in `ckpt_dir`.

    Returns (the EMA model in eval mode on `device`, a summary: iterations, seconds, last losses and mask rate).
    `fingerprint` names everything the weights depend on but the iteration count; a checkpoint with another one
    is refused (UserError). `on_iter(k, ema)` is called after iteration k with the EMA model (tests use it to
    simulate a kill; scripts/learner_trajectory.py follows the EMA model's test top-1 with it).
    `init`: a state dict to start from (missing entries keep their random start), e.g. a SimCLR encoder's.
    """
    if method not in METHODS:
        raise ValueError(f"unknown learner method {method!r}")
    device = torch.device(device)
    ckpt_dir = Path(ckpt_dir)
    in_chans = int(data.x_unl.shape[1])
    if len(data.x_lab) == 0:
        raise UserError("the learner has no labelled image; check split.labels_per_class / split.subset_file")
    pad = lcfg.crop_pad
    if pad >= min(data.x_unl.shape[2:]):
        raise UserError(f"learner.crop_pad={pad} must be smaller than the image side {min(data.x_unl.shape[2:])}")

    torch.manual_seed(seed)
    model = build_net(lcfg.net, in_chans, num_classes, lcfg.width, lcfg.bn_momentum).to(device)
    if init is not None:
        model.load_state_dict(init, strict=False)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.SGD(param_groups(model, lcfg.weight_decay), lr=lcfg.lr, momentum=lcfg.momentum,
                                nesterov=lcfg.momentum > 0)
    state = ThresholdState.initial(num_classes, device)
    start, prior_seconds = 0, 0.0
    last = latest_checkpoint(ckpt_dir)
    if last is not None:
        meta = read_meta(ckpt_dir, last)
        if meta.get("fingerprint") != fingerprint:
            raise UserError(f"{ckpt_dir} holds checkpoints of another config (data, labels or learner settings differ): "
                            "re-run with --fresh, or use another --run-dir")
        if last > lcfg.iterations:
            raise UserError(f"{ckpt_dir} already holds iteration {last} > learner.iterations={lcfg.iterations}; "
                            "raise learner.iterations or use --fresh")
        meta = load_checkpoint(ckpt_dir, last, model, ema, optimizer)
        state = ThresholdState.from_json(meta["thresholds"], device)
        start, prior_seconds = last, float(meta.get("train_seconds", 0.0))
        log.info("%s: resumed from %s at iteration %d of %d", desc, ckpt_dir, start, lcfg.iterations)

    b, mu = lcfg.batch_size, lcfg.uratio
    n_lab, n_unl = len(data.x_lab), len(data.x_unl)
    # The images live on the device and the views are made there (every random draw still comes from `gen`).
    x_lab, x_unl, y_lab = data.x_lab.to(device), data.x_unl.to(device), data.y_lab.to(device)
    window = {"loss": 0.0, "sup": 0.0, "unsup": 0.0, "mask": 0.0, "n": 0}
    summary: dict = {}

    def save(it: int) -> None:
        meta = {"fingerprint": fingerprint, "seed": seed, "method": method, "thresholds": state.to_json(),
                "train_seconds": prior_seconds + time.perf_counter() - t0}
        save_checkpoint(ckpt_dir, it, model, ema, optimizer, meta, keep=1)

    bar = tqdm(total=lcfg.iterations, initial=start, desc=desc, unit="it", disable=not progress, dynamic_ncols=True)
    model.train()
    t0 = time.perf_counter()
    for it in range(start, lcfg.iterations):
        lr = lr_at(it, lcfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        gen = torch.Generator().manual_seed(step_seed(seed, _STREAM, it))
        li = torch.randint(n_lab, (b,), generator=gen).to(device)
        ui = torch.randint(n_unl, (mu * b,), generator=gen).to(device)
        xl = weak_view(x_lab[li].float(), gen, lcfg.flip, pad)
        xu = x_unl[ui].float()
        xw = weak_view(xu, gen, lcfg.flip, pad)
        xs = strong_view(xu, gen, lcfg.flip, pad, lcfg.randaug_ops)
        logits = model(norm(torch.cat([xl, xw, xs])))
        logits_l = logits[:b]
        logits_w, logits_s = logits[b:].chunk(2)
        sup = supervised_loss(logits_l, y_lab[li])
        probs_w = logits_w.detach().softmax(dim=-1)
        if method == "freematch":
            state = update_thresholds(state, probs_w, lcfg.threshold_momentum)
            mask = freematch_mask(probs_w, state)
        else:
            mask = fixmatch_mask(probs_w, lcfg.p_cutoff)
        unsup = consistency_loss(logits_s, probs_w, mask)
        loss = sup + lcfg.unsup_weight * unsup
        if method == "freematch" and lcfg.fairness_weight:
            loss = loss + lcfg.fairness_weight * fairness_loss(mask, logits_s, state)
        value = loss.item()
        if not math.isfinite(value):
            raise UserError(f"{desc}: the {method} loss is {value} at iteration {it + 1}; lower learner.lr (now "
                            f"{lcfg.lr}) and re-run (the last checkpoint in {ckpt_dir} is kept)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_ema(ema, model, lcfg.ema)

        done = it + 1
        for k, v in (("loss", value), ("sup", sup.item()), ("unsup", unsup.item()), ("mask", mask.float().mean().item())):
            window[k] += v
        window["n"] += 1
        if done % 50 == 0 or done == lcfg.iterations:
            n = window.pop("n")
            summary = {k: v / n for k, v in window.items()}
            window = {k: 0.0 for k in window} | {"n": 0}
            shown = {"loss": f"{summary['loss']:.3f}", "mask": f"{summary['mask']:.2f}"}
            if method == "freematch":
                shown["tau"] = f"{float(state.time_p):.2f}"
            bar.set_postfix(shown)
        bar.update(1)
        if done % lcfg.ckpt_every == 0 or done == lcfg.iterations:
            save(done)
        if on_iter is not None:
            on_iter(done, ema)
    bar.close()
    seconds = time.perf_counter() - t0
    ema.eval()
    return ema, {"iterations": lcfg.iterations, "resumed_at": start, "train_seconds": prior_seconds + seconds,
                 "final_window": summary, "time_p": float(state.time_p)}


# ----------------------------------------------------------------------------------------------
# Prediction and the saved classifier
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray | torch.Tensor, norm: Norm, batch_size: int = 1024,
            device: torch.device | str = "cpu") -> np.ndarray:
    """Class probabilities float32 [N, K] of uint8 images [N, C, H, W] (the model in eval mode)."""
    model.eval()
    x = torch.as_tensor(images)
    out = [model(norm(x[i:i + batch_size].to(device).float())).softmax(dim=-1).float().cpu()
           for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def save_learner(path: str | Path, model: nn.Module, meta: dict) -> None:
    """The classifier's weights (safetensors) with what rebuilds it in the metadata (JSON)."""
    save_safetensors(path, model.state_dict(), {"meta": json.dumps(meta, sort_keys=True)})


def read_learner_meta(path: str | Path, fix: str = REBUILD) -> dict:
    try:
        return json.loads(safetensors_metadata(path, fix).get("meta", "{}"))
    except ValueError:
        raise UserError(f"{path}: its metadata is not JSON; {fix}") from None


def load_learner(path: str | Path, device: torch.device | str = "cpu",
                 fix: str = REBUILD) -> tuple[nn.Module, dict, Norm]:
    """(model in eval mode, its metadata, its input normalisation) of a `save_learner` file; damaged bytes,
    other tensors or NaN/inf weights are one-line errors naming the file and `fix`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing: run `python -m dpt_fast.stage --stage 1` first")
    meta = read_learner_meta(path, fix)
    try:
        model = _build(meta)
        norm = Norm(tuple(meta["mean"]), tuple(meta["std"]))
        model.load_state_dict(load_safetensors(path, fix, finite=True))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: not a learner of this version ({type(e).__name__}: {str(e).splitlines()[0]}); "
                        f"{fix}") from None
    return model.to(device).eval(), meta, norm
