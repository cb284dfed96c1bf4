"""Diffusion: noise schedules (and the pieces training shares with sampling)."""
from .schedule import NoiseScheduleVP, dpm_solver_model_time, make_schedule, model_time, scaled_linear_betas

__all__ = ["NoiseScheduleVP", "make_schedule", "model_time", "dpm_solver_model_time", "scaled_linear_betas"]
