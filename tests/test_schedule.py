import math

import pytest
import torch

from dpt_fast.config import DiffusionConfig
from dpt_fast.diffusion.schedule import NoiseScheduleVP, make_schedule, model_time, scaled_linear_betas
from dpt_fast.utils import UserError


def _discrete():
    return NoiseScheduleVP("discrete", betas=scaled_linear_betas(0.00085, 0.012, 1000))


def test_linear_schedule_matches_the_vpsde_closed_form():
    ns = NoiseScheduleVP("linear", continuous_beta_0=0.1, continuous_beta_1=20.0)
    t = torch.linspace(1e-4, 1.0, 50, dtype=torch.float64)
    integral = 0.1 * t + 0.5 * (20.0 - 0.1) * t**2  # int_0^t beta(s) ds
    alpha = torch.exp(-0.5 * integral)
    torch.testing.assert_close(ns.marginal_alpha(t), alpha, rtol=1e-12, atol=0)
    torch.testing.assert_close(ns.marginal_std(t), torch.sqrt(1 - alpha**2), rtol=1e-12, atol=0)
    torch.testing.assert_close(ns.marginal_lambda(t), torch.log(alpha) - torch.log(torch.sqrt(1 - alpha**2)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "discrete"])
def test_inverse_lambda_inverts_marginal_lambda(kind):
    ns = _discrete() if kind == "discrete" else NoiseScheduleVP("linear")
    t = torch.linspace(ns.eps, 1.0, 333, dtype=torch.float64)
    torch.testing.assert_close(ns.inverse_lambda(ns.marginal_lambda(t)), t, rtol=0, atol=1e-9)
    assert torch.all(ns.marginal_lambda(t).diff() < 0), "lambda must decrease with t"


def test_discrete_schedule_hits_alphas_cumprod_at_the_knots():
    betas = scaled_linear_betas(0.00085, 0.012, 1000)
    ns = NoiseScheduleVP("discrete", betas=betas)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    n = torch.tensor([0, 1, 499, 998, 999])
    t = (n + 1).double() / 1000
    torch.testing.assert_close(ns.marginal_alpha(t) ** 2, alphas_cumprod[n], rtol=1e-12, atol=0)
    same = NoiseScheduleVP("discrete", alphas_cumprod=alphas_cumprod)
    torch.testing.assert_close(same.marginal_log_mean_coeff(t), ns.marginal_log_mean_coeff(t), rtol=1e-12, atol=0)
    # Between knots log alpha is linear in t.
    mid = ns.marginal_log_mean_coeff(torch.tensor([0.0015], dtype=torch.float64))
    ends = ns.marginal_log_mean_coeff(torch.tensor([0.001, 0.002], dtype=torch.float64))
    torch.testing.assert_close(mid, ends.mean().reshape(1), rtol=1e-12, atol=0)


def test_scaled_linear_betas_are_squared_sqrt_linspace():
    b = scaled_linear_betas(0.00085, 0.012, 1000)
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert math.isclose(float(b[0]), 0.00085, rel_tol=1e-12) and math.isclose(float(b[-1]), 0.012, rel_tol=1e-12)
    torch.testing.assert_close(b.sqrt().diff(), torch.full((999,), (0.012**0.5 - 0.00085**0.5) / 999, dtype=torch.float64))


def test_make_schedule_reads_the_diffusion_config():
    lin = make_schedule(DiffusionConfig(schedule="linear", beta_0=0.1, beta_1=20.0))
    assert lin.schedule == "linear" and lin.beta_0 == 0.1 and lin.beta_1 == 20.0
    disc = make_schedule(DiffusionConfig(schedule="discrete", num_timesteps=500))
    assert disc.schedule == "discrete" and disc.total_N == 500
    with pytest.raises(UserError, match="diffusion.beta_0"):
        make_schedule(DiffusionConfig(schedule="linear", beta_0=30.0, beta_1=20.0))


def test_model_time_follows_the_official_uvit_conventions():
    t = torch.tensor([0.001, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(model_time(NoiseScheduleVP("linear"), t), 999 * t)  # sde.py: nnet(xt, t * 999)
    torch.testing.assert_close(model_time(_discrete(), t), 1000 * t)  # train_ldm_discrete.py: t_continuous * N
