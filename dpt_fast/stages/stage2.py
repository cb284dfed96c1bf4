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
"""
from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import torch
import torch.distributed as dist

from ..config import Config
from ..data import load_dataset, to_float
from ..diffusion import make_schedule
from ..diffusion.train import setup_distributed, train_diffusion
from ..models import build_uvit
from ..sampling import generate, load_generated
from ..utils import UserError, load_npz, log, resolve_device, seed_everything
from .rundir import RunDir

# Train settings that do not change the weights at a given step: a checkpoint made with other values resumes.
_RESUMABLE_KEYS = ("steps", "ckpt_every", "keep_checkpoints", "log_every")


def load_pseudo_labels(rd: RunDir, n_train: int, num_classes: int) -> torch.Tensor:
    """The stage-1 pseudo-label of every training image, aligned by index: int64 [n_train]."""
    path = rd.require(rd.pseudo_labels, 1)
    z = load_npz(path, keys=("index", "label"))
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


def train_fingerprint(cfg: Config, labels: torch.Tensor) -> str:
    """What the weights at a given step depend on: data, labels, model, diffusion and train settings, seed."""
    d = cfg.to_dict()
    train = {k: v for k, v in d["train"].items() if k not in _RESUMABLE_KEYS}
    sub = {"seed": d["seed"], "data": d["data"], "model": d["model"], "diffusion": d["diffusion"], "train": train,
           "labels": hashlib.sha256(labels.numpy().tobytes()).hexdigest()}
    return hashlib.sha256(json.dumps(sub, sort_keys=True).encode()).hexdigest()[:16]


def run(cfg: Config, rd: RunDir, progress: bool = True) -> dict:
    t_start = time.time()
    rank, world, device = setup_distributed(resolve_device(cfg.device))
    data = load_dataset(cfg.data)
    num_classes = data.num_classes
    labels = load_pseudo_labels(rd, len(data.x_train), num_classes)
    x = to_float(data.x_train).to(device)  # the embedded sets fit in memory: batches are plain index gathers
    shape = tuple(x.shape[1:])

    seed_everything(cfg.seed)
    model = build_uvit(cfg.model, num_classes + 1)
    model_shape = (model.in_chans, model.img_size, model.img_size)
    if model_shape != shape:
        raise UserError(
            f"model.preset={cfg.model.preset} makes {model_shape[0]}x{model_shape[1]}x{model_shape[2]} images but "
            f"data.name={cfg.data.name} has {shape[0]}x{shape[1]}x{shape[2]}; set model.img_size / model.in_chans"
        )
    n_params = sum(p.numel() for p in model.parameters())
    log.info("stage 2: U-ViT %s (%.2fM parameters) on %s, %d images, %d classes + null, %s schedule", cfg.model.preset,
             n_params / 1e6, device, len(x), num_classes, cfg.diffusion.schedule)
    schedule = make_schedule(cfg.diffusion)
    fp = train_fingerprint(cfg, labels)

    res = train_diffusion(model, x, labels, schedule, cfg.train, num_classes=num_classes, seed=cfg.seed,
                          ckpt_dir=rd.checkpoints, fingerprint=fp, device=device, log_dir=rd.stage(2), progress=progress)
    del x

    s = cfg.sample
    gen = generate(res.ema, schedule, list(range(num_classes)), cfg.gen.k_per_class, shape, rd.generated,
                   null_class=num_classes, cfg_scale=s.cfg_scale, steps=s.steps, order=s.order, method=s.method,
                   algorithm=s.algorithm, skip_type=s.skip_type, batch_size=cfg.gen.batch_size,
                   shard_size=cfg.gen.shard_size, seed=cfg.seed, device=device, backend=s.backend,
                   cuda_graph=s.cuda_graph, progress=progress, model_id=f"{fp}@{res.step}")

    metrics = None
    if rank == 0:
        metrics = _evaluate(cfg, rd, data, device)
        metrics.update(
            images_per_second=gen["images_per_second"],
            gen_seconds=gen["seconds"],
            sampler_nfe=gen["nfe"],
            sampler_backend=gen["backend"],
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
    if world > 1:  # every rank returns the same metrics (the driver writes them on each)
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics


def _evaluate(cfg: Config, rd: RunDir, data, device: torch.device) -> dict:
    """samples.png and the generation metrics of the generated images against the real test images."""
    from ..eval import generation_metrics, save_grid

    images, labels = load_generated(rd.generated)
    save_grid(images, labels, rd.samples_png, per_class=10, num_classes=data.num_classes)
    real = data.x_test
    if 0 < cfg.eval.num_real < len(real):
        pick = np.random.default_rng(cfg.seed).choice(len(real), cfg.eval.num_real, replace=False)
        real = real[np.sort(pick)]
    t0 = time.time()
    if cfg.eval.fid:
        m = generation_metrics(images, labels, real, cfg.data.name, feature_net=cfg.eval.feature_net, device=str(device))
    else:  # CAS only: the share of generated images the feature network puts in their conditioning class
        from ..eval import load_feature_net, per_class_accuracy, shipped_feature_net, top1
        from ..eval.feature_nets import predict

        net = load_feature_net(cfg.eval.feature_net or shipped_feature_net(cfg.data.name), device)
        _, logits = predict(net, images)
        lab = torch.as_tensor(labels)
        m = {"fid": None, "is": None, "cas": top1(logits, lab), "cas_per_class": per_class_accuracy(logits, lab, net.num_classes),
             "num_generated": len(images), "num_real": len(real)}
    m["metrics_seconds"] = time.time() - t0
    return m


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)
