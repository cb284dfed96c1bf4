"""Stage 2 of DPT: a class-conditional U-ViT trained on all training images with their stage-1 pseudo-labels,
then K generated images per class (DPM-Solver++ with classifier-free guidance).

Reads   stage1/pseudo_labels.npz (index, label, prob)
Writes  stage2/checkpoints/      resumable model / EMA / optimizer checkpoints (latest + train.keep_checkpoints)
        stage2/generated/        K images per class, sharded npz with their classes (dpt_fast.sampling.generate)
        stage2/train_history.json, stage2/tb/   loss and LR curves (JSON for the report, TensorBoard)
        samples.png              one row per class
and returns the metrics (FID / IS / precision / recall / CAS against the real test images, generation
images/s, training steps/s, timings) that the driver writes to stage2/metrics.json.

Re-running continues: training resumes from the newest checkpoint (or is skipped when it reached
train.steps), generation keeps the finished shards made by the same weights and sampler settings.

`sample_run` draws N more samples from a finished run's EMA weights, with labels drawn as the official
scripts draw them, for FID-50K (`python -m dpt_fast.sample`).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..config import Config, SampleConfig
from ..data import load_dataset, to_float
from ..data.imagefolder import load_imagefolder
from ..data.vae import sample_latents
from ..diffusion import make_schedule
from ..diffusion.checkpoint import list_checkpoints, load_ema_weights, read_meta
from ..diffusion.train import BatchSource, as_eps_model, train_diffusion
from ..distributed import run_on_rank0, setup_distributed
from ..models import build_uvit
from ..sampling import generate, load_generated
from ..utils import UserError, load_npz, log, resolve_device, seed_everything
from .rundir import RunDir

# Train settings that do not change the weights at a given step: a checkpoint made with other values resumes.
_RESUMABLE_KEYS = ("steps", "ckpt_every", "keep_checkpoints", "log_every", "compile")
# Data settings stage 2 does not train on (the test split; source images that stages 1 and 3 re-decode).
_NOT_TRAINED_ON = ("test_root", "image_root", "stream")
# Model settings that change memory and speed, not the weights (gradient checkpointing recomputes the same values).
_NOT_WEIGHTS = ("use_checkpoint",)


def load_pseudo_labels(rd: RunDir, n_train: int, num_classes: int) -> torch.Tensor:
    """The stage-1 pseudo-label of every training image, aligned by index: int64 [n_train]."""
    path = rd.require(rd.pseudo_labels, 1)
    z = load_npz(path, keys=("index", "label"), fix=rd.rerun(1), spec={"index": ("iu", 1), "label": ("iu", 1)})
    index, label = z["index"].astype(np.int64), z["label"].astype(np.int64)
    if index.shape != label.shape or index.ndim != 1:
        raise UserError(f"{path}: 'index' and 'label' must be 1-D arrays of the same length; re-run stage 1")
    if len(index) and (index.min() < 0 or index.max() >= n_train):
        raise UserError(f"{path}: indices outside the {n_train} training images (another data set?); re-run stage 1")
    if len(label) and (label.min() < 0 or label.max() >= num_classes):
        raise UserError(f"{path}: labels outside 0..{num_classes - 1}; re-run stage 1")
    y = np.full(n_train, -1, dtype=np.int64)
    y[index] = label
    if (y < 0).any():
        raise UserError(f"{path}: {(y < 0).sum()} of the {n_train} training images have no pseudo-label; re-run stage 1")
    return torch.from_numpy(y)


def sample_kwargs(s: SampleConfig) -> dict:
    """The `generate` keywords of the sampler settings (`sample.*`; t_end 0 = the schedule's default)."""
    return dict(cfg_scale=s.cfg_scale, steps=s.steps, order=s.order, method=s.method, algorithm=s.algorithm,
                skip_type=s.skip_type, t_end=s.t_end or None, backend=s.backend, cuda_graph=s.cuda_graph,
                precision=s.precision)


def train_fingerprint(cfg: Config, labels: torch.Tensor) -> str:
    """What the weights at a given step depend on: data, labels, model, diffusion and train settings, seed."""
    d = cfg.to_dict()
    # A cosine LR decay ends at train.steps: then every step's weights depend on it.
    resumable = _RESUMABLE_KEYS if d["train"]["lr_decay"] == "none" else tuple(k for k in _RESUMABLE_KEYS if k != "steps")
    train = {k: v for k, v in d["train"].items() if k not in resumable}
    data = {k: v for k, v in d["data"].items() if k not in _NOT_TRAINED_ON}
    model = {k: v for k, v in d["model"].items() if k not in _NOT_WEIGHTS}
    sub = {"seed": d["seed"], "data": data, "model": model, "diffusion": d["diffusion"], "train": train,
           "labels": hashlib.sha256(labels.numpy().tobytes()).hexdigest()}
    return hashlib.sha256(json.dumps(sub, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class _Data:
    """What stage 2 trains on and evaluates against, for pixel and latent data alike."""

    x: torch.Tensor | BatchSource  # training samples: images in [-1, 1] or VAE latents
    num_classes: int
    shape: tuple[int, ...]  # [C, H, W] the diffusion model works in
    name: str  # data set name (picks the shipped feature network)
    real_images: Callable[[], np.ndarray]  # uint8 [M, C, H, W] reference images for FID
    decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # latents -> images in [-1, 1]
    # The labelled arrays (x_train, y_train, x_test, y_test) of an in-memory data set, for the literature's CAS.
    arrays: Optional[Callable[[], tuple[np.ndarray, ...]]] = None


class _Latents:
    """`BatchSource` over prepared VAE latents: z sampled from the stored moments of a randomly mirrored image.

    Mirror bits (CPU) and posterior noise (device) are drawn for the whole global batch and cut to `rows`."""

    def __init__(self, ds):
        self.ds = ds
        self.sample_shape = tuple(ds.latent_shape)

    def __len__(self) -> int:
        return len(self.ds)

    def read(self, index: torch.Tensor, rows: slice, seed: int) -> tuple[torch.Tensor, ...]:
        flips = torch.randint(0, 2, (len(index),), generator=torch.Generator().manual_seed(seed))[rows]
        return (self.ds.moments(index[rows].numpy(), flips.numpy()),)

    def finish(self, raw: tuple[torch.Tensor, ...], batch_size: int, rows: slice, seed: int) -> torch.Tensor:
        (moments,) = raw
        gen = torch.Generator(moments.device).manual_seed(seed)
        eps = torch.randn((batch_size, *self.sample_shape), generator=gen, device=moments.device)[rows]
        return sample_latents(moments, scale=self.ds.scale, eps=eps)


def _load_data(cfg: Config, device: torch.device, progress: bool = True) -> _Data:
    if cfg.data.name == "latents":
        from ..data.latents import LatentDataset
        from ..data.vae import decode, load_vae

        ds = LatentDataset(cfg.data.root)
        vae_path = ds.manifest.get("vae")
        vae = []  # loaded on first use: training does not need it

        def vae_decode(z: torch.Tensor) -> torch.Tensor:
            if not vae:
                vae.append(load_vae(vae_path, device))
            return decode(vae[0], z, scale=ds.scale).float().div_(127.5).sub_(1.0)

        def real() -> np.ndarray:  # VAE reconstructions of training images: FID then measures the diffusion model alone
            m = cfg.eval.num_real or min(len(ds), 1000)
            pick = np.sort(np.random.default_rng(cfg.seed).choice(len(ds), min(m, len(ds)), replace=False))
            mean = ds.moments(pick)[:, : ds.latent_shape[0]] * ds.scale
            return decode(load_vae(vae_path, device) if not vae else vae[0], mean.to(device), scale=ds.scale).cpu().numpy()

        return _Data(_Latents(ds), ds.num_classes, tuple(ds.latent_shape), "latents", real, vae_decode)

    split = None
    if cfg.data.name == "imagefolder" and cfg.data.stream is not False:
        from ..data.imagefolder import MAX_IN_MEMORY_BYTES, in_memory_bytes, split_imagefolder

        split = split_imagefolder(cfg.data, progress)
        if cfg.data.stream or in_memory_bytes(split, cfg.data.image_size) > MAX_IN_MEMORY_BYTES:
            return _streamed_folder(cfg, *split, device, progress)
    ds = load_dataset(cfg.data, progress=progress) if split is None else load_imagefolder(cfg.data, progress, split)

    def real_test() -> np.ndarray:
        real = ds.x_test
        if 0 < cfg.eval.num_real < len(real):
            real = real[np.sort(np.random.default_rng(cfg.seed).choice(len(real), cfg.eval.num_real, replace=False))]
        return real

    # The data sets read into memory fit there: a batch is one index gather, on the device.
    return _Data(to_float(ds.x_train).to(device), ds.num_classes, tuple(ds.image_shape), cfg.data.name, real_test,
                 arrays=lambda: (ds.x_train, ds.y_train, ds.x_test, ds.y_test))


def _streamed_folder(cfg: Config, train, test, device: torch.device, progress: bool) -> _Data:
    """An ImageFolder decoded while training (`TrainingStream`); the FID reference images are decoded on demand."""
    from ..data.imagefolder import decode_all
    from ..data.stream import TrainingStream

    size = cfg.data.image_size
    log.info("stage 2: streaming %d training images of %s at %d px (data.stream)", len(train), train.root, size)

    def real_test() -> np.ndarray:
        index = test
        if 0 < cfg.eval.num_real < len(test):
            keep = np.sort(np.random.default_rng(cfg.seed).choice(len(test), cfg.eval.num_real, replace=False))
            index = test.subset(keep)
        return decode_all(index, size, progress) if len(index) else np.zeros((0, 3, size, size), np.uint8)

    return _Data(TrainingStream(train, size, device), len(train.classes), (3, size, size), "imagefolder", real_test)


def run(cfg: Config, rd: RunDir, progress: bool = True) -> dict:
    t_start = time.time()
    _, world, device = setup_distributed(resolve_device(cfg.device))
    data = _load_data(cfg, device, progress)
    num_classes = data.num_classes
    labels = load_pseudo_labels(rd, len(data.x), num_classes)

    seed_everything(cfg.seed)
    model = build_uvit(cfg.model, num_classes + 1)
    model_shape = (model.in_chans, model.img_size, model.img_size)
    if model_shape != data.shape:
        raise UserError(
            f"model.preset={cfg.model.preset} works on {'x'.join(map(str, model_shape))} inputs but data.name={cfg.data.name} "
            f"has {'x'.join(map(str, data.shape))}; set model.img_size / model.in_chans (or another model.preset)"
        )
    n_params = sum(p.numel() for p in model.parameters())
    log.info("stage 2: U-ViT %s (%.2fM parameters) on %s, %d training samples %s, %d classes + null, %s schedule",
             cfg.model.preset, n_params / 1e6, device, len(data.x), "x".join(map(str, data.shape)), num_classes,
             cfg.diffusion.schedule)
    schedule = make_schedule(cfg.diffusion)
    fp = train_fingerprint(cfg, labels)

    res = train_diffusion(model, data.x, labels, schedule, cfg.train, num_classes=num_classes, seed=cfg.seed,
                          ckpt_dir=rd.checkpoints, fingerprint=fp, device=device, log_dir=rd.stage(2), progress=progress,
                          prediction=cfg.diffusion.prediction)
    data.x = None  # free the training set before sampling

    gen = generate(as_eps_model(res.ema, schedule, cfg.diffusion.prediction), schedule, list(range(num_classes)),
                   shape=data.shape, out_dir=rd.generated, null_class=num_classes, device=device, decode=data.decode,
                   progress=progress, model_id=f"{fp}@{res.step}", **generation_settings(cfg))

    def evaluate() -> dict:  # rank 0 only (run_on_rank0): the others wait, then get the same metrics
        metrics = _evaluate(cfg, rd, data, device)
        metrics.update(
            images_per_second=gen["images_per_second"],
            gen_seconds=gen["seconds"],
            sampler_nfe=gen["nfe"],
            sampler_backend=gen["backend"],
            sampler_precision=gen["precision"],
            sampler_cuda_graph=gen["cuda_graph"],
            sampler_cuda_graph_fallback=gen["cuda_graph_fallback"],  # why graphs were asked for but not used
            train_steps=res.step,
            train_resumed_from=res.start_step,
            train_seconds=res.seconds,
            train_total_seconds=res.total_seconds,
            train_steps_per_second=res.steps_per_second,
            train_images_per_second=res.steps_per_second * cfg.train.batch_size,
            final_loss=res.history["loss"][-1] if res.history.get("loss") else None,
            model_params=n_params,
            world_size=world,
            seconds=time.time() - t_start,
        )
        log.info("stage 2: FID %s, CAS %s; %.1f train img/s, %.1f generated img/s", _fmt(metrics["fid"], ".2f"),
                 _fmt(metrics["cas"], ".3f"), metrics["train_images_per_second"], metrics["images_per_second"])
        return metrics

    return run_on_rank0(evaluate)


def generation_settings(cfg: Config) -> dict:
    """The `generate` arguments stage 2 takes from the config: K, the sampler, batching, sharding and the seed."""
    g = cfg.gen
    return {"k_per_class": g.k_per_class, "batch_size": g.batch_size, "shard_size": g.shard_size, "seed": cfg.seed,
            **sample_kwargs(cfg.sample)}


def _evaluate(cfg: Config, rd: RunDir, data: _Data, device: torch.device) -> dict:
    """samples.png and the generation metrics of the generated images against the real reference images."""
    from ..eval import class_agreement, generation_metrics, save_grid

    images, labels = load_generated(rd.generated, per_class=cfg.eval.num_gen_per_class)
    save_grid(images, labels, rd.samples_png, per_class=10, num_classes=data.num_classes)
    t0 = time.time()
    none = {"fid": None, "is": None, "cas": None, "num_generated": len(images)}
    if data.name == "latents" and not cfg.eval.feature_net:
        log.warning("stage 2: no feature network for latent data: set eval.feature_net (e.g. torch-fidelity's Inception "
                    "weights) to get FID/IS; metrics skipped")
        return none
    if cfg.eval.fid:
        m = generation_metrics(images, labels, data.real_images(), data.name, feature_net=cfg.eval.feature_net,
                               device=str(device))
    else:  # CAS only: the share of generated images the feature network puts in their conditioning class
        m = class_agreement(images, labels, data.name, feature_net=cfg.eval.feature_net, device=str(device))
    m.update(_train_on_generated(cfg, data, images, labels))
    m["metrics_seconds"] = time.time() - t0
    return m


def _train_on_generated(cfg: Config, data: _Data, images: np.ndarray, labels: np.ndarray) -> dict:
    """The literature's CAS (Ravuri & Vinyals 2019; `classification_accuracy_scores`): a small classifier trained
    only on the generated images, top-1 on the real test split, beside the same classifier trained on as many real
    training images. In-memory data sets with images of at most 64 px a side (a few CPU seconds at 28x28)."""
    from ..eval.accuracy import classification_accuracy_scores

    none = {"classification_accuracy_score": None, "classification_accuracy_score_real": None}
    if cfg.eval.cas_steps == 0:
        return none
    if data.arrays is None or max(data.shape[1:]) > 64 or data.decode is not None:
        return {**none, "classification_accuracy_score_skipped": "only for in-memory data sets of images <= 64 px"}
    x_train, y_train, x_test, y_test = data.arrays()
    return classification_accuracy_scores(images, labels, x_train, y_train, x_test, y_test, data.num_classes,
                                          steps=cfg.eval.cas_steps, seed=cfg.seed)


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


# ----------------------------------------------------------------------------------------------
# More samples from a finished run (FID-50K)
# ----------------------------------------------------------------------------------------------
LABEL_DRAWS = ("uniform", "pseudo")
_LABEL_STREAM = 0x4C42  # keeps the label draw independent of every other use of the seed


def draw_labels(mode: str, num: int, num_classes: int, seed: int, pseudo_labels: Optional[np.ndarray] = None) -> np.ndarray:
    """The classes of `num` samples, drawn i.i.d.: int64 [num].

    'uniform': uniform over the classes (the official ImageNet `sample_label` of U-ViT / DPT datasets.py,
    torch.randint(0, 1000)). 'pseudo': in proportion to the class counts of `pseudo_labels` (the official DPT
    CIFAR-10 `sample_label`, torch.multinomial over the counts of the labels stage 2 trained on). A pure function
    of (mode, seed, class weights) whose first n labels are the same for every num >= n, so a larger run keeps
    a smaller one's samples.
    """
    if mode == "uniform":
        weights = np.ones(num_classes)
    elif mode == "pseudo":
        weights = np.bincount(np.asarray(pseudo_labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    else:
        raise UserError(f"labels {mode!r}: use one of {', '.join(LABEL_DRAWS)}")
    cdf = np.cumsum(weights) / weights.sum()
    u = np.random.default_rng([seed, _LABEL_STREAM]).random(num)
    return np.minimum(np.searchsorted(cdf, u, side="right"), num_classes - 1).astype(np.int64)


def sample_run(cfg: Config, rd: RunDir, num: int, labels: str, out_dir: str | Path, *, seed: Optional[int] = None,
               progress: bool = True) -> dict:
    """`num` samples of the finished stage-2 run in `rd` (EMA weights at train.steps) into `out_dir`.

    The format is stage2/generated's (`dpt_fast.sampling.load_generated`); the sampler is `cfg.sample`, the
    batch and shard sizes `cfg.gen`. Labels: `draw_labels(labels, ...)` with `seed` (default cfg.seed), which
    also seeds each image's noise. Resumable and sharded across torchrun ranks like stage 2's generation.
    Returns `generate`'s summary plus the label draw.
    """
    if num < 1:
        raise UserError(f"--num {num}: ask for at least one sample")
    seed = cfg.seed if seed is None else int(seed)
    _, _, device = setup_distributed(resolve_device(cfg.device))
    if cfg.train.steps not in list_checkpoints(rd.checkpoints):
        raise UserError(f"{rd.checkpoints} holds no checkpoint of step train.steps={cfg.train.steps}: run "
                        f"`python -m dpt_fast.stage --stage 2 --run-dir {rd.root}` to finish stage 2 first")
    data = _load_data(cfg, device, progress)
    data.x = None  # only the classes, the shape and the decoder are needed
    pseudo = load_npz(rd.require(rd.pseudo_labels, 1), keys=("label",))["label"] if labels == "pseudo" else None
    y = draw_labels(labels, num, data.num_classes, seed, pseudo)

    model = build_uvit(cfg.model, data.num_classes + 1)
    try:
        model.load_state_dict(load_ema_weights(rd.checkpoints, cfg.train.steps))
    except RuntimeError as e:
        raise UserError(f"{rd.checkpoints}: the EMA weights do not fit model.* of {rd.config} "
                        f"({str(e).strip().splitlines()[0]}); sample with the run's own model settings") from None
    model.to(device).eval()
    meta = read_meta(rd.checkpoints, cfg.train.steps)
    schedule = make_schedule(cfg.diffusion)
    gen = generate(as_eps_model(model, schedule, cfg.diffusion.prediction), schedule, [], 0, data.shape, out_dir,
                   labels=y, null_class=data.num_classes, batch_size=cfg.gen.batch_size,
                   shard_size=cfg.gen.shard_size, seed=seed, device=device, decode=data.decode, progress=progress,
                   model_id=f"{meta.get('fingerprint')}@{cfg.train.steps}", **sample_kwargs(cfg.sample))
    counts = np.bincount(y, minlength=data.num_classes)
    return {**gen, "labels": labels, "seed": seed, "classes_drawn": int((counts > 0).sum()),
            "max_per_class": int(counts.max()), "run_dir": str(rd.root), "step": cfg.train.steps}
