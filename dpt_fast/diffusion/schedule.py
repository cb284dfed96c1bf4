"""Variance-preserving noise schedules, with the semantics of the DPM-Solver reference (`NoiseScheduleVP`).

A VP diffusion has q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I) with alpha_t^2 + sigma_t^2 = 1, for continuous
time t in [0, T], T = 1. The solver works with the half-log-SNR lambda_t = log alpha_t - log sigma_t, which is
strictly decreasing in t, so `inverse_lambda` exists.

Two schedules, the two DPT uses:

- 'linear': the continuous VP-SDE with beta(t) = beta_0 + t (beta_1 - beta_0) (U-ViT-L/2, ScoreSDE defaults
  0.1 -> 20): log alpha_t = -(beta_1 - beta_0) t^2 / 4 - beta_0 t / 2.
- 'discrete': a DDPM beta array of N steps (U-ViT-H/2: Stable Diffusion's "scaled linear" betas). Step
  n = 0..N-1 sits at continuous time t_n = (n + 1) / N and log alpha_t is piecewise linear in t between the
  steps (extrapolated linearly outside them).

The model's time input is `model_time(schedule, t)`: 999 t for the continuous schedule (official U-ViT
`sde.py`: `nnet(xt, t * 999)`) and N t for the discrete one (official U-ViT `train_ldm_discrete.py`: training
feeds n in {1..N} for alphas_cumprod[n - 1], sampling feeds `t_continuous * N`). Training and sampling both
call it, so they agree by construction.

Every method takes a tensor of times (any shape) and returns a tensor of the same shape and dtype; pass float64
times to get double-precision coefficients.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..utils import UserError

__all__ = ["NoiseScheduleVP", "make_schedule", "model_time", "dpm_solver_model_time", "scaled_linear_betas"]


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear f(x) through the knots (xp, fp), xp increasing; linear extrapolation at both ends.

    At a knot the left end of the right-hand segment is used, so f(xp[k]) == fp[k] exactly.
    """
    xp = xp.to(device=x.device, dtype=x.dtype)
    fp = fp.to(device=x.device, dtype=x.dtype)
    k = xp.numel()
    idx = torch.searchsorted(xp, x.contiguous(), right=True).clamp(1, k - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    y0, y1 = fp[idx - 1], fp[idx]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


class NoiseScheduleVP:
    """A VP noise schedule: `NoiseScheduleVP('discrete', betas=...)` or `NoiseScheduleVP('linear', ...)`.

    Args:
        schedule: 'discrete' (a DDPM beta or alphas_cumprod array) or 'linear' (continuous VP-SDE).
        betas: [N] DDPM betas (discrete only; give this or `alphas_cumprod`).
        alphas_cumprod: [N] DDPM \\bar{alpha}_n = prod(1 - beta) (discrete only). Note alpha_t of this class is
            sqrt(\\bar{alpha}_n).
        continuous_beta_0, continuous_beta_1: beta(0) and beta(1) of the linear VP-SDE.
        dtype: dtype of the stored discrete arrays (the reference default float32; float64 keeps the
            schedule exact for coefficient tables).

    Attributes: `schedule`, `T` (= 1), `total_N` (N, or 1000 for 'linear'), `eps` (= 1 / total_N, the default
    end time of sampling).
    """

    def __init__(
        self,
        schedule: str = "discrete",
        betas: Optional[torch.Tensor] = None,
        alphas_cumprod: Optional[torch.Tensor] = None,
        continuous_beta_0: float = 0.1,
        continuous_beta_1: float = 20.0,
        dtype: torch.dtype = torch.float64,
    ):
        if schedule not in ("discrete", "linear"):
            raise ValueError(f"unsupported noise schedule {schedule!r}; use 'discrete' or 'linear'")
        self.schedule = schedule
        self.T = 1.0
        if schedule == "discrete":
            if betas is not None:
                log_alphas = 0.5 * torch.log1p(-torch.as_tensor(betas, dtype=torch.float64)).cumsum(0)
            elif alphas_cumprod is not None:
                log_alphas = 0.5 * torch.log(torch.as_tensor(alphas_cumprod, dtype=torch.float64))
            else:
                raise ValueError("NoiseScheduleVP('discrete') needs betas=... or alphas_cumprod=...")
            log_alphas = self._clip_log_alphas(log_alphas.flatten())
            self.log_alpha_array = log_alphas.to(dtype)
            self.total_N = int(log_alphas.numel())
            self.t_array = torch.linspace(0.0, 1.0, self.total_N + 1, dtype=torch.float64)[1:].to(dtype)
            # (t_array, log_alpha_array) per (device, dtype) of the times asked about: one host-to-device copy
            # each, on first use (a copy per call would synchronise every training step and break CUDA graphs).
            self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        else:
            self.total_N = 1000
            self.beta_0 = float(continuous_beta_0)
            self.beta_1 = float(continuous_beta_1)
        self.eps = 1.0 / self.total_N

    @staticmethod
    def _clip_log_alphas(log_alphas: torch.Tensor, clipped_lambda: float = -5.1) -> torch.Tensor:
        """Drop the tail steps whose lambda is below -5.1 (as the reference does for cosine-like schedules,
        where log-SNR near T is numerically unstable). A no-op for linear and scaled-linear betas."""
        log_sigmas = 0.5 * torch.log(-torch.expm1(2.0 * log_alphas))
        lambdas = log_alphas - log_sigmas
        n_drop = int((lambdas < clipped_lambda).sum())
        return log_alphas[: log_alphas.numel() - n_drop] if n_drop else log_alphas

    def tables(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t_array, log_alpha_array) of a discrete schedule on `like`'s device and dtype, cached."""
        key = (like.device, like.dtype)
        if key not in self._tables:
            self._tables[key] = (self.t_array.to(like.device, like.dtype), self.log_alpha_array.to(like.device, like.dtype))
        return self._tables[key]

    def marginal_log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """log alpha_t."""
        if self.schedule == "discrete":
            return _interp(t, *self.tables(t))
        return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def marginal_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_t (the signal scale of x_t)."""
        return torch.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t: torch.Tensor) -> torch.Tensor:
        """sigma_t = sqrt(1 - alpha_t^2) (the noise scale of x_t)."""
        return torch.sqrt(-torch.expm1(2.0 * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t: torch.Tensor) -> torch.Tensor:
        """lambda_t = log alpha_t - log sigma_t (half log-SNR)."""
        log_mean = self.marginal_log_mean_coeff(t)
        return log_mean - 0.5 * torch.log(-torch.expm1(2.0 * log_mean))

    def inverse_lambda(self, lamb: torch.Tensor) -> torch.Tensor:
        """The time t with marginal_lambda(t) == lamb."""
        if self.schedule == "linear":
            # Solve the quadratic log alpha_t = -0.5 log(1 + e^{-2 lambda}) for t > 0, in the stable form.
            tmp = 2.0 * (self.beta_1 - self.beta_0) * torch.logaddexp(-2.0 * lamb, torch.zeros_like(lamb))
            delta = self.beta_0**2 + tmp
            return tmp / (torch.sqrt(delta) + self.beta_0) / (self.beta_1 - self.beta_0)
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lamb), -2.0 * lamb)
        t_array, log_alpha_array = self.tables(log_alpha)
        return _interp(log_alpha, log_alpha_array.flip(0), t_array.flip(0))

    def describe(self) -> dict:
        """A JSON-friendly identity of the schedule (for manifests and logs)."""
        if self.schedule == "linear":
            return {"schedule": "linear", "beta_0": self.beta_0, "beta_1": self.beta_1}
        la = self.log_alpha_array.double()
        return {"schedule": "discrete", "N": self.total_N, "log_alpha_first": float(la[0]), "log_alpha_last": float(la[-1]),
                "log_alpha_sum": round(float(la.sum()), 9)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.describe().items() if k != "schedule")
        return f"NoiseScheduleVP({self.schedule!r}, {args})"


def scaled_linear_betas(beta_start: float = 0.00085, beta_end: float = 0.012, n: int = 1000) -> torch.Tensor:
    """Stable Diffusion's "scaled linear" betas: linspace(sqrt(start), sqrt(end), n)^2, float64 [n]."""
    return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), n, dtype=torch.float64) ** 2


def make_schedule(diffusion_cfg) -> NoiseScheduleVP:
    """The schedule a `DiffusionConfig` names (schedule linear | discrete)."""
    if diffusion_cfg.schedule == "linear":
        if not 0 <= diffusion_cfg.beta_0 < diffusion_cfg.beta_1:
            raise UserError("config keys 'diffusion.beta_0' / 'diffusion.beta_1': need 0 <= beta_0 < beta_1 (e.g. 0.1 and 20)")
        return NoiseScheduleVP("linear", continuous_beta_0=diffusion_cfg.beta_0, continuous_beta_1=diffusion_cfg.beta_1)
    if diffusion_cfg.schedule == "discrete":
        start, end, n = diffusion_cfg.discrete_beta_start, diffusion_cfg.discrete_beta_end, diffusion_cfg.num_timesteps
        if n < 2 or not 0 < start <= end < 1:
            raise UserError(
                "config keys 'diffusion.discrete_beta_start/end/num_timesteps': need 0 < start <= end < 1 and "
                "num_timesteps >= 2 (e.g. 0.00085, 0.012, 1000)"
            )
        return NoiseScheduleVP("discrete", betas=scaled_linear_betas(start, end, n))
    raise UserError(f"config key 'diffusion.schedule': {diffusion_cfg.schedule!r} is not one of linear, discrete")


def model_time(schedule: NoiseScheduleVP, t_continuous: torch.Tensor) -> torch.Tensor:
    """The U-ViT's time input for continuous time t in (0, 1]: 999 t ('linear') or N t ('discrete').

    For 'discrete', N t is the DDPM step count n in {1..N} at the knots t = n / N (n = 1 is the least noisy
    step, alphas_cumprod[0]); between knots it interpolates.
    """
    if schedule.schedule == "linear":
        return t_continuous * 999.0
    return t_continuous * float(schedule.total_N)


def dpm_solver_model_time(schedule: NoiseScheduleVP, t_continuous: torch.Tensor) -> torch.Tensor:
    """The DPM-Solver reference's time input: (t - 1/N) * 1000 for 'discrete' (DDPM/diffusers step index
    0..N-1 when N = 1000), t itself for 'linear'. Pass it as `model_wrapper(..., model_time_fn=...)` for models
    trained with that convention (e.g. diffusers UNets)."""
    if schedule.schedule == "discrete":
        return (t_continuous - 1.0 / schedule.total_N) * 1000.0
    return t_continuous
