"""Stage 3: retrain the classifier on the real labelled images + the generated ones; top-1 on the test split.

As in the paper, the representation stays frozen (stage 1's, loaded from stage1/) and a new multinomial
logistic regression is fitted on
    the labelled training images with their true labels (weight 1), and
    the K generated images per class with the class they were generated for (weight stage3.generated_weight).
Its top-1 on the test images is reported next to stage 1's classifier on the same images.

`stage3.min_confidence > 0` is a variant that is NOT the paper's default (which uses all K images): it keeps
only the generated images to which the stage-1 classifier gives at least that probability of their class.
"""
from __future__ import annotations

import time

import numpy as np

from ..config import Config
from ..data import load_dataset, load_split
from ..models.classifier import LinearHead, fit_logreg, load_space
from ..utils import UserError, log, read_json, resolve_device
from .rundir import RunDir


def run(cfg: Config, rd: RunDir, progress: bool = True) -> dict:
    """Fit the stage-3 classifier, save stage3/head.safetensors, return the metrics."""
    from ..sampling import load_generated

    t0, c0 = time.time(), time.process_time()
    m1 = read_json(rd.require(rd.metrics(1), 1))
    rd.require(rd.generated, 2)
    gen_x, gen_y = load_generated(rd.generated)
    ds = load_dataset(cfg.data)
    if gen_x.shape[1:] != ds.x_train.shape[1:]:
        raise UserError(f"{rd.generated}: generated images are {tuple(gen_x.shape[1:])} but the data set's are "
                        f"{tuple(ds.x_train.shape[1:])}; re-run stage 2 with this config")
    if len(gen_y) and (gen_y.min() < 0 or gen_y.max() >= ds.num_classes):
        raise UserError(f"{rd.generated}: labels outside 0..{ds.num_classes - 1}; re-run stage 2 with this config")
    labelled = load_split(rd.split, len(ds.y_train))
    y_lab = ds.y_train[labelled]

    space = load_space(rd.stage(1), resolve_device(cfg.device))
    head1 = LinearHead.load(rd.require(rd.stage(1) / "head.safetensors", 1))
    x_lab = space.embed_train(ds.x_train, labelled)
    x_gen = space.embed(gen_x, progress=progress)
    x_test = space.embed(ds.x_test, progress=progress)

    # How the stage-1 classifier sees the generated images (a CAS computed with our own classifier).
    p_gen = head1.predict_proba(x_gen)
    agree = p_gen.argmax(1) == gen_y
    keep = np.ones(len(gen_y), bool)
    if cfg.stage3.min_confidence > 0:
        keep = p_gen[np.arange(len(gen_y)), gen_y] >= cfg.stage3.min_confidence
        log.info("stage 3: stage3.min_confidence=%.2f keeps %d of %d generated images (not the paper's default)",
                 cfg.stage3.min_confidence, keep.sum(), len(keep))

    c = cfg.stage3.logreg_c or float(m1.get("logreg_c", 1.0))
    x = np.concatenate([x_lab, x_gen[keep]])
    y = np.concatenate([y_lab, gen_y[keep]])
    w = np.concatenate([np.ones(len(y_lab)), np.full(int(keep.sum()), cfg.stage3.generated_weight)])
    head = fit_logreg(x, y, c, ds.num_classes, sample_weight=w)
    rd.stage(3).mkdir(parents=True, exist_ok=True)
    head.save(rd.stage(3) / "head.safetensors")

    hit3, hit1 = head.predict(x_test) == ds.y_test, head1.predict(x_test) == ds.y_test
    top1, stage1_top1 = float(hit3.mean()), float(hit1.mean())
    per_class = [ds.y_test == k for k in range(ds.num_classes)]
    if abs(stage1_top1 - float(m1.get("test_top1", stage1_top1))) > 1e-6:
        log.warning("stage 3: stage 1's classifier scores %.4f on the test split now, %.4f when stage 1 ran",
                    stage1_top1, m1["test_top1"])
    return {
        "top1": top1,
        "stage1_top1": stage1_top1,
        "gain": top1 - stage1_top1,
        "top1_per_class": [float(hit3[m].mean()) if m.any() else 0.0 for m in per_class],
        "stage1_top1_per_class": [float(hit1[m].mean()) if m.any() else 0.0 for m in per_class],
        "labelled": int(len(labelled)),
        "generated": int(len(gen_y)),
        "generated_used": int(keep.sum()),
        "generated_stage1_agreement": float(agree.mean()) if len(agree) else 0.0,
        "generated_stage1_agreement_per_class": [
            float(agree[gen_y == k].mean()) if (gen_y == k).any() else 0.0 for k in range(ds.num_classes)],
        "logreg_c": c,
        "seconds": time.time() - t0,
        "cpu_seconds": time.process_time() - c0,
    }
