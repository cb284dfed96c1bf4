"""Stages 1 and 3 for the end-to-end learners (stage1.method=freematch | fixmatch, the `learner` config section):
the paper's CIFAR-10 protocol.

Stage 1 trains the learner (`dpt_fast.ssl.train`) on the labelled images and all training images as unlabelled;
its EMA model labels every training image. Stage 3 trains the same learner again, from the same seed, with the
K generated images per class added to the labelled set (each with the class it was generated for; DPT's
`--aug_path`), and reports its top-1 on the test split next to the stage-1 model's.

With learner.init=simclr | simclr_umap the small CNN starts from a SimCLR encoder trained first on the training
images without labels (`stage1.train_simclr`, the stage1.ssl_* keys: stage1/encoder.safetensors, re-used by stage
3) and a linear head fitted to the labelled set (simclr) or to the SimCLR-UMAP classifier's labels (simclr_umap,
stage1/space.*); see `_start`. Stage 3 starts the same way with the generated images in the labelled set, so the
two stages differ only by the generated images.

Outputs beside the run-directory contract (README):
    stage1/learner.safetensors   the stage-1 EMA model (metadata: network, normalisation, fingerprint)
    stage1/checkpoints/          while training: step-<k>.safetensors + .json (model, EMA, optimizer, thresholds)
    stage3/learner.safetensors, stage3/checkpoints/   the same for stage 3
A finished learner file with the same fingerprint is reused; a killed run continues from its last checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..data import ArrayDataset, load_dataset, load_split
from ..models.wrn import build_net
from ..ssl.train import LearnerData, Norm, load_learner, net_meta, predict, read_learner_meta, save_learner, train_learner
from ..utils import UserError, log, read_json, resolve_device, save_npz
from .rundir import RunDir
from .stage3 import comparison_metrics


def learner_fingerprint(cfg: Config, labelled: np.ndarray, y_lab: np.ndarray, extra: str = "") -> str:
    """What a trained learner depends on: the data, the seed, the method, the learner keys and the labelled set
    (indices and labels; `extra` names added labelled images such as stage 2's generation)."""
    d = cfg.to_dict()
    key = {"data": d["data"], "seed": cfg.seed, "method": cfg.stage1.method, "learner": d["learner"],
           "labelled": hashlib.sha256(np.ascontiguousarray(labelled, np.int64).tobytes()
                                      + np.ascontiguousarray(y_lab, np.int64).tobytes()).hexdigest()[:16],
           "extra": extra}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _start(cfg: Config, rd: RunDir, ds: ArrayDataset, data: LearnerData, extra: np.ndarray | None, norm: Norm,
           progress: bool, device) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The network's starting weights for learner.init and what they depend on: (state dict, fingerprint part).

    simclr: the conv layers of the SimCLR encoder (trained by stage 1 without labels, re-used by stage 3) and a
      linear head fitted (logistic regression, C = stage 1's) to the labelled set's features.
    simclr_umap: the same conv layers and a head fitted to the labels the SimCLR-UMAP classifier (stage 1's
      simclr_umap method fitted on the labelled set) gives every training image.
    In stage 3 the labelled set holds the generated images too (`extra`: those images, uint8, after the real
    labelled ones in `data.x_lab`); the encoder and the UMAP coordinates are stage 1's, saved in stage1/.
    """
    init = cfg.learner.init
    if not init:
        return None, ""
    from ..models.classifier import fit_logreg
    from .stage1 import _simclr_umap_space, logreg_c, ssl_fingerprint, train_simclr, umap_fingerprint

    out = rd.stage(1)
    c = logreg_c(cfg)
    if init == "simclr_umap":  # trained (or re-used) in stage 1, re-used in stage 3
        space = _simclr_umap_space(cfg, ds, out, progress, device)
        if extra is None:
            space.save(out)
        encoder = space.encoder
        coords = space.train_coords[data.labelled]
        if extra is not None:
            coords = np.concatenate([coords, space.embed(extra)])
        targets = fit_logreg(coords, data.y_lab.numpy(), c, int(data.num_classes)).predict(space.train_coords)
        fp = f"simclr_umap:{umap_fingerprint(cfg)}:knn={cfg.stage1.knn_transform}:c={c}"
    else:
        encoder = train_simclr(ds.x_train, cfg, out, progress=progress, device=device)
        targets = None
        fp = f"simclr:{ssl_fingerprint(cfg)}:c={c}"
    fp += f":noise={cfg.stage1.ssl_noise}"
    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items() if k.startswith("backbone.")}
    net = build_net("cnn", int(data.x_unl.shape[1]), data.num_classes, cfg.learner.width)
    net.load_state_dict(state, strict=False)
    if targets is None:  # linear probe on the labelled set
        head = fit_logreg(backbone_features(net, data.x_lab, norm), data.y_lab.numpy(), c, data.num_classes)
    else:  # distil the SimCLR-UMAP classifier's labels of the training images
        head = fit_logreg(backbone_features(net, data.x_unl, norm), targets, 1.0, data.num_classes)
    state["fc.weight"] = torch.from_numpy(head.coef).float()
    state["fc.bias"] = torch.from_numpy(head.intercept).float()
    return state, fp


@torch.no_grad()
def backbone_features(net: torch.nn.Module, images: torch.Tensor, norm: Norm, batch_size: int = 512) -> np.ndarray:
    """The pooled conv features float64 [N, 4w] that the SmallCNN's linear head sees (eval mode)."""
    net.eval()
    return torch.cat([net.backbone(norm(images[i:i + batch_size].float()))
                      for i in range(0, len(images), batch_size)]).double().numpy()


def _norm(cfg: Config, images: np.ndarray) -> Norm:
    """The network's input normalisation: a SimCLR encoder's [-1, 1] when it starts from one, else per data set."""
    if cfg.learner.init:
        c = images.shape[1]
        return Norm((127.5,) * c, (127.5,) * c)
    return Norm.of(cfg.data.name, images)


def _train(cfg: Config, out: Path, data: LearnerData, num_classes: int, norm: Norm, fp: str, device,
           progress: bool, desc: str, init: dict[str, torch.Tensor] | None = None) -> tuple[torch.nn.Module, dict]:
    """The finished learner in `out` when its fingerprint matches, else train (resuming) and save it."""
    final = out / "learner.safetensors"
    if final.is_file():
        try:
            if read_learner_meta(final).get("fingerprint") == fp:
                model, meta, _ = load_learner(final, device)
                log.info("%s: reusing the trained learner %s", desc, final)
                return model, meta.get("train", {})
        except UserError as e:  # a damaged finished learner is trained again (its checkpoints resume it)
            log.warning("%s: %s; training it again", desc, e)
    model, summary = train_learner(data, cfg.learner, cfg.stage1.method, num_classes=num_classes, norm=norm,
                                   seed=cfg.seed, ckpt_dir=out / "checkpoints", fingerprint=fp, device=device,
                                   progress=progress, desc=desc, init=init)
    meta = net_meta(cfg.learner, int(data.x_unl.shape[1]), num_classes, norm)
    save_learner(final, model, {**meta, "fingerprint": fp, "method": cfg.stage1.method, "train": summary})
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return model, summary


def _top1(probs: np.ndarray, y: np.ndarray) -> float | None:
    return float((probs.argmax(1) == y).mean()) if len(y) else None


def run_stage1(cfg: Config, rd: RunDir, ds: ArrayDataset, labelled: np.ndarray, progress: bool = True) -> dict:
    """Train the learner on the labelled images; pseudo-label every training image with its EMA model."""
    t0, c0 = time.time(), time.process_time()
    out = rd.stage(1)
    device = resolve_device(cfg.device)
    y = ds.y_train
    norm = _norm(cfg, ds.x_train)
    x_train = torch.from_numpy(ds.x_train)
    data = LearnerData(x_train[torch.from_numpy(labelled)], torch.from_numpy(y[labelled]), x_train,
                       labelled, ds.num_classes)
    init, init_fp = _start(cfg, rd, ds, data, None, norm, progress, device)
    fp = learner_fingerprint(cfg, labelled, y[labelled], extra=init_fp)
    model, summary = _train(cfg, out, data, ds.num_classes, norm, fp, device, progress, f"stage 1 {cfg.stage1.method}",
                            init)

    bs = cfg.learner.eval_batch_size
    probs = predict(model, ds.x_train, norm, bs, device)
    label, conf = probs.argmax(1).astype(np.int64), probs.max(1).astype(np.float32)
    fits_labels = float((label[labelled] == y[labelled]).mean())
    label[labelled], conf[labelled] = y[labelled], 1.0  # the known labels are kept, with certainty
    save_npz(rd.pseudo_labels, index=np.arange(len(y), dtype=np.int64), label=label, prob=conf)
    test_probs = predict(model, ds.x_test, norm, bs, device)
    unl = np.setdiff1d(np.arange(len(y)), labelled)
    return {
        "method": cfg.stage1.method,
        "net": cfg.learner.net,
        "iterations": cfg.learner.iterations,
        "pseudo_label_accuracy": float((label == y).mean()),
        "unlabelled_accuracy": float((label[unl] == y[unl]).mean()) if len(unl) else None,
        "labelled_fit_accuracy": fits_labels,
        "labelled": int(len(labelled)),
        "unlabelled": int(len(unl)),
        "test_top1": _top1(test_probs, ds.y_test),
        "num_test": int(len(ds.y_test)),
        "mean_confidence_unlabelled": float(conf[unl].mean()) if len(unl) else None,
        "pseudo_label_counts": np.bincount(label, minlength=ds.num_classes).tolist(),
        "train": summary,
        "seconds": time.time() - t0,
        "cpu_seconds": time.process_time() - c0,
    }


def run_stage3(cfg: Config, rd: RunDir, progress: bool = True) -> dict:
    """Train the learner again with the generated images added to the labelled set; top-1 of both learners."""
    from ..sampling import load_generated

    t0, c0 = time.time(), time.process_time()
    m1 = read_json(rd.require(rd.metrics(1), 1), rd.rerun(1))
    model1, meta1, norm = load_learner(rd.require(rd.stage(1) / "learner.safetensors", 1), fix=rd.rerun(1))
    gen_x, gen_y = load_generated(rd.require(rd.generated, 2))
    ds = load_dataset(cfg.data, progress=progress)
    if gen_x.shape[1:] != ds.x_train.shape[1:]:
        raise UserError(f"{rd.generated}: generated images are {tuple(gen_x.shape[1:])} but the data set's are "
                        f"{tuple(ds.x_train.shape[1:])}; re-run stage 2 with this config")
    num_classes = int(meta1["num_classes"])
    if len(gen_y) and (gen_y.min() < 0 or gen_y.max() >= num_classes):
        raise UserError(f"{rd.generated}: labels outside 0..{num_classes - 1}; re-run stage 2 with this config")
    labelled = np.sort(load_split(rd.split, len(ds.y_train)))
    device = resolve_device(cfg.device)

    y_lab = np.concatenate([ds.y_train[labelled], gen_y]).astype(np.int64)
    x_train = torch.from_numpy(ds.x_train)
    data = LearnerData(torch.cat([x_train[torch.from_numpy(labelled)], torch.from_numpy(gen_x)]),
                       torch.from_numpy(y_lab), x_train, labelled, num_classes)
    gen_id = hashlib.sha256(np.ascontiguousarray(gen_x).tobytes() + gen_y.astype(np.int64).tobytes()).hexdigest()[:16]
    init, init_fp = _start(cfg, rd, ds, data, gen_x, norm, progress, device)
    fp = learner_fingerprint(cfg, labelled, ds.y_train[labelled], extra=f"{init_fp}generated:{gen_id}")
    out = rd.stage(3)
    out.mkdir(parents=True, exist_ok=True)
    model3, summary = _train(cfg, out, data, num_classes, norm, fp, device, progress, f"stage 3 {cfg.stage1.method}",
                             init)

    bs = cfg.learner.eval_batch_size
    hit3 = predict(model3, ds.x_test, norm, bs, device).argmax(1) == ds.y_test
    hit1 = predict(model1.to(device), ds.x_test, norm, bs, device).argmax(1) == ds.y_test
    agree = predict(model1, gen_x, norm, bs, device).argmax(1) == gen_y
    return {
        "method": cfg.stage1.method,
        **comparison_metrics(hit1, hit3, ds.y_test, agree, gen_y, num_classes, m1),
        "labelled": int(len(labelled)),
        "generated_used": int(len(gen_y)),
        "iterations": cfg.learner.iterations,
        "train": summary,
        "seconds": time.time() - t0,
        "cpu_seconds": time.process_time() - c0,
    }
