"""DPM-Solver and DPM-Solver++ (Lu et al. 2022), orders 1-3, singlestep / multistep / singlestep_fixed.

The public API is the reference implementation's (LuChengTHU/dpm-solver `dpm_solver_pytorch.py`), so its users
switch by changing the import (`DPM_Solver` is an alias of `DPMSolver`; the network's time input defaults to the
reference's, see `model_wrapper`):

    ns = NoiseScheduleVP('discrete', betas=betas)
    model_fn = model_wrapper(model, ns, model_type='noise', guidance_type='classifier-free',
                             condition=y, unconditional_condition=y_null, guidance_scale=1.4)
    x0 = DPMSolver(model_fn, ns, algorithm_type='dpmsolver++').sample(x_T, steps=50, order=3, method='singlestep')

How it is computed (and why it is fast): every step of every solver is linear in the current point and the model
values, so `_plan` turns (method, order, algorithm, time steps) into a table of per-evaluation coefficients, in
double precision, once per call (cached). The loop is then the same for every solver:

    for each model evaluation e:   out = model(x_eval, t_e)         (one forward of 2B rows with CFG)
                                   x_eval = update(x_eval, out, x_base, hist, coeffs[e], slot[e])

where `update` is the fused op of `dpt_fast.ops.dpm_solver_update` (C++/CUDA, or its PyTorch reference): CFG
combination, noise -> data conversion, history write and the solver's linear combination in one pass over
memory. On CUDA the whole loop is captured once per shape in a CUDA graph and replayed.

All the solver math lives in the `_*_update` functions below, written as the paper's formulas over symbolic
linear combinations (`_Lin`) of the model values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..diffusion.schedule import NoiseScheduleVP, dpm_solver_model_time
from ..ops.dpm_solver_update import dpm_solver_update, resolve_backend
from ..utils import log

__all__ = ["model_wrapper", "ModelFn", "DPMSolver", "DPM_Solver"]

MODEL_TYPES = ("noise", "x_start", "v", "score")
ALGORITHMS = ("dpmsolver", "dpmsolver++")
METHODS = ("singlestep", "multistep", "singlestep_fixed")
SKIP_TYPES = ("time_uniform", "logSNR", "time_quadratic")
SOLVER_TYPES = ("dpmsolver", "taylor")


# ----------------------------------------------------------------------------------------------
# The model: raw network output (B or 2B rows) + how it maps to the noise prediction.
# ----------------------------------------------------------------------------------------------
class ModelFn:
    """A noise-prediction function model_fn(x, t_continuous) -> eps [B, ...], as `model_wrapper` returns it.

    Besides the reference's call it exposes what the fused sampler needs: `raw(x, t)` (the network's output: B
    rows, or 2B rows = [cond; uncond] under classifier-free guidance, in ONE forward), `guidance_scale` and
    `model_type` (the linear map from the raw output to eps is folded into the step coefficients).
    """

    def __init__(self, model, noise_schedule, model_type, model_kwargs, guidance_type, condition,
                 unconditional_condition, guidance_scale, model_time_fn):
        self.model = model
        self.noise_schedule = noise_schedule
        self.model_type = model_type
        self.model_kwargs = dict(model_kwargs or {})
        self.guidance_type = guidance_type
        self.condition = condition
        self.unconditional_condition = unconditional_condition
        self.guidance_scale = float(guidance_scale)
        self.model_time_fn = model_time_fn
        # CFG needs a second (unconditional) half only when it changes the result.
        self.cfg = guidance_type == "classifier-free" and unconditional_condition is not None and self.guidance_scale != 1.0

    def raw(self, x: torch.Tensor, t_continuous: torch.Tensor) -> torch.Tensor:
        """The network output at (x [B, ...], t [B]): [B, ...], or [2B, ...] = [cond; uncond] when `cfg`."""
        t_in = self.model_time_fn(self.noise_schedule, t_continuous)
        if self.guidance_type == "uncond":
            return self.model(x, t_in, **self.model_kwargs)
        if not self.cfg:
            return self.model(x, t_in, self.condition, **self.model_kwargs)
        return self.model(
            torch.cat([x, x]), torch.cat([t_in, t_in]), torch.cat([self.condition, self.unconditional_condition]),
            **self.model_kwargs,
        )

    def __call__(self, x: torch.Tensor, t_continuous: torch.Tensor) -> torch.Tensor:
        """The (guided) noise prediction eps(x, t) [B, ...] in x's dtype (the reference's model_fn)."""
        out = self.raw(x, t_continuous)
        if self.cfg:
            b = x.shape[0]
            out = out[b:] + self.guidance_scale * (out[:b] - out[b:])
        out = out.to(x.dtype)
        if self.model_type == "noise":
            return out
        ns, shape = self.noise_schedule, (-1,) + (1,) * (x.dim() - 1)
        alpha, sigma = ns.marginal_alpha(t_continuous).view(shape), ns.marginal_std(t_continuous).view(shape)
        if self.model_type == "x_start":
            return (x - alpha * out) / sigma
        if self.model_type == "v":
            return alpha * out + sigma * x
        return -sigma * out  # score


def model_wrapper(
    model: Callable,
    noise_schedule: NoiseScheduleVP,
    model_type: str = "noise",
    model_kwargs: Optional[dict] = None,
    guidance_type: str = "uncond",
    condition: Optional[torch.Tensor] = None,
    unconditional_condition: Optional[torch.Tensor] = None,
    guidance_scale: float = 1.0,
    *,
    model_time_fn: Callable[[NoiseScheduleVP, torch.Tensor], torch.Tensor] = dpm_solver_model_time,
) -> ModelFn:
    """Wrap a network into the noise-prediction function model_fn(x, t_continuous) DPM-Solver solves with.

    Args:
        model: `model(x, t_input, **model_kwargs)` ('uncond') or `model(x, t_input, cond, **model_kwargs)`
            ('classifier-free'), returning noise / x_start / v / score of x's shape. A U-ViT's
            `forward(x, timesteps, y)` fits directly.
        noise_schedule: the `NoiseScheduleVP` the model was trained with.
        model_type: what the network predicts: 'noise' | 'x_start' | 'v' | 'score'.
        guidance_type: 'uncond' | 'classifier-free'.
        condition, unconditional_condition: [B] labels (or any conditioning with a batch dimension); the
            unconditional one is the null class (U-ViT: num_classes - 1).
        guidance_scale: the reference's convention, eps = eps_u + scale (eps_c - eps_u). The U-ViT/DPT convention
            eps = eps_c + s (eps_c - eps_u) (DPT: s = 0.4) is the same with scale = 1 + s. Under CFG the network
            runs ONCE on 2B rows ([x; x], [cond; uncond]); the official U-ViT code makes two passes.
        model_time_fn: the network's time input from continuous time t. Default: the reference's
            `get_model_input_time` (`dpt_fast.diffusion.schedule.dpm_solver_model_time`: (t - 1/N) 1000 for a
            discrete schedule, t for 'linear'), so code written against the reference runs unchanged. U-ViT
            models (this package's and the official ones) take `dpt_fast.diffusion.schedule.model_time`
            (999 t for 'linear', N t for discrete): pass `model_time_fn=model_time`.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r}; use one of {', '.join(MODEL_TYPES)}")
    if guidance_type not in ("uncond", "classifier-free"):
        raise ValueError(f"guidance_type={guidance_type!r}; use 'uncond' or 'classifier-free' (classifier guidance is not supported)")
    if guidance_type == "classifier-free" and condition is None:
        raise ValueError("guidance_type='classifier-free' needs condition=...")
    return ModelFn(model, noise_schedule, model_type, model_kwargs, guidance_type, condition, unconditional_condition,
                   guidance_scale, model_time_fn)


# ----------------------------------------------------------------------------------------------
# Symbolic linear combinations of model values, to write the solver formulas as in the paper.
# ----------------------------------------------------------------------------------------------
class _Lin(dict):
    """{model-value id: coefficient}; supports +, -, * scalar and / scalar."""

    def __add__(self, o):
        r = _Lin(self)
        for k, v in o.items():
            r[k] = r.get(k, 0.0) + v
        return r

    def __neg__(self):
        return _Lin({k: -v for k, v in self.items()})

    def __sub__(self, o):
        return self + (-o)

    def __mul__(self, s: float):
        return _Lin({k: v * s for k, v in self.items()})

    def __truediv__(self, s: float):
        return self * (1.0 / s)


def _m(i: int) -> _Lin:
    return _Lin({i: 1.0})


class _Sched:
    """Scalar, float64 view of a NoiseScheduleVP."""

    def __init__(self, ns: NoiseScheduleVP):
        self.ns = ns

    def _f(self, fn, v: float) -> float:
        return float(fn(torch.tensor([v], dtype=torch.float64))[0])

    def lam(self, t: float) -> float:
        return self._f(self.ns.marginal_lambda, t)

    def log_alpha(self, t: float) -> float:
        return self._f(self.ns.marginal_log_mean_coeff, t)

    def sigma(self, t: float) -> float:
        return self._f(self.ns.marginal_std, t)

    def alpha(self, t: float) -> float:
        return math.exp(self.log_alpha(t))

    def inv_lam(self, lam: float) -> float:
        return self._f(self.ns.inverse_lambda, lam)


# ----------------------------------------------------------------------------------------------
# The solver formulas. Each returns (a, L): x_next = a * x_base + L(model values).
# `pp` = DPM-Solver++ (data prediction), else DPM-Solver (noise prediction).
# ----------------------------------------------------------------------------------------------
def _first_update(S: _Sched, pp: bool, s: float, t: float, m_s: _Lin):
    """DPM-Solver-1 (= DDIM) from s to t."""
    h = S.lam(t) - S.lam(s)
    if pp:
        return S.sigma(t) / S.sigma(s), m_s * (-S.alpha(t) * math.expm1(-h))
    return math.exp(S.log_alpha(t) - S.log_alpha(s)), m_s * (-S.sigma(t) * math.expm1(h))


def _multistep_second_update(S, pp, solver_type, t_prev: list[float], t: float, m: list[_Lin]):
    """Multistep DPM-Solver-2 from t_prev[-1] to t with model values m[-2], m[-1]."""
    lam_1, lam_0, lam_t = S.lam(t_prev[-2]), S.lam(t_prev[-1]), S.lam(t)
    h, h_0 = lam_t - lam_0, lam_0 - lam_1
    r0 = h_0 / h
    m0, m1 = m[-1], m[-2]
    D1_0 = (m0 - m1) / r0
    if pp:
        a, at, phi_1 = S.sigma(t) / S.sigma(t_prev[-1]), S.alpha(t), math.expm1(-h)
        if solver_type == "dpmsolver":
            return a, m0 * (-at * phi_1) - D1_0 * (0.5 * at * phi_1)
        return a, m0 * (-at * phi_1) + D1_0 * (at * (phi_1 / h + 1.0))
    a, st, phi_1 = math.exp(S.log_alpha(t) - S.log_alpha(t_prev[-1])), S.sigma(t), math.expm1(h)
    if solver_type == "dpmsolver":
        return a, m0 * (-st * phi_1) - D1_0 * (0.5 * st * phi_1)
    return a, m0 * (-st * phi_1) - D1_0 * (st * (phi_1 / h - 1.0))


def _multistep_third_update(S, pp, t_prev: list[float], t: float, m: list[_Lin]):
    """Multistep DPM-Solver-3 from t_prev[-1] to t with model values m[-3], m[-2], m[-1]."""
    lam_2, lam_1, lam_0, lam_t = (S.lam(v) for v in (t_prev[-3], t_prev[-2], t_prev[-1], t))
    h, h_0, h_1 = lam_t - lam_0, lam_0 - lam_1, lam_1 - lam_2
    r0, r1 = h_0 / h, h_1 / h
    m0, m1, m2 = m[-1], m[-2], m[-3]
    D1_0, D1_1 = (m0 - m1) / r0, (m1 - m2) / r1
    D1 = D1_0 + (D1_0 - D1_1) * (r0 / (r0 + r1))
    D2 = (D1_0 - D1_1) / (r0 + r1)
    if pp:
        a, at, phi_1 = S.sigma(t) / S.sigma(t_prev[-1]), S.alpha(t), math.expm1(-h)
        phi_2 = phi_1 / h + 1.0
        phi_3 = phi_2 / h - 0.5
        return a, m0 * (-at * phi_1) + D1 * (at * phi_2) - D2 * (at * phi_3)
    a, st, phi_1 = math.exp(S.log_alpha(t) - S.log_alpha(t_prev[-1])), S.sigma(t), math.expm1(h)
    phi_2 = phi_1 / h - 1.0
    phi_3 = phi_2 / h - 0.5
    return a, m0 * (-st * phi_1) - D1 * (st * phi_2) - D2 * (st * phi_3)


def _singlestep_updates(S, pp, solver_type, order: int, s: float, t: float, r1: float, r2: float):
    """Singlestep DPM-Solver-`order` from s to t: the list of (eval time, a, L) for its `order` evaluations.

    Evaluation k (at s, s1, s2) produces model value id k; its update gives the next evaluation point (x_s1,
    x_s2) or, for the last one, x_t. All updates start from x_base = x at s.
    """
    m_s, m_s1, m_s2 = _m(0), _m(1), _m(2)
    if order == 1:
        return [(s, *_first_update(S, pp, s, t, m_s))]
    lam_s, lam_t = S.lam(s), S.lam(t)
    h = lam_t - lam_s
    ls = S.log_alpha(s)
    sig_s = S.sigma(s)

    def coef_x(u: float) -> float:  # the x_base coefficient of a first-order step s -> u
        return S.sigma(u) / sig_s if pp else math.exp(S.log_alpha(u) - ls)

    if order == 2:
        s1 = S.inv_lam(lam_s + r1 * h)
        if pp:
            phi_11, phi_1, a1, at = math.expm1(-r1 * h), math.expm1(-h), S.alpha(s1), S.alpha(t)
            x_s1 = m_s * (-a1 * phi_11)
            if solver_type == "dpmsolver":
                x_t = m_s * (-at * phi_1) - (m_s1 - m_s) * (0.5 / r1 * at * phi_1)
            else:
                x_t = m_s * (-at * phi_1) + (m_s1 - m_s) * (1.0 / r1 * at * (phi_1 / h + 1.0))
        else:
            phi_11, phi_1, sg1, st = math.expm1(r1 * h), math.expm1(h), S.sigma(s1), S.sigma(t)
            x_s1 = m_s * (-sg1 * phi_11)
            if solver_type == "dpmsolver":
                x_t = m_s * (-st * phi_1) - (m_s1 - m_s) * (0.5 / r1 * st * phi_1)
            else:
                x_t = m_s * (-st * phi_1) - (m_s1 - m_s) * (1.0 / r1 * st * (phi_1 / h - 1.0))
        return [(s, coef_x(s1), x_s1), (s1, coef_x(t), x_t)]
    if order != 3:
        raise ValueError(f"solver order must be 1, 2 or 3, got {order}")
    s1, s2 = S.inv_lam(lam_s + r1 * h), S.inv_lam(lam_s + r2 * h)
    if pp:
        phi_11, phi_12, phi_1 = math.expm1(-r1 * h), math.expm1(-r2 * h), math.expm1(-h)
        phi_22 = phi_12 / (r2 * h) + 1.0
        phi_2 = phi_1 / h + 1.0
        phi_3 = phi_2 / h - 0.5
        a1, a2, at = S.alpha(s1), S.alpha(s2), S.alpha(t)
        x_s1 = m_s * (-a1 * phi_11)
        x_s2 = m_s * (-a2 * phi_12) + (m_s1 - m_s) * (r2 / r1 * a2 * phi_22)
        if solver_type == "dpmsolver":
            x_t = m_s * (-at * phi_1) + (m_s2 - m_s) * (1.0 / r2 * at * phi_2)
        else:
            D1_0, D1_1 = (m_s1 - m_s) / r1, (m_s2 - m_s) / r2
            D1 = (D1_0 * r2 - D1_1 * r1) / (r2 - r1)
            D2 = (D1_1 - D1_0) * (2.0 / (r2 - r1))
            x_t = m_s * (-at * phi_1) + D1 * (at * phi_2) - D2 * (at * phi_3)
    else:
        phi_11, phi_12, phi_1 = math.expm1(r1 * h), math.expm1(r2 * h), math.expm1(h)
        phi_22 = phi_12 / (r2 * h) - 1.0
        phi_2 = phi_1 / h - 1.0
        phi_3 = phi_2 / h - 0.5
        sg1, sg2, st = S.sigma(s1), S.sigma(s2), S.sigma(t)
        x_s1 = m_s * (-sg1 * phi_11)
        x_s2 = m_s * (-sg2 * phi_12) - (m_s1 - m_s) * (r2 / r1 * sg2 * phi_22)
        if solver_type == "dpmsolver":
            x_t = m_s * (-st * phi_1) - (m_s2 - m_s) * (1.0 / r2 * st * phi_2)
        else:
            D1_0, D1_1 = (m_s1 - m_s) / r1, (m_s2 - m_s) / r2
            D1 = (D1_0 * r2 - D1_1 * r1) / (r2 - r1)
            D2 = (D1_1 - D1_0) * (2.0 / (r2 - r1))
            x_t = m_s * (-st * phi_1) - D1 * (st * phi_2) - D2 * (st * phi_3)
    return [(s, coef_x(s1), x_s1), (s1, coef_x(s2), x_s2), (s2, coef_x(t), x_t)]


def _to_model_value(S: _Sched, data: bool, model_type: str, t: float) -> tuple[float, float]:
    """(p_x, p_o): the model value m = p_x x + p_o out the solver keeps, from the raw output `out` at time t.

    eps = q_x x + q_o out for each model type; DPM-Solver++ keeps the data prediction (x - sigma eps) / alpha,
    DPM-Solver the noise prediction eps.
    """
    alpha, sigma = S.alpha(t), S.sigma(t)
    if data and model_type == "x_start":
        return 0.0, 1.0
    q_x, q_o = {"noise": (0.0, 1.0), "x_start": (1.0 / sigma, -alpha / sigma), "v": (sigma, alpha), "score": (0.0, -sigma)}[model_type]
    if data:
        return (1.0 - sigma * q_x) / alpha, -sigma * q_o / alpha
    return q_x, q_o


@dataclass
class _Plan:
    """The whole sampling run as per-evaluation data (built once per call, cached)."""

    times: torch.Tensor  # [E] float64, continuous time of each model evaluation
    coeffs: torch.Tensor  # [E, 4 + H] float64 CPU: (g, p_x, p_o, a, c_0..c_{H-1})
    slots: list[int]  # history row receiving each evaluation's model value
    new_base: list[bool]  # evaluation starts a solver step (x_base := x_eval)
    hist: int  # H


class _PlanBuilder:
    def __init__(self, S: _Sched, pp: bool, model_type: str, g: float, hist: int):
        self.S, self.pp, self.model_type, self.g, self.hist = S, pp, model_type, g, hist
        self.times, self.rows, self.slots, self.new_base = [], [], [], []

    def add(self, t_eval: float, new_base: bool, slot: int, a: float, lin: _Lin, slot_of: dict, data: Optional[bool] = None):
        """One evaluation at t_eval whose model value goes to `slot`; x_next = a x_base + lin (ids -> slots)."""
        p_x, p_o = _to_model_value(self.S, self.pp if data is None else data, self.model_type, t_eval)
        c = [0.0] * self.hist
        for mid, v in lin.items():
            c[slot_of[mid]] += v
        self.times.append(t_eval)
        self.rows.append([self.g, p_x, p_o, a, *c])
        self.slots.append(slot)
        self.new_base.append(new_base)

    def build(self) -> _Plan:
        return _Plan(torch.tensor(self.times, dtype=torch.float64), torch.tensor(self.rows, dtype=torch.float64),
                     self.slots, self.new_base, self.hist)


# ----------------------------------------------------------------------------------------------
# The solver
# ----------------------------------------------------------------------------------------------
class DPMSolver:
    """DPM-Solver / DPM-Solver++ over a noise-prediction `model_fn(x, t_continuous)`.

    Args:
        model_fn: what `model_wrapper` returns (the fused path then also fuses CFG and the model-type conversion),
            or any callable (x [B, ...], t [B]) -> eps [B, ...].
        noise_schedule: a `NoiseScheduleVP`.
        algorithm_type: 'dpmsolver++' (data prediction; recommended with guidance) or 'dpmsolver'.
        backend: the per-step update: 'auto' | 'cpp' | 'python' (see `dpt_fast.ops.dpm_solver_update`).
        cuda_graph: on CUDA, capture the whole sampling loop once per input shape and replay it (the model must
            be capture-safe: no host syncs; conditioning tensors are read in place, so update them with copy_).
            Falls back to eager with a warning if capture fails.
    """

    def __init__(self, model_fn: Callable, noise_schedule: NoiseScheduleVP, algorithm_type: str = "dpmsolver++", *,
                 backend: str = "auto", cuda_graph: bool = True):
        if algorithm_type not in ALGORITHMS:
            raise ValueError(f"algorithm_type={algorithm_type!r}; use 'dpmsolver' or 'dpmsolver++'")
        self.model_fn = model_fn
        self.noise_schedule = noise_schedule
        self.algorithm_type = algorithm_type
        self.backend = backend
        self.cuda_graph = cuda_graph
        self._S = _Sched(noise_schedule)
        self._plans: dict[tuple, _Plan] = {}
        self._graphs: dict[tuple, Any] = {}
        self.last_nfe: Optional[int] = None  # model evaluations of the last `sample` call

    # ---- time steps (the reference's) ----
    def get_time_steps(self, skip_type: str, t_T: float, t_0: float, N: int, device=None) -> torch.Tensor:
        """N + 1 times from t_T down to t_0 (float64): uniform in t, in logSNR, or in sqrt(t) ('time_quadratic')."""
        if skip_type == "logSNR":
            lam = torch.linspace(self._S.lam(t_T), self._S.lam(t_0), N + 1, dtype=torch.float64)
            ts = self.noise_schedule.inverse_lambda(lam)
        elif skip_type == "time_uniform":
            ts = torch.linspace(t_T, t_0, N + 1, dtype=torch.float64)
        elif skip_type == "time_quadratic":
            ts = torch.linspace(t_T**0.5, t_0**0.5, N + 1, dtype=torch.float64) ** 2
        else:
            raise ValueError(f"skip_type={skip_type!r}; use one of {', '.join(SKIP_TYPES)}")
        return ts if device is None else ts.to(device)

    def get_orders_and_timesteps_for_singlestep_solver(self, steps: int, order: int, skip_type: str, t_T: float,
                                                       t_0: float, device=None) -> tuple[torch.Tensor, list[int]]:
        """DPM-Solver-fast: orders of the outer steps (summing to `steps` NFE) and their K + 1 boundary times."""
        if order == 3:
            K = steps // 3 + 1
            orders = [3] * (K - 2) + [2, 1] if steps % 3 == 0 else [3] * (K - 1) + ([1] if steps % 3 == 1 else [2])
        elif order == 2:
            K = (steps + 1) // 2
            orders = [2] * K if steps % 2 == 0 else [2] * (K - 1) + [1]
        elif order == 1:
            K, orders = steps, [1] * steps
        else:
            raise ValueError(f"order must be 1, 2 or 3, got {order}")
        if skip_type == "logSNR":
            outer = self.get_time_steps(skip_type, t_T, t_0, K)
        else:
            idx = torch.cumsum(torch.tensor([0] + orders), 0)
            outer = self.get_time_steps(skip_type, t_T, t_0, steps)[idx]
        return (outer if device is None else outer.to(device)), orders

    # ---- the plan ----
    def _model_info(self) -> tuple[str, float]:
        mf = self.model_fn
        if isinstance(mf, ModelFn):
            return mf.model_type, mf.guidance_scale if mf.cfg else 1.0
        return "noise", 1.0

    def _plan(self, steps, t_start, t_end, order, skip_type, method, lower_order_final, denoise_to_zero, solver_type) -> _Plan:
        key = (steps, t_start, t_end, order, skip_type, method, lower_order_final, denoise_to_zero, solver_type)
        if key in self._plans:
            return self._plans[key]
        if method not in METHODS:
            raise ValueError(f"method={method!r}; use one of {', '.join(METHODS)}")
        if skip_type not in SKIP_TYPES:
            raise ValueError(f"skip_type={skip_type!r}; use one of {', '.join(SKIP_TYPES)}")
        if solver_type not in SOLVER_TYPES:
            raise ValueError(f"solver_type={solver_type!r}; use 'dpmsolver' or 'taylor'")
        if order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3, got {order}")
        t_0 = 1.0 / self.noise_schedule.total_N if t_end is None else float(t_end)
        t_T = self.noise_schedule.T if t_start is None else float(t_start)
        if not (t_0 > 0 and t_T > 0):
            raise ValueError("the time range must be > 0; for discrete schedules it is [1/N, 1]")
        S, pp = self._S, self.algorithm_type == "dpmsolver++"
        model_type, g = self._model_info()
        if method == "multistep":
            if steps < order:
                raise ValueError(f"multistep DPM-Solver needs steps >= order, got steps={steps}, order={order}")
            ts = self.get_time_steps(skip_type, t_T, t_0, steps).tolist()
            P = _PlanBuilder(S, pp, model_type, g, hist=order)
            slot_of = {}
            for i in range(steps):  # evaluate at ts[i], step to ts[i + 1]
                slot_of[i] = i % order
                step = i + 1
                step_order = min(order, step)
                if lower_order_final and steps < 10:  # the reference's threshold
                    step_order = min(step_order, steps + 1 - step)
                m = [_m(j) for j in range(i - step_order + 1, i + 1)]
                t_prev = ts[i - step_order + 1: i + 1]
                if step_order == 1:
                    a, lin = _first_update(S, pp, ts[i], ts[i + 1], m[-1])
                elif step_order == 2:
                    a, lin = _multistep_second_update(S, pp, solver_type, t_prev, ts[i + 1], m)
                else:
                    a, lin = _multistep_third_update(S, pp, t_prev, ts[i + 1], m)
                P.add(ts[i], True, slot_of[i], a, lin, slot_of)
        else:
            if method == "singlestep":
                outer, orders = self.get_orders_and_timesteps_for_singlestep_solver(steps, order, skip_type, t_T, t_0)
            else:
                K = steps // order
                if K < 1:
                    raise ValueError(f"singlestep_fixed needs steps >= order, got steps={steps}, order={order}")
                orders, outer = [order] * K, self.get_time_steps(skip_type, t_T, t_0, K)
            outer = outer.tolist()
            P = _PlanBuilder(S, pp, model_type, g, hist=max(orders))
            slot_of = {0: 0, 1: 1, 2: 2}
            for k, o in enumerate(orders):
                s, t = outer[k], outer[k + 1]
                lam_in = self.noise_schedule.marginal_lambda(self.get_time_steps(skip_type, s, t, o)).tolist()
                h = lam_in[-1] - lam_in[0]
                r1 = (lam_in[1] - lam_in[0]) / h if o >= 2 else 0.5
                r2 = (lam_in[2] - lam_in[0]) / h if o >= 3 else 2.0 / 3.0
                for j, (t_eval, a, lin) in enumerate(_singlestep_updates(S, pp, solver_type, o, s, t, r1, r2)):
                    P.add(t_eval, j == 0, j, a, lin, slot_of)
        if denoise_to_zero:  # one more evaluation at t_0: x = the data prediction there
            P.add(t_0, True, 0, 0.0, _m(0), {0: 0}, data=True)
        plan = P.build()
        self._plans[key] = plan
        return plan

    # ---- the loop ----
    def _raw(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        mf = self.model_fn
        return mf.raw(x, t) if isinstance(mf, ModelFn) else mf(x, t)

    def _loop(self, x: torch.Tensor, plan: _Plan, t_vecs: list[torch.Tensor], backend: str, n_evals: Optional[int] = None) -> torch.Tensor:
        hist = torch.zeros((plan.hist, *x.shape), dtype=x.dtype, device=x.device)
        x_eval = x_base = x
        for e in range(plan.times.numel() if n_evals is None else n_evals):
            if plan.new_base[e]:
                x_base = x_eval
            out = self._raw(x_eval, t_vecs[e])
            x_eval = dpm_solver_update(x_eval, out, x_base, hist, plan.coeffs[e], plan.slots[e], backend)
        return x_eval

    @torch.no_grad()
    def sample(self, x: torch.Tensor, steps: int = 20, t_start: Optional[float] = None, t_end: Optional[float] = None,
               order: int = 2, skip_type: str = "time_uniform", method: str = "multistep", lower_order_final: bool = True,
               denoise_to_zero: bool = False, solver_type: str = "dpmsolver") -> torch.Tensor:
        """Solve the diffusion ODE from t_start (default T = 1) to t_end (default 1 / N) starting at x [B, ...].

        Args (the reference's):
            steps: number of function evaluations (NFE; + 1 with denoise_to_zero). 'singlestep_fixed' uses
                (steps // order) * order of them.
            order: 1, 2 or 3.
            skip_type: time-step spacing: 'time_uniform' | 'logSNR' | 'time_quadratic'.
            method: 'singlestep' (DPM-Solver-fast: orders mixed to use exactly `steps` NFE; DPT's "fast" sampler is
                method='singlestep', order=3, steps=50), 'multistep' (lower orders for the first order - 1 steps)
                or 'singlestep_fixed'.
            lower_order_final: multistep only: lower orders for the last steps when steps < 10.
            denoise_to_zero: finish with the data prediction at t_end (one more NFE).
            solver_type: 'dpmsolver' | 'taylor' (the high-order formulas' variant).
        Returns:
            x at t_end, [B, ...] in x's dtype.
        """
        plan = self._plan(steps, t_start, t_end, order, skip_type, method, lower_order_final, denoise_to_zero, solver_type)
        self.last_nfe = plan.times.numel()
        backend = resolve_backend(self.backend, x.device)
        x = x.contiguous()
        t_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if x.is_cuda and self.cuda_graph:
            return self._sample_graph(x, plan, backend, t_dtype)
        t_vecs = [torch.full((x.shape[0],), float(t), dtype=t_dtype, device=x.device) for t in plan.times]
        return self._loop(x, plan, t_vecs, backend)

    def _sample_graph(self, x: torch.Tensor, plan: _Plan, backend: str, t_dtype: torch.dtype) -> torch.Tensor:
        """Replay (capturing on first use) the whole loop as one CUDA graph for this shape and plan."""
        key = (id(plan), tuple(x.shape), x.dtype, x.device, backend)
        entry = self._graphs.get(key)
        if entry is None:
            static_x = x.clone()
            t_vecs = [torch.full((x.shape[0],), float(t), dtype=t_dtype, device=x.device) for t in plan.times]
            try:
                # Warm up on a side stream (lazy library init, allocator, autotuning) with two evaluations.
                side = torch.cuda.Stream(device=x.device)
                side.wait_stream(torch.cuda.current_stream(x.device))
                with torch.cuda.stream(side):
                    self._loop(static_x, plan, t_vecs, backend, n_evals=min(2, plan.times.numel()))
                torch.cuda.current_stream(x.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_out = self._loop(static_x, plan, t_vecs, backend)
            except Exception as e:  # a model that cannot be captured still samples, eagerly
                log.warning(f"CUDA graph capture of the sampling loop failed ({type(e).__name__}: {e}); running eagerly")
                self.cuda_graph = False
                return self._loop(x, plan, t_vecs, backend)
            entry = self._graphs[key] = (graph, static_x, static_out, t_vecs)
            log.info(f"captured the {plan.times.numel()}-evaluation sampling loop in a CUDA graph for shape {tuple(x.shape)}")
        graph, static_x, static_out, _ = entry
        static_x.copy_(x)
        graph.replay()
        return static_out.clone()


# The reference's class name, for code written against `dpm_solver_pytorch.py`.
DPM_Solver = DPMSolver
