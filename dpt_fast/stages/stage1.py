"""Stage 1: the semi-supervised learner -> a pseudo-label (and its probability) for every training image.

In the paper's shape: a representation learned WITHOUT labels on all training images, then a multinomial
logistic regression fitted on the labelled images only. Methods (`stage1.method`):

- simclr_umap (embedded default): a small CNN trained with SimCLR on all training images; its features are
  reduced by UMAP (fitted on the training images); unseen images (test, generated) are placed in the UMAP space
  by a kNN in SimCLR feature space (see `models.classifier.SimclrUmapSpace`).
- pca_logreg: PCA of the pixels + logistic regression (the simple baseline).
- freematch, fixmatch (the paper's CIFAR-10 recipe): a classifier trained end to end by TorchSSL's FreeMatch or
  FixMatch; its EMA model labels the training images (`dpt_fast.stages.learner`, the `learner` config section).
- features (real data, the paper's recipe): frozen backbone features (MSN's ViT via `stage1.backbone=msn`, or a
  timm model; rows centred, L2-normalised) + the paper's logistic regression (`models.logreg`: no intercept,
  lambda = 0.0025 / N, cyanure's solution, fitted and applied on the GPU when there is one). The images are streamed in batches
  (`dpt_fast.data.stream`), so this works at ImageNet scale and is the only method for data.name=latents,
  whose images are decoded again from the folder the latents were prepared from (index i = latent i).

Outputs (run directory contract + what stage 3 needs, no pickle):
    split.json                      the labelled training indices
    stage1/pseudo_labels.npz        index, label (int64), prob (float32) for every training image; a labelled
                                    image carries its true label with prob 1.0, every other image the
                                    classifier's arg-max and its probability
    stage1/space.json, space.npz    the frozen representation: for simclr_umap the training images' SimCLR
                                    features and UMAP coordinates (what places unseen images), + the encoder
    stage1/encoder.safetensors      the trained SimCLR encoder (its config + SSL fingerprint in the metadata)
    stage1/simclr_ckpt.safetensors  while training: model, AdamW state and augmentation RNG after each epoch
    stage1/head.safetensors         the logistic-regression head
    stage1/train_features.npy/.json features only: float32 [N, D] backbone features of every training image
    stage1/test_features.npy/.json  (memory-mapped; filled in chunks, a killed run continues) and of the test
    stage1/test_labels.npz          images, with their labels: what stage 3 reads instead of the images
A killed run continues SimCLR from its last epoch and ends with the same weights as an uninterrupted one.
Re-running with another split but the same SSL/UMAP config reuses the encoder and the UMAP coordinates; a
damaged or missing encoder / UMAP file is rebuilt. A SimCLR loss that turns NaN/inf stops the run with a
one-line error naming the epoch, step and key (the last good epoch's checkpoint is kept). Under torchrun only
the feature extraction of stage1.method=features is shared by the ranks; everything else runs on rank 0 while
the others wait.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import Config
from ..data import ArrayDataset, save_split, select_labelled
from ..data.stream import RealData, cached_features, open_real_data
from ..distributed import run_on_rank0, setup_distributed
from ..models.classifier import PAPER_LOGREG_C, BackboneSpace, PcaSpace, SimclrUmapSpace, load_encoder, save_encoder
from ..models.logreg import fit_head
from ..models.encoder import ConvEncoder, augment, encode, nt_xent
from ..ssl import METHODS as LEARNER_METHODS
from ..utils import (UserError, load_safetensors, log, read_json, resolve_device, safetensors_metadata, save_npz,
                     save_safetensors)
from .rundir import RunDir

SSL_KEYS = ("ssl_epochs", "ssl_batch_size", "ssl_lr", "ssl_temperature", "ssl_noise", "feature_dim", "width")
UMAP_KEYS = ("umap_dim", "umap_neighbors", "umap_min_dist", "umap_epochs")


def _hash(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def ssl_fingerprint(cfg: Config) -> str:
    """What the trained encoder depends on: the data (not how stage 2 loads it), the seed and the SSL keys (not
    the labels)."""
    s = cfg.to_dict()
    data = {k: v for k, v in s["data"].items() if k != "stream"}
    return _hash({"data": data, "seed": cfg.seed, **{k: s["stage1"][k] for k in SSL_KEYS}})


def umap_fingerprint(cfg: Config) -> str:
    s = cfg.to_dict()
    return _hash({"ssl": ssl_fingerprint(cfg), **{k: s["stage1"][k] for k in UMAP_KEYS}})


# ----------------------------------------------------------------------------------------------
# SimCLR training, resumable
# ----------------------------------------------------------------------------------------------
def _save_checkpoint(path: Path, model: ConvEncoder, opt: torch.optim.Optimizer, gen: torch.Generator,
                     epoch: int, step: int, fingerprint: str) -> None:
    """Everything needed to continue exactly: weights + BN stats, Adam moments, the augmentation RNG."""
    tensors = {f"model.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    osd = opt.state_dict()
    for pid, st in osd["state"].items():
        for name, v in st.items():
            tensors[f"opt.{pid}.{name}"] = torch.as_tensor(v).clone().contiguous()
    tensors["rng"] = gen.get_state()
    meta = {"fingerprint": fingerprint, "epoch": str(epoch), "step": str(step),
            "param_groups": json.dumps(osd["param_groups"])}
    save_safetensors(path, tensors, meta)


def _load_checkpoint(path: Path, model: ConvEncoder, opt: torch.optim.Optimizer, gen: torch.Generator,
                     fingerprint: str) -> tuple[int, int]:
    """Restore a checkpoint in place; returns (epochs done, steps done), (0, 0) if none, stale or damaged."""
    if not path.is_file():
        return 0, 0
    try:
        meta = safetensors_metadata(path)
        if meta.get("fingerprint") != fingerprint:
            log.info("stage 1: ignoring SimCLR checkpoint %s made with another config", path)
            return 0, 0
        t = load_safetensors(path, finite=True)
    except UserError as e:
        log.warning("stage 1: ignoring a damaged SimCLR checkpoint (%s); training from the start", e)
        return 0, 0
    model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for k, v in t.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    gen.set_state(t["rng"])
    return int(meta["epoch"]), int(meta["step"])


def train_simclr(images: np.ndarray, cfg: Config, out: Path, progress: bool = True,
                 device: torch.device | str = "cpu", on_epoch=None) -> ConvEncoder:
    """Train the SimCLR encoder on uint8 images [N, C, H, W]; resumes from `out/simclr_ckpt.safetensors`.

    A checkpoint is written after every epoch. `on_epoch(epoch)` is called after each epoch's checkpoint
    (tests use it to simulate a kill). The finished encoder is `out/encoder.safetensors`; if that file
    already holds an encoder with this SSL fingerprint, it is returned without training.
    """
    s1 = cfg.stage1
    fp = ssl_fingerprint(cfg)
    final = out / "encoder.safetensors"
    if final.is_file():
        try:
            model, meta = load_encoder(final)
        except UserError as e:
            log.warning("stage 1: %s; training the encoder again", e)
            meta = {}
        if meta.get("fingerprint") == fp:
            log.info("stage 1: reusing the trained SimCLR encoder %s", final)
            return model
    torch.manual_seed(cfg.seed)
    model = ConvEncoder(images.shape[1], s1.width, s1.feature_dim).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=s1.ssl_lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(cfg.seed)
    ckpt = out / "simclr_ckpt.safetensors"
    start, step = _load_checkpoint(ckpt, model, opt, gen, fp)
    if start:
        log.info("stage 1: resuming SimCLR from %s (epoch %d of %d)", ckpt, start, s1.ssl_epochs)

    x = torch.as_tensor(images).float().div_(255.0)
    n = len(x)
    bs = min(s1.ssl_batch_size, n)
    steps_per_epoch = n // bs  # drop the ragged last batch: contrastive batches should be full
    total = s1.ssl_epochs * steps_per_epoch
    model.train()
    bar = tqdm(range(start, s1.ssl_epochs), desc="stage 1 SimCLR", unit="epoch", disable=not progress,
               initial=start, total=s1.ssl_epochs)
    for epoch in bar:
        perm = torch.randperm(n, generator=gen)
        loss_sum = 0.0
        for i in range(steps_per_epoch):
            lr = s1.ssl_lr * 0.5 * (1.0 + math.cos(math.pi * step / total))  # cosine decay, no warm-up
            for g in opt.param_groups:
                g["lr"] = lr
            xb = x[perm[i * bs:(i + 1) * bs]]
            v1 = augment(xb, gen, noise=s1.ssl_noise).to(device)
            v2 = augment(xb, gen, noise=s1.ssl_noise).to(device)
            loss = nt_xent(model.project(v1), model.project(v2), s1.ssl_temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_value = loss.item()  # the per-step sync SimCLR has always had (a tiny model: not a bottleneck)
            if not math.isfinite(loss_value):
                kept = f"the checkpoint of epoch {epoch} is kept" if epoch else "no epoch had finished"
                raise UserError(f"stage 1: SimCLR diverged at epoch {epoch + 1}, step {step} (loss {loss_value}); lower "
                                f"stage1.ssl_lr (now {s1.ssl_lr:g}) and re-run ({kept})")
            loss_sum += loss_value
        bar.set_postfix(loss=f"{loss_sum / steps_per_epoch:.3f}")
        _save_checkpoint(ckpt, model, opt, gen, epoch + 1, step, fp)
        if on_epoch is not None:
            on_epoch(epoch + 1)
    model.eval()
    meta = {"in_chans": int(images.shape[1]), "width": s1.width, "feature_dim": s1.feature_dim,
            "fingerprint": fp, "epochs": s1.ssl_epochs}
    save_encoder(model.cpu(), meta, final)
    ckpt.unlink(missing_ok=True)
    return model


# ----------------------------------------------------------------------------------------------
# UMAP on the training features
# ----------------------------------------------------------------------------------------------
def exact_knn(feats: np.ndarray, k: int, batch_size: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine kNN of L2-normalised rows (self included): int64 indices and float32 distances [N, k].

    Handing UMAP this graph skips its own neighbour search, which for N < 4096 calls a Python metric
    N^2 times (minutes on CPU for 4,000 images); a matrix product does it in milliseconds.
    """
    f = torch.from_numpy(np.ascontiguousarray(feats, np.float32))
    idx, dist = [], []
    for i in range(0, len(f), batch_size):
        top, ix = (f[i:i + batch_size] @ f.T).topk(k, dim=1)
        idx.append(ix)
        dist.append((1.0 - top).clamp_(min=0.0))
    return torch.cat(idx).numpy().astype(np.int64), torch.cat(dist).numpy().astype(np.float32)


def fit_umap(feats: np.ndarray, cfg: Config, progress: bool = True) -> np.ndarray:
    """UMAP coordinates float32 [N, umap_dim] of the training features (seeded by cfg.seed)."""
    import warnings

    import umap

    s1 = cfg.stage1
    k = min(s1.umap_neighbors, len(feats) - 1)
    reducer = umap.UMAP(n_components=s1.umap_dim, n_neighbors=k, min_dist=s1.umap_min_dist,
                        n_epochs=s1.umap_epochs, random_state=cfg.seed, precomputed_knn=exact_knn(feats, k),
                        tqdm_kwds={"desc": "stage 1 UMAP", "disable": not progress})
    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no NNDescent index (we never call transform); n_jobs with a seed
            coords = reducer.fit_transform(feats)
    finally:
        # numba's OpenMP layer starts with one thread per core and resets the process-wide OpenMP count
        # that torch uses; put torch's (cfg.num_threads) back so later stages run as configured.
        torch.set_num_threads(threads)
    return np.asarray(coords, np.float32)


def _simclr_umap_space(cfg: Config, ds: ArrayDataset, out: Path, progress: bool, device) -> SimclrUmapSpace:
    """The SimCLR -> UMAP representation, reusing a saved one (same SSL + UMAP fingerprint) when possible; a
    missing or damaged piece (encoder, UMAP coordinates) is made again."""
    fp = umap_fingerprint(cfg)
    saved = out / "space.json"
    try:
        if saved.is_file() and read_json(saved).get("fingerprint") == fp:
            space = SimclrUmapSpace.load(out, {"knn": cfg.stage1.knn_transform, "fingerprint": fp}, device)
            log.info("stage 1: reusing the SimCLR encoder and UMAP coordinates in %s", out)
            return space
    except (UserError, AttributeError) as e:
        log.warning("stage 1: cannot reuse the saved representation (%s); making it again", e)
    t0 = time.time()
    encoder = train_simclr(ds.x_train, cfg, out, progress=progress, device=device)
    t1 = time.time()
    feats = encode(encoder, ds.x_train, device=device)
    if not np.isfinite(feats).all():
        raise UserError(f"stage 1: the SimCLR encoder gives NaN/inf features; lower stage1.ssl_lr (now "
                        f"{cfg.stage1.ssl_lr:g}) and re-run")
    coords = fit_umap(feats, cfg, progress)
    log.info("stage 1: SimCLR %.1f s, UMAP %.1f s", t1 - t0, time.time() - t1)
    _, meta = load_encoder(out / "encoder.safetensors")
    return SimclrUmapSpace(encoder.cpu(), meta, feats, coords, cfg.stage1.knn_transform, device, fingerprint=fp)


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------
def logreg_c(cfg: Config) -> float:
    """stage1.logreg_c, or the method's default when it is 0 (see config.Stage1Config)."""
    if cfg.stage1.logreg_c > 0:
        return cfg.stage1.logreg_c
    return PAPER_LOGREG_C if cfg.stage1.method == "features" else 1.0


def backbone_features(cfg: Config, real: RealData, out: Path, device, progress: bool = True
                      ) -> tuple[BackboneSpace, np.ndarray, np.ndarray]:
    """The frozen backbone and its features of every training and test image: float32 [N, D], [M, D] memmaps.

    Cached in `out` (train_features.npy, test_features.npy) keyed by the backbone's weights and input and by the
    images, so a killed run continues where it stopped and a new split or C re-uses them.
    """
    s1 = cfg.stage1
    if not s1.backbone:
        raise UserError("stage1.method=features needs stage1.backbone=msn (or a timm model name) and "
                        "stage1.backbone_weights=FILE")
    space = BackboneSpace(s1.backbone, s1.backbone_weights, device, s1.backbone_image_size, s1.backbone_batch_size,
                          s1.backbone_crop, s1.backbone_precision)
    log.info("stage 1: %s features (dim %d, Resize %d + CenterCrop %d, %s) of %d training and %d test images on %s",
             s1.backbone, space.dim, space.resize, space.input_size[0], space.precision, len(real.train),
             len(real.test), device)
    key = space.identity()
    feats = []
    for part, src in (("train", real.train), ("test", real.test)):
        src, transformed = space.source_for(src)  # image files: decoded with the backbone's own transform
        feats.append(cached_features(functools.partial(space.embed_tensor, transformed=transformed), src,
                                     out / f"{part}_features.npy", key=key, dim=space.dim,
                                     batch_size=s1.backbone_batch_size, progress=progress,
                                     desc=f"stage 1 features ({part})"))
    return space, feats[0], feats[1]


def run(cfg: Config, rd: RunDir, progress: bool = True) -> dict:
    """Fit the semi-supervised learner, write split.json and stage1/pseudo_labels.npz; return the metrics.

    Under torchrun the ranks share the backbone feature extraction of stage1.method=features; the rest runs on
    rank 0 while the others wait (`run_on_rank0`): no two ranks write one file.
    """
    if cfg.data.name == "latents" and cfg.stage1.method != "features":
        raise UserError(f"stage1.method={cfg.stage1.method} needs the images in memory; data.name=latents streams them: "
                        "use stage1.method=features with stage1.backbone=msn stage1.backbone_weights=FILE")
    t0, c0 = time.time(), time.process_time()
    if cfg.stage1.method != "features":
        return run_on_rank0(_run, cfg, rd, progress, t0, c0)
    _, _, device = setup_distributed(resolve_device(cfg.device))
    real = open_real_data(cfg.data, device, progress)
    features = backbone_features(cfg, real, rd.stage(1), device, progress)  # every rank computes its chunks
    return run_on_rank0(_run, cfg, rd, progress, t0, c0, real, features)


def _run(cfg: Config, rd: RunDir, progress: bool, t0: float, c0: float, real: RealData | None = None,
         features=None) -> dict:
    s1 = cfg.stage1
    out = rd.stage(1)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    if real is None:
        real = open_real_data(cfg.data, device, progress)
    if real.num_classes < 2:
        raise UserError(f"{cfg.data.root or cfg.data.name}: the training images hold {real.num_classes} class "
                        f"({', '.join(map(str, real.classes))}); classification needs at least 2 classes (for an "
                        "ImageFolder: one sub-folder per class)")
    y = real.y_train
    labelled = select_labelled(cfg.split, y, real.files, real.skipped)
    save_split(rd.split, labelled, len(y), labels_per_class=cfg.split.labels_per_class,
               fraction=cfg.split.fraction, seed=cfg.split.seed, data=cfg.data.name)
    log.info("stage 1: %s on %s (%d threads), %d training images, %d labelled", s1.method, device,
             torch.get_num_threads(), len(y), len(labelled))
    if s1.method in LEARNER_METHODS:
        from .learner import run_stage1

        return run_stage1(cfg, rd, real.arrays, labelled, progress)

    if s1.method == "features":
        space, x_train, x_test = features
        save_npz(out / "test_labels.npz", label=real.y_test.astype(np.int64))
    else:
        ds = real.arrays
        if s1.method == "simclr_umap":
            space = _simclr_umap_space(cfg, ds, out, progress, device)
            x_train = space.train_coords
        else:  # pca_logreg
            space = PcaSpace.fit(ds.x_train, s1.pca_dim, cfg.seed)
            x_train = space.embed(ds.x_train)
        x_test = space.embed(ds.x_test, progress=progress)
    space.save(out)

    c = logreg_c(cfg)
    head, fit_info = fit_head(s1.method == "features", np.asarray(x_train[labelled]), y[labelled], c,
                                real.num_classes, device=device)
    head.save(out / "head.safetensors")
    label, conf = head.label_prob(x_train, device=device)
    fits_labels = float((label[labelled] == y[labelled]).mean())
    label[labelled], conf[labelled] = y[labelled], 1.0  # the known labels are kept, with certainty
    save_npz(rd.pseudo_labels, index=np.arange(len(y), dtype=np.int64), label=label, prob=conf)

    test_pred = head.label_prob(x_test, device=device)[0]
    unl = np.setdiff1d(np.arange(len(y)), labelled)
    return {
        "method": s1.method,
        **fit_info,
        "logreg_c": c,
        "pseudo_label_accuracy": float((label == y).mean()),
        "unlabelled_accuracy": float((label[unl] == y[unl]).mean()) if len(unl) else None,
        "labelled_fit_accuracy": fits_labels,
        "labelled": int(len(labelled)),
        "unlabelled": int(len(unl)),
        "test_top1": float((test_pred == real.y_test).mean()) if len(real.y_test) else None,
        "num_test": int(len(real.y_test)),
        "mean_confidence_unlabelled": float(conf[unl].mean()) if len(unl) else None,
        "pseudo_label_counts": np.bincount(label, minlength=real.num_classes).tolist(),
        "seconds": time.time() - t0,
        "cpu_seconds": time.process_time() - c0,
    }
