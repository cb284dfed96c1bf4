"""Training of the class-conditional diffusion model (DPT stage 2), top to bottom.

Loss: epsilon prediction with plain MSE (U-ViT / DDPM "L_simple"):

    t ~ U(t_min, 1) (continuous linear VP) or t = n/N, n ~ U{1..N} (discrete betas)
    x_t = alpha_t x_0 + sigma_t eps,      loss = || model(x_t, model_time(t), y) - eps ||^2

with the label replaced by the null class (index `num_classes`) with probability p_uncond, for classifier-free
guidance. AdamW with linear warm-up then a constant LR, optional gradient clipping, an EMA of the weights,
bf16 autocast on CUDA, DDP under torchrun. The keys that switch to the official U-ViT/DPT conventions
(t_min=0, warmup_from_zero, ema_warmup=False, weight_decay_on=all, grad_clip=0) are documented in
docs/PAPER.md.

Determinism: every random draw of step s (which images, t, eps, which labels are dropped) comes from
generators seeded by (seed, s), and the batch of step s is a slice of a seeded per-epoch permutation of the
whole data set. A run resumed from the checkpoint of step s therefore continues exactly as if it had never
stopped, and N DDP processes (each taking its slice of the same global batch) compute the same update as one
process, up to floating-point summation order.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..distributed import barrier, rank_world
from ..utils import UserError, log, read_json, write_json
from .checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, read_meta, save_checkpoint
from .schedule import NoiseScheduleVP, model_time

# Independent random streams per step.
_STREAM_PERM, _STREAM_STEP, _STREAM_DATA = 0, 1, 2


class BatchSource(Protocol):
    """Training data that is not one in-memory tensor (e.g. memory-mapped VAE latent moments)."""

    sample_shape: tuple[int, ...]  # [C, H, W] of one training sample

    def __len__(self) -> int: ...

    def __call__(self, index: torch.Tensor, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """float [len(index), *sample_shape] on `device`; any randomness (latent sampling, flips) from `generator`."""


# ----------------------------------------------------------------------------------------------
# Pieces of the loop
# ----------------------------------------------------------------------------------------------
def step_seed(seed: int, stream: int, *counters: int) -> int:
    """A 63-bit seed for (run seed, stream, counters...); statistically independent across arguments."""
    return int(np.random.SeedSequence([seed, stream, *counters]).generate_state(1, np.uint64)[0]) >> 1


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch: randperm(n) seeded by (seed, epoch). int64 [n] on CPU."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(seed, _STREAM_PERM, epoch)))


def batch_indices(step: int, batch_size: int, n: int, seed: int, perms: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Data indices of the global batch of `step`: positions [step*B, (step+1)*B) of the endless stream of
    per-epoch permutations. int64 [B] on CPU. `perms` caches the permutations between calls (epochs that
    are behind the current batch are dropped from it)."""
    perms = {} if perms is None else perms
    start = step * batch_size
    pos = torch.arange(start, start + batch_size)
    out = torch.empty(batch_size, dtype=torch.long)
    first, last = start // n, (start + batch_size - 1) // n
    for epoch in [e for e in perms if e < first]:
        del perms[epoch]
    for epoch in range(first, last + 1):
        if epoch not in perms:
            perms[epoch] = epoch_permutation(n, seed, epoch)
        sel = (pos // n) == epoch
        out[sel] = perms[epoch][pos[sel] % n]
    return out


def sample_time(schedule, batch_size: int, generator: torch.Generator, device: torch.device,
                t_min: Optional[float] = None) -> torch.Tensor:
    """Training times t in [t_min, 1], float32 [B]: n/N with n ~ U{1..N} for a discrete schedule (official
    train_ldm_discrete), t ~ U(t_min, 1) for the continuous one (official U-ViT sde.py: t_min = 0; default
    schedule.eps = 1/N)."""
    if schedule.schedule == "discrete":
        n = torch.randint(1, schedule.total_N + 1, (batch_size,), generator=generator, device=device)
        return n.float() / schedule.total_N
    t_min = schedule.eps if t_min is None else float(t_min)
    return t_min + (1.0 - t_min) * torch.rand(batch_size, generator=generator, device=device)


@dataclass
class StepDraws:
    """The random draws of one training step for the global batch (all on `device` except `index`)."""

    index: torch.Tensor  # int64 [B] data indices (CPU)
    t: torch.Tensor  # float32 [B] times in (0, 1]
    drop: torch.Tensor  # bool [B] label replaced by the null class
    noise: torch.Tensor  # float32 [B, *sample_shape]

    def shard(self, lo: int, hi: int) -> "StepDraws":
        return StepDraws(self.index[lo:hi], self.t[lo:hi], self.drop[lo:hi], self.noise[lo:hi])


def draw_step(step: int, seed: int, batch_size: int, n: int, sample_shape: tuple[int, ...], schedule,
              p_uncond: float, device: torch.device, perms: dict[int, torch.Tensor] | None = None,
              t_min: Optional[float] = None) -> StepDraws:
    """Everything random about step `step`, a pure function of (seed, step). `perms`: see `batch_indices`;
    `t_min`: see `sample_time`."""
    gen = torch.Generator(device=device).manual_seed(step_seed(seed, _STREAM_STEP, step))
    t = sample_time(schedule, batch_size, gen, device, t_min)
    drop = torch.rand(batch_size, generator=gen, device=device) < p_uncond
    noise = torch.randn((batch_size, *sample_shape), generator=gen, device=device)
    return StepDraws(batch_indices(step, batch_size, n, seed, perms), t, drop, noise)


def lr_at(step: int, lr: float, warmup_steps: int, from_zero: bool = False) -> float:
    """Linear warm-up over `warmup_steps`, then constant. `step` counts from 0. from_zero: lr * min(1, step / W)
    (official U-ViT/DPT `customized_lr_scheduler`, a LambdaLR: the first step has LR 0); else
    lr * min(1, (step + 1) / W)."""
    if warmup_steps <= 0:
        return lr
    return lr * min(1.0, (step + (0 if from_zero else 1)) / warmup_steps)


def ema_decay_at(step: int, decay: float, warmup: bool = True) -> float:
    """EMA decay of update `step` (from 0). With warm-up: min(decay, (1 + n) / (10 + n)), so that a short run's
    EMA is not dominated by its random initialisation (the usual 0.9999 would average over 10k steps); without:
    `decay` from the first update (official U-ViT/DPT `TrainState.ema_update(0.9999)`)."""
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for parameters; buffers are copied."""
    e_params = [p for p in ema.parameters()]
    m_params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(e_params, m_params, 1.0 - decay)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)


def param_groups(model: nn.Module, weight_decay: float, on: str = "matrices") -> list[dict]:
    """on='matrices': weight decay on matrices and conv kernels only, not on biases, norms (1-D) nor on the
    names the model lists in `no_weight_decay()` (the U-ViT's pos_embed). on='all': one group, every
    parameter decays (the official U-ViT/DPT optimiser)."""
    if on == "all":
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, tcfg, device: torch.device) -> torch.optim.AdamW:
    # The fused kernel is the fastest AdamW on CUDA and on CPU (torch >= 2.4).
    return torch.optim.AdamW(param_groups(model, tcfg.weight_decay, tcfg.weight_decay_on), lr=tcfg.lr,
                             betas=tuple(tcfg.betas), fused=True)


def diffusion_loss(
    model: nn.Module, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: NoiseScheduleVP,
    prediction: str = "eps",
) -> torch.Tensor:
    """Plain MSE of the model's prediction. x0, noise: [B, C, H, W]; y: int64 [B]; t: [B] in (0, 1]. Scalar, fp32.

    prediction 'eps' (the paper's): target eps. 'v' (Salimans & Ho 2022): target v = alpha eps - sigma x0, the same
    loss as eps-prediction weighted by (1 + SNR) / SNR, which puts far more weight on the high-noise times where
    a model learns the global shape of an image and its class.
    """
    shape = (-1,) + (1,) * (x0.ndim - 1)
    alpha = schedule.marginal_alpha(t).view(shape).to(x0.dtype)
    sigma = schedule.marginal_std(t).view(shape).to(x0.dtype)
    x_t = alpha * x0 + sigma * noise
    pred = model(x_t, model_time(schedule, t), y)
    target = noise if prediction == "eps" else alpha * noise - sigma * x0
    return F.mse_loss(pred.float(), target.float())


class EpsFromV(nn.Module):
    """A v-prediction model seen as an eps-prediction one (eps = alpha v + sigma x_t), for the samplers."""

    def __init__(self, model: nn.Module, schedule: NoiseScheduleVP):
        super().__init__()
        self.model, self.schedule = model, schedule
        self.time_scale = float(model_time(schedule, torch.ones(())))  # model_time is t times this

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        t = (timesteps.float() / self.time_scale).view(-1, *([1] * (x.ndim - 1)))
        alpha, sigma = self.schedule.marginal_alpha(t).to(x.dtype), self.schedule.marginal_std(t).to(x.dtype)
        return alpha * self.model(x, timesteps, y) + sigma * x


def as_eps_model(model: nn.Module, schedule: NoiseScheduleVP, prediction: str) -> nn.Module:
    """The eps-prediction view of a model trained with `prediction` ('eps' or 'v')."""
    return model if prediction == "eps" else EpsFromV(model, schedule)


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """bf16 autocast on CUDA for 'auto'; None = plain fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    model: nn.Module  # the trained (bare) model
    ema: nn.Module  # its EMA, the one to sample from
    step: int  # steps done in total
    start_step: int  # where this call started (0, or the checkpoint it resumed from)
    seconds: float  # wall time of the steps run by this call
    total_seconds: float  # wall time of all `step` steps, over every call that trained them
    history: dict = field(default_factory=dict)  # {"step": [...], "loss": [...], "lr": [...]}

    @property
    def steps_per_second(self) -> float:
        """Training speed over all steps (including those of runs this one resumed)."""
        return self.step / self.total_seconds if self.total_seconds > 0 else 0.0


def train_diffusion(
    model: nn.Module,
    x: torch.Tensor | BatchSource,
    y: torch.Tensor,
    schedule: NoiseScheduleVP,
    tcfg,
    *,
    num_classes: int,
    seed: int,
    ckpt_dir: str | Path,
    fingerprint: str,
    device: torch.device,
    log_dir: str | Path | None = None,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    prediction: str = "eps",
) -> TrainResult:
    """Train `model` for `tcfg.steps` steps in total, resuming from the newest checkpoint in `ckpt_dir`.

    x: the training images, float [N, C, H, W] in [-1, 1] (any device; batches are moved to `device`), or a
    `BatchSource` (e.g. VAE latents); y: int64 [N] (pseudo-)labels in [0, num_classes); the null class is
    `num_classes`.
    `fingerprint` identifies everything the weights depend on except the step count: a checkpoint with
    another one is refused (UserError). `log_dir` receives train_history.json and TensorBoard scalars (tb/).
    Under torch.distributed every rank calls this with the same arguments; `tcfg.batch_size` is the global
    batch. `on_step(step)` is called after each step (tests use it to interrupt a run). `prediction`: the
    model's target, 'eps' or 'v' (see `diffusion_loss`).
    """
    rank, world = rank_world()
    if tcfg.batch_size % world:
        raise UserError(f"train.batch_size={tcfg.batch_size} must be divisible by the number of processes ({world})")
    local_bs = tcfg.batch_size // world
    if isinstance(x, torch.Tensor):
        n, sample_shape = x.shape[0], tuple(x.shape[1:])
    else:
        n, sample_shape = len(x), tuple(x.sample_shape)
    if y.shape[0] != n:
        raise ValueError(f"{n} images but {y.shape[0]} labels")
    ckpt_dir, log_dir = Path(ckpt_dir), Path(log_dir) if log_dir is not None else None

    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = make_optimizer(model, tcfg, device)

    # Resume.
    start, prior_seconds = 0, 0.0
    last = latest_checkpoint(ckpt_dir)
    if last is not None:
        meta = read_meta(ckpt_dir, last)
        if meta.get("fingerprint") != fingerprint:
            raise UserError(
                f"{ckpt_dir} holds checkpoints of another config (data, labels, model, diffusion or train settings "
                f"differ): re-run with --fresh to start stage 2 over, or use another --run-dir"
            )
        if last > tcfg.steps:
            if tcfg.steps not in list_checkpoints(ckpt_dir):
                raise UserError(f"{ckpt_dir} already holds step {last} > train.steps={tcfg.steps}; set train.steps>={last} or use --fresh")
            last = tcfg.steps
        meta = load_checkpoint(ckpt_dir, last, model, ema, optimizer)
        start, prior_seconds = last, float(meta.get("train_seconds", 0.0))
        log.info("stage 2: resumed from %s at step %d of %d", ckpt_dir, start, tcfg.steps)

    history = {"step": [], "loss": [], "lr": []}
    hist_path = log_dir / "train_history.json" if log_dir is not None else None
    if start > 0 and hist_path is not None and hist_path.exists():
        old = read_json(hist_path)
        keep = [i for i, s in enumerate(old.get("step", [])) if s <= start]
        history = {k: [old[k][i] for i in keep] for k in history}

    writer = None
    if rank == 0 and log_dir is not None and start < tcfg.steps:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(log_dir / "tb"), purge_step=start + 1 if start else None)

    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    amp = autocast_dtype(tcfg.precision, device)
    y = y.to(device)

    def save(step: int) -> None:
        # The open logging window travels with the checkpoint, so a resumed run logs the same losses.
        window = loss_sum.clone()
        if world > 1:
            dist.all_reduce(window)
            window /= world
        if rank == 0:
            meta = {"fingerprint": fingerprint, "seed": seed, "world_size": world,
                    "loss_window": [window.item(), loss_count],
                    "train_seconds": prior_seconds + time.perf_counter() - t0}
            save_checkpoint(ckpt_dir, step, model, ema, optimizer, meta, keep=tcfg.keep_checkpoints)
            if hist_path is not None:
                write_json(hist_path, history)
        barrier()

    from tqdm.auto import tqdm

    bar = tqdm(total=tcfg.steps, initial=start, desc="stage 2 train", unit="step", disable=not progress or rank != 0, dynamic_ncols=True)
    model.train()
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    if start > 0:
        window_sum, loss_count = meta.get("loss_window", [0.0, 0])
        loss_sum.fill_(window_sum)
    lo, hi = rank * local_bs, (rank + 1) * local_bs
    perms: dict[int, torch.Tensor] = {}
    t0 = time.perf_counter()
    for step in range(start, tcfg.steps):
        lr = lr_at(step, tcfg.lr, tcfg.warmup_steps, tcfg.warmup_from_zero)
        for g in optimizer.param_groups:
            g["lr"] = lr

        # All draws of this step, for the global batch; this rank keeps its slice.
        d = draw_step(step, seed, tcfg.batch_size, n, sample_shape, schedule, tcfg.p_uncond, device, perms,
                      tcfg.t_min).shard(lo, hi)
        if isinstance(x, torch.Tensor):
            x0 = x[d.index.to(x.device)].to(device, non_blocking=True)
        else:
            x0 = x(d.index, torch.Generator().manual_seed(step_seed(seed, _STREAM_DATA, step, lo)), device)
        yb = torch.where(d.drop, torch.full_like(y[:1], num_classes), y[d.index.to(device)])
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = diffusion_loss(net, x0, yb, d.t, d.noise, schedule, prediction)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tcfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        optimizer.step()
        update_ema(ema, model, ema_decay_at(step, tcfg.ema_decay, tcfg.ema_warmup))

        done = step + 1
        loss_sum += loss.detach()
        loss_count += 1
        if done % tcfg.log_every == 0 or done == tcfg.steps:
            if world > 1:
                dist.all_reduce(loss_sum)
                loss_sum /= world
            mean_loss = loss_sum.item() / loss_count
            if not math.isfinite(mean_loss):
                raise RuntimeError(f"stage 2 training diverged at step {done} (loss {mean_loss}); lower train.lr")
            history["step"].append(done)
            history["loss"].append(mean_loss)
            history["lr"].append(lr)
            if writer is not None:
                writer.add_scalar("train/loss", mean_loss, done)
                writer.add_scalar("train/lr", lr, done)
            elapsed = time.perf_counter() - t0
            bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{(done - start) * tcfg.batch_size / elapsed:.0f}")
            loss_sum.zero_()
            loss_count = 0
        bar.update(1)
        if done % tcfg.ckpt_every == 0 or done == tcfg.steps:
            save(done)
        if on_step is not None:
            on_step(done)
    seconds = time.perf_counter() - t0
    bar.close()
    if writer is not None:
        writer.close()
    if start < tcfg.steps and rank == 0:
        log.info("stage 2: trained steps %d..%d in %.1f s (%.1f img/s)", start, tcfg.steps, seconds,
                 (tcfg.steps - start) * tcfg.batch_size / max(seconds, 1e-9))
    model.eval()
    return TrainResult(model=model, ema=ema, step=max(start, tcfg.steps), start_step=start, seconds=seconds,
                       total_seconds=prior_seconds + seconds, history=history)
