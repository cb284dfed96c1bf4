"""Quick stage-2 signal for tuning the embedded default: train the U-ViT on MNIST-5k to a few milestones and
report, at each, the held-out loss, how much the label moves the prediction, and CAS / FID of a small
generation (the numbers of the README's "Stage-2 tuning" table).

The labels are the true ones with 14 % of them flipped to a confusable digit (a stand-in for stage-1
pseudo-labels, so that stage 1 need not run first). Training resumes between milestones.

    python scripts/tune_stage2.py NAME --milestones 1000,2000 --cfgs 3 [key=value ...]

e.g. U-ViT's optimiser / eps-prediction / std-.02 positions against the preset:
    python scripts/tune_stage2.py uvit_optimiser --milestones 1000 --cfgs 3 diffusion.prediction=eps train.lr=2e-4 \
        "train.betas=[0.99,0.99]" model.pos_embed_init=trunc_normal
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dpt_fast.config import load_config
from dpt_fast.data import load_dataset, to_float
from dpt_fast.diffusion import make_schedule, model_time
from dpt_fast.diffusion.train import as_eps_model, diffusion_loss, sample_time, train_diffusion
from dpt_fast.eval import generation_metrics
from dpt_fast.models import build_uvit
from dpt_fast.sampling import generate, load_generated
from dpt_fast.utils import setup_logging

CONFUSABLE = torch.tensor([6, 7, 7, 5, 9, 3, 0, 9, 3, 4])  # digit -> the digit its flipped label becomes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name")
    p.add_argument("--milestones", default="1000", help="comma-separated training steps to evaluate at")
    p.add_argument("--cfgs", default="3", help="comma-separated CFG scales to sample with")
    p.add_argument("--k", type=int, default=10, help="generated images per class")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--flip", type=float, default=0.14, help="share of labels flipped to a confusable digit")
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args()
    torch.set_num_threads(a.threads)
    setup_logging(quiet=True)
    cfg = load_config("mnist5k", ["train.ckpt_every=100000", *a.overrides])
    ds = load_dataset(cfg.data)
    x, y_true = to_float(ds.x_train), torch.as_tensor(ds.y_train)
    flip = torch.as_tensor(np.random.default_rng(123).random(len(y_true)) < a.flip)
    y = torch.where(flip, CONFUSABLE[y_true], y_true)
    sch = make_schedule(cfg.diffusion)
    g = torch.Generator().manual_seed(99)
    xv, yv = to_float(ds.x_test[:400]), torch.as_tensor(ds.y_test[:400])
    tv, nv = sample_time(sch, 400, g, torch.device("cpu")), torch.randn(xv.shape, generator=g)
    work = Path(tempfile.mkdtemp(prefix=f"tune_{a.name}_"))
    cpu = 0.0
    try:
        for m in [int(s) for s in a.milestones.split(",")]:
            cfg.train.steps = m
            torch.manual_seed(cfg.seed)
            model = build_uvit(cfg.model, 11)
            c0 = time.process_time()
            r = train_diffusion(model, x, y, sch, cfg.train, num_classes=10, seed=0, ckpt_dir=work / "ckpt",
                                fingerprint="tune", device=torch.device("cpu"), progress=False,
                                prediction=cfg.diffusion.prediction)
            cpu += time.process_time() - c0
            ema = as_eps_model(r.ema, sch, cfg.diffusion.prediction)
            with torch.no_grad():
                val = diffusion_loss(ema, xv, yv, tv, nv, sch).item()
                # label effect: spread over the 10 labels of the x0 estimate from one x_t at t = 0.5
                tt = torch.full((10,), 0.5)
                al, s = sch.marginal_alpha(tt).view(-1, 1, 1, 1), sch.marginal_std(tt).view(-1, 1, 1, 1)
                xt = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(3)).expand(10, -1, -1, -1)
                x0 = (xt - s * ema(xt, model_time(sch, tt), torch.arange(10))) / al
                spread = (x0 - x0.mean(0)).pow(2).mean().sqrt().item()
            imgs = m * cfg.train.batch_size
            line = (f"[{a.name}] step {m} images {imgs} cpu {cpu:.0f}s ({imgs / cpu:.0f} img/cpu-s) "
                    f"val eps-loss {val:.4f} label spread {spread:.3f}")
            for cs in [float(c) for c in a.cfgs.split(",")]:
                gd = work / f"gen_{m}_{cs}"
                sc = cfg.sample
                generate(ema, sch, list(range(10)), a.k, (1, 28, 28), gd, null_class=10, cfg_scale=cs, steps=sc.steps,
                         order=sc.order, method=sc.method, algorithm=sc.algorithm, skip_type=sc.skip_type,
                         batch_size=100, shard_size=1000, seed=0, device="cpu", progress=False, model_id=str(m))
                im, lab = load_generated(gd)
                met = generation_metrics(im, lab, ds.x_test, "mnist5k")
                line += (f" | cfg {cs}: CAS {met['cas']:.3f} FID {met['fid']:.1f} "
                         f"P {met['precision']:.2f} R {met['recall']:.2f}")
            print(line, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
