"""Stage 3: retrain the classifier on the real labelled images + the generated ones; top-1 on the test split.

As in the paper, the representation stays frozen (stage 1's, loaded from stage1/) and a new multinomial
logistic regression (stage 1's kind: the paper's, `models.logreg`, for backbone features) is fitted on
    the labelled training images with their true labels (weight 1), and
    the K generated images per class with the class they were generated for (weight stage3.generated_weight).
Its top-1 on the test images is reported next to stage 1's classifier on the same images.

With stage1.method=features nothing is held in memory but the classifier inputs: the labelled and test rows
come from the feature files stage 1 wrote, the generated images are embedded one shard at a time into
stage3/generated_features.npy (resumable like stage 1's, and re-used when only stage-3 settings change). The
other methods re-embed the in-memory images.

`stage3.min_confidence > 0` is a variant that is NOT the paper's default (which uses all K images): it keeps
only the generated images to which the stage-1 classifier gives at least that probability of their class.

split.json must hold the labelled images of this config's split.* (checked against the split recomputed from
the config): another list of valid indices is refused, not used. Under torchrun the ranks share the embedding
of the generated images (stage1.method=features); the classifier is fitted on rank 0 while the others wait.
"""
from __future__ import annotations

import json
import time

import numpy as np

from ..config import Config
from ..data import load_dataset, load_split, select_labelled
from ..data.stream import ShardSource, cached_features, open_features
from ..distributed import rank_world, run_on_rank0
from ..models.classifier import LinearHead, load_space
from ..models.logreg import fit_head
from ..ssl import METHODS as LEARNER_METHODS
from ..utils import UserError, load_npz, log, read_json, resolve_device
from .rundir import RunDir


def generated_source(rd: RunDir) -> ShardSource:
    """Stage 2's generated images as a source read one shard at a time (UserError if missing or unfinished)."""
    path = rd.require(rd.generated / "manifest.json", 2)
    man = read_json(path, rd.rerun(2))
    if not isinstance(man, dict) or not man.get("complete"):
        raise UserError(f"{rd.generated}: the generation is incomplete; re-run stage 2 to finish it")
    shards = sorted(rd.generated.glob("shard-*.npz"))
    if len(shards) != man.get("num_shards"):
        raise UserError(f"{rd.generated}: {len(shards)} shards but the manifest lists {man.get('num_shards')}; "
                        f"{rd.rerun(2)}")
    identity = json.dumps({k: man.get(k) for k in ("identity", "num_images", "k_per_class")}, sort_keys=True)
    return ShardSource(shards, identity)


def _streamed_inputs(cfg: Config, rd: RunDir, space, labelled: np.ndarray, progress: bool):
    """Classifier inputs of a backbone space from stage 1's feature files + the generated images, embedded
    shard by shard: (x_lab, y_lab, x_gen, gen_y, x_test, y_test)."""
    x_train = open_features(rd.stage(1) / "train_features.npy", 1)
    x_test = open_features(rd.stage(1) / "test_features.npy", 1)
    y_test = load_npz(rd.require(rd.stage(1) / "test_labels.npz", 1), ("label",))["label"].astype(np.int64)
    if len(y_test) != len(x_test):
        raise UserError(f"{rd.stage(1)}: test features and labels differ in length; re-run stage 1")
    if not len(labelled) or labelled.max() >= len(x_train):
        raise UserError(f"{rd.split}: labelled indices do not fit the {len(x_train)} training images; re-run stage 1")
    pl = load_npz(rd.require(rd.pseudo_labels, 1), ("index", "label", "prob"))
    if len(pl["label"]) != len(x_train) or not np.array_equal(pl["index"], np.arange(len(x_train))):
        raise UserError(f"{rd.pseudo_labels}: does not cover the {len(x_train)} training images; re-run stage 1")
    if not np.all(pl["prob"][labelled] == 1.0):
        raise UserError(f"{rd.pseudo_labels}: the labelled images of {rd.split} carry no true labels; re-run stage 1")
    y_lab = pl["label"][labelled].astype(np.int64)  # stage 1 keeps each labelled image's true label (prob 1)
    gen, x_gen = generated_features(rd, space, progress)
    return np.asarray(x_train[labelled]), y_lab, np.asarray(x_gen), gen.labels, x_test, y_test


def generated_features(rd: RunDir, space, progress: bool):
    """(source, float32 [N, D] memmap): the backbone features of the generated images, cached in stage3/ (under
    torchrun each rank computes its chunks)."""
    gen = generated_source(rd)
    x_gen = cached_features(space.embed_tensor, gen, rd.stage(3) / "generated_features.npy", key=space.identity(),
                            dim=space.dim, batch_size=space.batch_size, progress=progress,
                            desc="stage 3 features (generated)")
    return gen, x_gen


def _in_memory_inputs(cfg: Config, rd: RunDir, space, labelled: np.ndarray, progress: bool):
    """Classifier inputs of the other spaces, from the images in memory (small data sets)."""
    from ..sampling import load_generated

    gen_x, gen_y = load_generated(rd.generated)
    ds = load_dataset(cfg.data, progress=progress)
    if gen_x.shape[1:] != ds.x_train.shape[1:]:
        raise UserError(f"{rd.generated}: generated images are {tuple(gen_x.shape[1:])} but the data set's are "
                        f"{tuple(ds.x_train.shape[1:])}; re-run stage 2 with this config")
    if not len(labelled) or labelled.max() >= len(ds.y_train):
        raise UserError(f"{rd.split}: labelled indices do not fit the {len(ds.y_train)} training images; {rd.rerun(1)}")
    skipped = tuple(s["file"] for s in getattr(ds, "skipped", []))
    expected = select_labelled(cfg.split, ds.y_train, getattr(ds, "train_files", None) or None, skipped)
    if not np.array_equal(labelled, expected):
        raise UserError(f"{rd.split} does not hold the labelled images of this config's split.* ({len(labelled)} "
                        f"indices, {len(np.setdiff1d(labelled, expected))} not in the split); {rd.rerun(1)}")
    return (space.embed_train(ds.x_train, labelled), ds.y_train[labelled], space.embed(gen_x, progress=progress), gen_y,
            space.embed(ds.x_test, progress=progress), ds.y_test)


def run(cfg: Config, rd: RunDir, progress: bool = True) -> dict:
    """Fit the stage-3 classifier, save stage3/head.safetensors, return the metrics."""
    if cfg.stage1.method in LEARNER_METHODS:  # the learner is trained again, with the generated images (rank 0)
        from .learner import run_stage3

        return run_on_rank0(run_stage3, cfg, rd, progress)
    t0, c0 = time.time(), time.process_time()
    if rank_world()[1] > 1:
        space = load_space(rd.stage(1), resolve_device(cfg.device))
        if space.kind == "backbone":  # the ranks share the embedding; rank 0 then finds the cache complete
            generated_features(rd, space, progress)
    return run_on_rank0(_run, cfg, rd, progress, t0, c0)


def _run(cfg: Config, rd: RunDir, progress: bool, t0: float, c0: float) -> dict:
    m1 = read_json(rd.require(rd.metrics(1), 1), rd.rerun(1))
    rd.require(rd.generated, 2)
    device = resolve_device(cfg.device)
    space = load_space(rd.stage(1), device)
    head1 = LinearHead.load(rd.require(rd.stage(1) / "head.safetensors", 1), rd.rerun(1))
    num_classes = len(head1.intercept)
    labelled = np.sort(load_split(rd.split))
    inputs = _streamed_inputs if space.kind == "backbone" else _in_memory_inputs
    x_lab, y_lab, x_gen, gen_y, x_test, y_test = inputs(cfg, rd, space, labelled, progress)
    if len(gen_y) and (gen_y.min() < 0 or gen_y.max() >= num_classes):
        raise UserError(f"{rd.generated}: labels outside 0..{num_classes - 1}; re-run stage 2 with this config")

    # How the stage-1 classifier sees the generated images (a CAS computed with our own classifier).
    pred_gen, p_class = head1.label_prob(x_gen, gen_y, device=device)
    agree = pred_gen == gen_y
    keep = np.ones(len(gen_y), bool)
    if cfg.stage3.min_confidence > 0:
        keep = p_class >= cfg.stage3.min_confidence
        log.info("stage 3: stage3.min_confidence=%.2f keeps %d of %d generated images (not the paper's default)",
                 cfg.stage3.min_confidence, keep.sum(), len(keep))

    c = cfg.stage3.logreg_c or float(m1.get("logreg_c", 1.0))
    x = np.concatenate([x_lab, x_gen[keep]])
    y = np.concatenate([y_lab, gen_y[keep]])
    w = np.concatenate([np.ones(len(y_lab)), np.full(int(keep.sum()), cfg.stage3.generated_weight)])
    # the paper's classifier for backbone features (N = labelled + generated rows in its lambda = 0.0025 / N)
    head, fit_info = fit_head(space.kind == "backbone", x, y, c, num_classes, sample_weight=w, device=device)
    rd.stage(3).mkdir(parents=True, exist_ok=True)
    head.save(rd.stage(3) / "head.safetensors")

    hit3 = head.label_prob(x_test, device=device)[0] == y_test
    hit1 = head1.label_prob(x_test, device=device)[0] == y_test
    return {
        "method": m1.get("method"),
        **fit_info,
        **comparison_metrics(hit1, hit3, y_test, agree, gen_y, num_classes, m1),
        "labelled": int(len(labelled)),
        "generated_used": int(keep.sum()),
        "logreg_c": c,
        "seconds": time.time() - t0,
        "cpu_seconds": time.process_time() - c0,
    }


def comparison_metrics(hit1: np.ndarray, hit3: np.ndarray, y_test: np.ndarray, agree: np.ndarray,
                       gen_y: np.ndarray, num_classes: int, m1: dict) -> dict:
    """Stage 3 against stage 1 (both learners' stage 3 report it): top-1 on the test split of each (`hit1`,
    `hit3`: bool [N_test], the classifier's hits), overall and per class, and how often stage 1's classifier
    agrees with the class each generated image was made for (`agree`: bool [N_gen])."""
    top1, stage1_top1 = float(hit3.mean()), float(hit1.mean())
    if m1.get("test_top1") is not None and abs(stage1_top1 - float(m1["test_top1"])) > 1e-6:
        log.warning("stage 3: stage 1's classifier scores %.4f on the test split now, %.4f when stage 1 ran",
                    stage1_top1, m1["test_top1"])
    per_class = [y_test == k for k in range(num_classes)]
    return {
        "top1": top1,
        "stage1_top1": stage1_top1,
        "gain": top1 - stage1_top1,
        "top1_per_class": [float(hit3[m].mean()) if m.any() else 0.0 for m in per_class],
        "stage1_top1_per_class": [float(hit1[m].mean()) if m.any() else 0.0 for m in per_class],
        "generated": int(len(gen_y)),
        "generated_stage1_agreement": float(agree.mean()) if len(agree) else 0.0,
        "generated_stage1_agreement_per_class": [
            float(agree[gen_y == k].mean()) if (gen_y == k).any() else 0.0 for k in range(num_classes)],
    }
