"""Sample ONE trained stage-2 model with several sampler settings: FID, CAS and a samples grid for each.

The model is a run directory's stage-2 checkpoint (EMA weights by default), so every setting is measured on the
same weights: the numbers of the README's "Stage-2 tuning" sampler rows.

    python scripts/sweep_sampler.py runs/base --out runs/sweep --variant base \
        --variant "tend1e-3 sample.t_end=1e-3" --variant "logsnr sample.skip_type=logSNR"

A variant is a name followed by `key=value` overrides of the run's config.yaml (sample.*, gen.*, ...). Writes
OUT/NAME.png (10 images per class) and appends one JSON line per variant to OUT/results.jsonl; prints a line
with FID / CAS / precision / recall and the CPU seconds of the generation.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import tempfile
import time
from pathlib import Path

import torch
import yaml

from dpt_fast.config import load_config
from dpt_fast.data import load_dataset
from dpt_fast.diffusion import make_schedule
from dpt_fast.diffusion.checkpoint import checkpoint_paths, latest_checkpoint
from dpt_fast.diffusion.train import as_eps_model
from dpt_fast.eval import generation_metrics, save_grid
from dpt_fast.models import build_uvit
from dpt_fast.sampling import generate, load_generated
from dpt_fast.stages.stage2 import sample_kwargs
from dpt_fast.utils import setup_logging


def load_weights(run_dir: Path, cfg, step: int, which: str) -> tuple[torch.nn.Module, int]:
    """The U-ViT of `run_dir`'s stage 2 with its EMA ('ema') or raw ('model') weights at `step` (0 = latest)."""
    from safetensors.torch import load_file

    ckpt = run_dir / "stage2" / "checkpoints"
    step = step or latest_checkpoint(ckpt)
    if step is None:
        raise SystemExit(f"{ckpt}: no checkpoint; run stage 2 first")
    tensors = load_file(str(checkpoint_paths(ckpt, step)[0]))
    model = build_uvit(cfg.model, 11)
    model.load_state_dict({k[len(which) + 1:]: v for k, v in tensors.items() if k.startswith(which + ".")})
    return model.eval().requires_grad_(False), step


class Probe(torch.nn.Module):
    """Sampler changes tried before they become sampler keys, as a wrapper of the eps-model under CFG.

    It applies the guidance itself (only for t in [t_lo, t_hi] when `interval` is set) and optionally clips the
    guided x0 estimate (`clip` 'static': to [-1, 1]; 'dynamic': Imagen's per-image 99.5 % quantile, the DPM-Solver
    reference's dynamic thresholding), then returns the result for both halves of the batch, so the solver's own
    guidance combination is the identity. Eager CPU only (it branches on t).
    """

    def __init__(self, eps_model, schedule, scale: float, interval=None, clip: str = ""):
        super().__init__()
        self.m, self.sch, self.scale, self.interval, self.clip = eps_model, schedule, scale, interval, clip

    def forward(self, x, t_in, y):
        b = x.shape[0] // 2
        t = float(t_in[0]) / 999.0
        if self.interval and not (self.interval[0] <= t <= self.interval[1]):
            e = self.m(x[:b], t_in[:b], y[:b])
        else:
            o = self.m(x, t_in, y)
            e = o[:b] + self.scale * (o[:b] - o[b:])
        if self.clip:
            tt = torch.full((b,), t, dtype=torch.float64)
            al, sg = (v.view(-1, 1, 1, 1).float() for v in (self.sch.marginal_alpha(tt), self.sch.marginal_std(tt)))
            x0 = (x[:b] - sg * e) / al
            if self.clip == "static":
                x0 = x0.clamp(-1, 1)
            else:
                q = torch.quantile(x0.abs().reshape(b, -1), 0.995, dim=1).clamp(min=1.0).view(-1, 1, 1, 1)
                x0 = x0.clamp(-q, q) / q
            e = (x[:b] - al * x0) / sg
        return torch.cat([e, e])


def first_order_final_step(t_end: float):
    """Patch the multistep second-order update so that the step onto `t_end` is first order (the reference's
    `lower_order_final`, which it applies only below 10 steps). Returns the undo function."""
    from dpt_fast.sampling import dpm_solver as ds

    orig = ds._multistep_second_update

    def patched(S, pp, solver_type, t_prev, t, m):
        return ds._first_update(S, pp, t_prev[-1], t, m[-1]) if abs(t - t_end) < 1e-9 else orig(S, pp, solver_type, t_prev, t, m)

    ds._multistep_second_update = patched
    return lambda: setattr(ds, "_multistep_second_update", orig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="directory for the grids and results.jsonl")
    p.add_argument("--variant", action="append", required=True, help='"NAME key=value ..." (repeatable)')
    p.add_argument("--step", type=int, default=0, help="checkpoint step (0 = the latest)")
    p.add_argument("--weights", default="ema", choices=["ema", "model"])
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    setup_logging(quiet=True)
    run_dir, out = Path(a.run_dir), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_config(str(run_dir / "config.yaml"))
    ds = load_dataset(base.data)
    model, step = load_weights(run_dir, base, a.step, a.weights)
    for spec in a.variant:
        name, *overrides = shlex.split(spec)
        probe = dict(o[1:].split("=", 1) for o in overrides if o.startswith("+"))
        cfg = load_config(str(run_dir / "config.yaml"), [o for o in overrides if not o.startswith("+")])
        sch = make_schedule(cfg.diffusion)
        eps_model = as_eps_model(model, sch, cfg.diffusion.prediction)
        extra = {k: yaml.safe_load(probe.pop(k)) for k in ("lower_order_final", "denoise_to_zero", "final_first_order") if k in probe}
        if probe:  # +interval=LO,HI and/or +clip=static|dynamic
            assert cfg.sample.cfg_scale != 0, "the probe applies the guidance itself: needs sample.cfg_scale != 0"
            interval = tuple(float(v) for v in probe["interval"].split(",")) if "interval" in probe else None
            eps_model = Probe(eps_model, sch, cfg.sample.cfg_scale, interval, probe.get("clip", ""))
        undo = first_order_final_step(cfg.sample.t_end or 1e-4) if extra.pop("final_first_order", False) else None
        work = Path(tempfile.mkdtemp(prefix=f"sweep_{name}_"))
        try:
            c0 = time.process_time()
            generate(eps_model, sch, list(range(10)), cfg.gen.k_per_class, ds.image_shape, work, null_class=10,
                     batch_size=cfg.gen.batch_size, shard_size=cfg.gen.shard_size, seed=cfg.seed, device="cpu",
                     progress=False, model_id=f"{a.weights}@{step}", **sample_kwargs(cfg.sample), **extra)
            cpu = time.process_time() - c0
            images, labels = load_generated(work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            if undo is not None:
                undo()
        save_grid(images, labels, out / f"{name}.png", per_class=10, num_classes=10)
        m = generation_metrics(images, labels, ds.x_test, cfg.data.name)
        row = {"name": name, "overrides": overrides, "weights": a.weights, "step": step, "gen_cpu_seconds": round(cpu, 1),
               **{k: m[k] for k in ("fid", "cas", "precision", "recall", "is")}}
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[{name}] {' '.join(overrides)}: FID {m['fid']:.2f} CAS {m['cas']:.3f} P {m['precision']:.2f} "
              f"R {m['recall']:.2f} IS {m['is']:.2f} | gen {cpu:.0f} CPU-s", flush=True)


if __name__ == "__main__":
    main()
