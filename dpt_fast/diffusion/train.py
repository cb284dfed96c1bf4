"""Training of the class-conditional diffusion model (DPT stage 2), top to bottom.

Loss: epsilon prediction with plain MSE (U-ViT / DDPM "L_simple"):

    t ~ U(t_min, 1) (continuous linear VP) or t = n/N, n ~ U{1..N} (discrete betas)
    x_t = alpha_t x_0 + sigma_t eps,      loss = || model(x_t, model_time(t), y) - eps ||^2

with the label replaced by the null class (index `num_classes`) with probability p_uncond, for classifier-free
guidance. AdamW with linear warm-up then a constant LR, optional gradient clipping, an EMA of the weights,
bf16 autocast on CUDA, DDP under torchrun, optionally torch.compile (`train.compile`). The keys that switch to
the official U-ViT/DPT conventions (t_min=0, warmup_from_zero, ema_warmup=False, weight_decay_on=all,
grad_clip=0) are documented in docs/PAPER.md.

Determinism: every random draw of step s (which images, t, eps, which labels are dropped, the data's own
randomness such as a latent's flip and posterior sample) comes from generators seeded by (seed, s) and is made
for the whole global batch, of which each process keeps its rows; the batch of step s is a slice of a seeded
per-epoch permutation of the whole data set. A run resumed from the checkpoint of step s therefore continues
exactly as if it had never stopped, and N DDP processes compute the same update as one process, up to
floating-point summation order.

Speed: the loop never waits for the device except where it reads a number: the loss every `log_every` steps and
the checks before a checkpoint. Indices go to the device pinned and non-blocking, the schedule's tables are
cached on the device, a `BatchSource`'s batch of step s + 1 is read in a background thread (into pinned memory)
while step s runs, and the loss is summed on the device.

Non-finite values never reach disk: the first step whose loss is not finite is tracked on the device; at each
log and before each checkpoint (loss and weights) a divergence stops training with a one-line UserError naming
the step, and the checkpoints on disk are the last finite ones.

Checkpoints under DDP: rank 0 copies the state to (pinned) host memory in one pass of non-blocking copies and one
wait -- bounded by the host link, about a second for U-ViT-H/2 with its AdamW state -- and a background thread
writes it while training goes on, so the other ranks never wait for the disk inside a collective timeout. Only
at the end do they wait for the final write, in a barrier with a 2-hour timeout (`long_barrier`).
"""
from __future__ import annotations

import copy
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..distributed import is_distributed, long_barrier, rank_world
from ..utils import UserError, log, read_json, write_json
from .checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, read_meta, save_checkpoint
from .schedule import NoiseScheduleVP, model_time

# Independent random streams per step.
_STREAM_PERM, _STREAM_STEP, _STREAM_DATA = 0, 1, 2


@runtime_checkable
class BatchSource(Protocol):
    """Training data that is not one in-memory tensor (memory-mapped VAE latent moments, a streamed ImageFolder).

    Two phases, so that the loop reads step s + 1 while step s runs: `read` on the CPU in a background thread,
    then (after the loop moved its tensors to the device) `finish` there. Every random draw is made for the whole
    global batch from generators seeded by `seed` (one per step), then cut to `rows`, so a row's data does not
    depend on how the global batch is split across processes.
    """

    sample_shape: tuple[int, ...]  # [C, H, W] of one training sample

    def __len__(self) -> int: ...

    def read(self, index: torch.Tensor, rows: slice, seed: int) -> tuple[torch.Tensor, ...]:
        """CPU tensors holding rows `rows` of the global batch `index` (int64 [B])."""

    def finish(self, raw: tuple[torch.Tensor, ...], batch_size: int, rows: slice, seed: int) -> torch.Tensor:
        """float [len(rows), *sample_shape] on the device `raw` was moved to; `batch_size` = B."""

    # Optional: `plan(rows_of_steps, batch_size)` is called once, before the first `read`, with an iterator over this
    # process's data indices of every coming step (a stream that decodes ahead needs the order); `close()` at the end.


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
    """The random draws of one training step for the global batch, on `device`."""

    t: torch.Tensor  # float32 [B] times in (0, 1]
    drop: torch.Tensor  # bool [B] label replaced by the null class
    noise: torch.Tensor  # float32 [B, *sample_shape]

    def shard(self, rows: slice) -> "StepDraws":
        return StepDraws(self.t[rows], self.drop[rows], self.noise[rows])


def draw_step(step: int, seed: int, batch_size: int, sample_shape: tuple[int, ...], schedule, p_uncond: float,
              device: torch.device, t_min: Optional[float] = None) -> StepDraws:
    """Everything random about step `step` but its data (`batch_indices`), a pure function of (seed, step);
    `t_min`: see `sample_time`."""
    gen = torch.Generator(device=device).manual_seed(step_seed(seed, _STREAM_STEP, step))
    t = sample_time(schedule, batch_size, gen, device, t_min)
    drop = torch.rand(batch_size, generator=gen, device=device) < p_uncond
    noise = torch.randn((batch_size, *sample_shape), generator=gen, device=device)
    return StepDraws(t, drop, noise)


def lr_at(step: int, lr: float, warmup_steps: int, from_zero: bool = False, decay: str = "none",
          total_steps: int = 0) -> float:
    """Linear warm-up over `warmup_steps`, then constant (decay 'none') or a cosine from `lr` down to 0 at
    `total_steps` (decay 'cosine'). `step` counts from 0. from_zero: lr * min(1, step / W) (official U-ViT/DPT
    `customized_lr_scheduler`, a LambdaLR: the first step has LR 0); else lr * min(1, (step + 1) / W)."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * min(1.0, (step + (0 if from_zero else 1)) / warmup_steps)
    if decay == "cosine" and total_steps > warmup_steps:
        return lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / (total_steps - warmup_steps)))
    return lr


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

    x: the training images, float [N, C, H, W] in [-1, 1] (any device; batches are gathered where it lives and
    moved to `device`), or a `BatchSource` (VAE latents, a streamed ImageFolder); y: int64 [N] (pseudo-)labels
    in [0, num_classes); the null class is `num_classes`.
    `fingerprint` identifies everything the weights depend on except the step count: a checkpoint with
    another one is refused (UserError). `log_dir` receives train_history.json and TensorBoard scalars (tb/).
    Under torch.distributed every rank calls this with the same arguments; `tcfg.batch_size` is the global
    batch. `on_step(step)` is called after each step (tests use it to interrupt a run). `prediction`: the
    model's target, 'eps' or 'v' (see `diffusion_loss`).
    """
    rank, world = rank_world()
    if tcfg.batch_size % world:
        raise UserError(f"train.batch_size={tcfg.batch_size} must be divisible by the number of processes ({world})")
    local = tcfg.batch_size // world
    rows = slice(rank * local, (rank + 1) * local)  # this rank's rows of every global batch
    n, sample_shape = (x.shape[0], tuple(x.shape[1:])) if isinstance(x, torch.Tensor) else (len(x), tuple(x.sample_shape))
    if y.shape[0] != n:
        raise ValueError(f"{n} images but {y.shape[0]} labels")

    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = make_optimizer(model, tcfg, device)
    start, meta = _resume(Path(ckpt_dir), fingerprint, tcfg.steps, model, ema, optimizer)
    logger = _Logger(log_dir, start, tcfg, rank == 0 and progress, rank == 0, meta.get("history"))
    window = _LossWindow(device, *meta.get("loss_window", [0.0, 0]))
    saver = _Checkpointer(Path(ckpt_dir), tcfg.keep_checkpoints, {"fingerprint": fingerprint, "seed": seed,
                          "world_size": world}, prior_seconds=float(meta.get("train_seconds", 0.0)), writer=rank == 0)
    batches = _Batches(x, n, tcfg.batch_size, rows, seed, device, range(start, tcfg.steps))
    net = _wrap(model, world, device, tcfg.compile)
    amp = autocast_dtype(tcfg.precision, device)
    y = y.to(device)

    model.train()
    t0 = time.perf_counter()
    try:
        for step in range(start, tcfg.steps):
            lr = lr_at(step, tcfg.lr, tcfg.warmup_steps, tcfg.warmup_from_zero, tcfg.lr_decay, tcfg.steps)
            for g in optimizer.param_groups:
                g["lr"] = lr

            # All draws of this step are made for the global batch; this rank keeps its rows.
            d = draw_step(step, seed, tcfg.batch_size, sample_shape, schedule, tcfg.p_uncond, device,
                          tcfg.t_min).shard(rows)
            x0, index = batches.get(step)
            yb = torch.where(d.drop, num_classes, y[index])
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = diffusion_loss(net, x0, yb, d.t, d.noise, schedule, prediction)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tcfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            optimizer.step()
            update_ema(ema, model, ema_decay_at(step, tcfg.ema_decay, tcfg.ema_warmup))
            done = step + 1
            window.add(loss, done)  # on the device

            if done % tcfg.log_every == 0 or done == tcfg.steps:  # the loop's one regular host sync
                images_per_second = (done - start) * tcfg.batch_size / (time.perf_counter() - t0)
                logger.log(done, window.take(tcfg), lr, images_per_second)
            if done % tcfg.ckpt_every == 0 or done == tcfg.steps:
                _check_finite(done, window, model, ema, tcfg)
                saver.save(done, model, ema, optimizer, window.state(), logger.history, logger.path,
                           time.perf_counter() - t0)
            logger.bar.update(1)
            if on_step is not None:
                on_step(done)
    finally:
        batches.close()
        saver.close()  # waits for the last checkpoint write (also when the loop was interrupted)
        logger.close()
    seconds = time.perf_counter() - t0
    if world > 1:
        long_barrier()  # the others wait for rank 0's last write
    if start < tcfg.steps and rank == 0:
        log.info("stage 2: trained steps %d..%d in %.1f s (%.1f img/s)", start, tcfg.steps, seconds,
                 (tcfg.steps - start) * tcfg.batch_size / max(seconds, 1e-9))
    model.eval()
    return TrainResult(model=model, ema=ema, step=max(start, tcfg.steps), start_step=start, seconds=seconds,
                       total_seconds=saver.prior_seconds + seconds, history=logger.history)


# ----------------------------------------------------------------------------------------------
# Helpers of the loop
# ----------------------------------------------------------------------------------------------
def _resume(ckpt_dir: Path, fingerprint: str, steps: int, model: nn.Module, ema: nn.Module,
            optimizer: torch.optim.Optimizer) -> tuple[int, dict]:
    """Load the newest checkpoint of this config at or below `steps`: (its step, its JSON), or (0, {})."""
    last = latest_checkpoint(ckpt_dir)
    if last is None:
        return 0, {}
    if read_meta(ckpt_dir, last).get("fingerprint") != fingerprint:
        raise UserError(
            f"{ckpt_dir} holds checkpoints of another config (data, labels, model, diffusion or train settings "
            f"differ): re-run with --fresh to start stage 2 over, or use another --run-dir"
        )
    if last > steps:
        if steps not in list_checkpoints(ckpt_dir):
            raise UserError(f"{ckpt_dir} already holds step {last} > train.steps={steps}; set train.steps>={last} or use --fresh")
        last = steps
    meta = load_checkpoint(ckpt_dir, last, model, ema, optimizer)
    log.info("stage 2: resumed from %s at step %d of %d", ckpt_dir, last, steps)
    return last, meta


def _wrap(model: nn.Module, world: int, device: torch.device, compile_: bool) -> nn.Module:
    """What the loop calls: the model, under DDP with several processes, compiled with `train.compile`."""
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(net) if compile_ else net


class _Batches:
    """This rank's training samples and their data indices for each step, on the device.

    In-memory tensor: the indices go to the tensor's device pinned and non-blocking, the gather runs there.
    `BatchSource`: its `read` of step s + 1 runs in a background thread (into pinned memory on CUDA) while the
    loop runs step s; `finish` then runs on the device. Steps are asked for in order.
    """

    def __init__(self, x, n: int, batch_size: int, rows: slice, seed: int, device: torch.device, steps: range):
        self.x, self.n, self.batch_size, self.rows, self.seed, self.device = x, n, batch_size, rows, seed, device
        self.steps = steps
        self.perms: dict[int, torch.Tensor] = {}  # used by one thread only: the reader
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="batches") if not isinstance(x, torch.Tensor) else None
        self.ahead: dict[int, Future] = {}
        if hasattr(x, "plan"):
            perms: dict[int, torch.Tensor] = {}
            x.plan((batch_indices(s, batch_size, n, seed, perms)[rows] for s in steps), rows.stop - rows.start)

    def _to(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        if device.type == "cuda" and t.device.type == "cpu":
            t = t.pin_memory()
        return t.to(device, non_blocking=True)

    def _read(self, step: int) -> tuple[torch.Tensor, ...]:
        index = batch_indices(step, self.batch_size, self.n, self.seed, self.perms)
        raw = self.x.read(index, self.rows, step_seed(self.seed, _STREAM_DATA, step))
        return tuple(t.pin_memory() if self.device.type == "cuda" and t.device.type == "cpu" else t
                     for t in (index[self.rows], *raw))

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0 float [rows, *sample_shape], index int64 [rows]) of `step`, both on the device."""
        if self.pool is None:
            index = batch_indices(step, self.batch_size, self.n, self.seed, self.perms)[self.rows]
            return self._to(self.x[self._to(index, self.x.device)], self.device), self._to(index, self.device)
        for s in (step, step + 1):
            if s in self.steps and s not in self.ahead:
                self.ahead[s] = self.pool.submit(self._read, s)
        index, *raw = (t.to(self.device, non_blocking=True) for t in self.ahead.pop(step).result())
        x0 = self.x.finish(tuple(raw), self.batch_size, self.rows, step_seed(self.seed, _STREAM_DATA, step))
        return x0, index

    def close(self) -> None:
        if self.pool is not None:
            for f in self.ahead.values():
                f.cancel()
            self.pool.shutdown(wait=True)
            if hasattr(self.x, "close"):
                self.x.close()


_NONE = 2**62  # "no non-finite loss yet"


class _LossWindow:
    """The loss summed since the last log, and the first step whose loss was not finite, kept on the device.

    `add` costs no host synchronisation; `take` and `state` read the numbers (a sync, and under DDP a collective
    that every rank joins: the mean is over ranks, the first bad step the earliest of any rank).
    """

    def __init__(self, device: torch.device, total: float = 0.0, count: int = 0):
        self.sum = torch.zeros((), device=device)
        self.sum.fill_(total)
        self.count = int(count)
        self.first_bad = torch.full((), _NONE, dtype=torch.int64, device=device)

    def add(self, loss: torch.Tensor, step: int) -> None:
        loss = loss.detach()
        self.sum += loss
        self.count += 1
        torch.minimum(self.first_bad, torch.where(torch.isfinite(loss), _NONE, step), out=self.first_bad)

    def _read(self) -> tuple[float, Optional[int]]:
        total, bad = self.sum.clone(), self.first_bad.clone()
        if is_distributed():
            dist.all_reduce(total)
            total /= dist.get_world_size()
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
        bad = int(bad)
        return float(total), None if bad == _NONE else bad

    def bad_step(self) -> Optional[int]:
        return self._read()[1]

    def state(self) -> list:
        """[window sum, count] for the checkpoint (a resumed run then logs the same losses)."""
        return [self._read()[0], self.count]

    def take(self, tcfg) -> float:
        """The mean loss of the window, which then restarts; a UserError if a loss was not finite."""
        total, bad = self._read()
        if bad is not None:
            raise _diverged(bad, "loss", tcfg)
        mean = total / max(self.count, 1)
        self.sum.zero_()
        self.count = 0
        return mean


def _diverged(step: int, what: str, tcfg) -> UserError:
    return UserError(f"stage 2 training diverged: the {what} is not finite at step {step} (train.lr={tcfg.lr:g}); lower "
                     f"train.lr (or raise train.warmup_steps) and re-run stage 2 with --fresh (the checkpoints on disk "
                     f"are the last finite ones)")


def _check_finite(step: int, window: _LossWindow, model: nn.Module, ema: nn.Module, tcfg) -> None:
    """Before a checkpoint: every loss so far and every weight of model and EMA are finite (one sync, collective)."""
    bad = window.bad_step()
    if bad is not None:
        raise _diverged(bad, "loss", tcfg)
    params = [p.detach() for p in (*model.parameters(), *ema.parameters()) if p.is_floating_point()]
    finite = torch.stack(torch._foreach_norm(params)).isfinite().all().to(torch.int64)
    if is_distributed():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not bool(finite):
        raise _diverged(step, "weights' norm", tcfg)


class _StateDict:
    """A state dict already copied to the host, seen as the module / optimizer `save_checkpoint` reads."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state


class _Checkpointer:
    """Checkpoints written by a background thread from a host copy of the state (see the module docstring).

    Only the writer (rank 0) copies and writes; `close` waits for the write in flight (also when the loop was
    interrupted, so a checkpoint the loop reported is on disk). The host buffers are pinned on CUDA and reused.
    """

    def __init__(self, ckpt_dir: Path, keep: int, meta: dict, prior_seconds: float, writer: bool):
        self.dir, self.keep, self.meta, self.prior_seconds = ckpt_dir, keep, meta, prior_seconds
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint") if writer else None
        self.pending: Optional[Future] = None
        self.buffers: dict[str, torch.Tensor] = {}

    def _copy(self, key: str, v: torch.Tensor) -> torch.Tensor:
        buf = self.buffers.get(key)
        if buf is None or buf.shape != v.shape or buf.dtype != v.dtype:
            buf = self.buffers[key] = torch.empty(v.shape, dtype=v.dtype, pin_memory=v.is_cuda)
        return buf.copy_(v.detach(), non_blocking=True)

    def _snapshot(self, prefix: str, state: dict) -> dict:
        return {k: self._copy(f"{prefix}.{k}", v) if torch.is_tensor(v) else copy.deepcopy(v) for k, v in state.items()}

    def save(self, step: int, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer, window: list,
             history: dict, hist_path: Optional[Path], seconds: float) -> None:
        if self.pool is None:
            return
        if self.pending is not None:
            self.pending.result()  # the previous write is done: its buffers may be reused
        opt = optimizer.state_dict()
        host = (self._snapshot("model", model.state_dict()), self._snapshot("ema", ema.state_dict()),
                {"state": {i: self._snapshot(f"optim.{i}", st) for i, st in opt["state"].items()},
                 "param_groups": copy.deepcopy(opt["param_groups"])})
        if next(model.parameters()).is_cuda:
            torch.cuda.synchronize()  # the non-blocking copies have landed
        meta = {**self.meta, "loss_window": window, "train_seconds": self.prior_seconds + seconds}
        self.pending = self.pool.submit(self._write, step, host, meta, copy.deepcopy(history), hist_path)

    def _write(self, step: int, host: tuple, meta: dict, history: dict, hist_path: Optional[Path]) -> None:
        save_checkpoint(self.dir, step, *(_StateDict(s) for s in host), {**meta, "history": history}, keep=self.keep)
        if hist_path is not None:
            write_json(hist_path, history)

    def close(self) -> None:
        if self.pool is not None:
            try:
                if self.pending is not None:
                    self.pending.result()
            finally:
                self.pool.shutdown(wait=True)


class _Logger:
    """The loss history (train_history.json, written with each checkpoint), TensorBoard scalars and the bar.

    The history also travels inside each checkpoint's JSON (`saved`), so a lost or damaged train_history.json
    is written again on resume (checkpoints made before that: the file is read)."""

    def __init__(self, log_dir, start: int, tcfg, progress: bool, main: bool, saved: Optional[dict] = None):
        self.history: dict = {"step": [], "loss": [], "lr": []}
        self.path = Path(log_dir) / "train_history.json" if log_dir is not None else None
        if start > 0:
            old = saved if isinstance(saved, dict) else None
            if old is None and self.path is not None and self.path.exists():
                old = read_json(self.path)
            keep = [i for i, s in enumerate(old.get("step", [])) if s <= start] if isinstance(old, dict) else []
            self.history = {k: [old[k][i] for i in keep] for k in self.history}
            if main and self.path is not None and not self.path.exists():
                write_json(self.path, self.history)
        self.writer = None
        if main and log_dir is not None and start < tcfg.steps:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(log_dir) / "tb"), purge_step=start + 1 if start else None)
        from tqdm.auto import tqdm

        self.bar = tqdm(total=tcfg.steps, initial=start, desc="stage 2 train", unit="step", disable=not progress,
                        dynamic_ncols=True)

    def log(self, step: int, loss: float, lr: float, images_per_second: float) -> None:
        self.history["step"].append(step)
        self.history["loss"].append(loss)
        self.history["lr"].append(lr)
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)
        self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_second:.0f}")

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
