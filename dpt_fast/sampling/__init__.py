"""Sampling: DPM-Solver / DPM-Solver++ (the reference API) over the fused C++/CUDA step update, and batched,
sharded, resumable class-conditional generation.

    from dpt_fast.sampling import NoiseScheduleVP, model_wrapper, DPMSolver, generate, load_generated
"""
from ..diffusion.schedule import NoiseScheduleVP, make_schedule, model_time
from .dpm_solver import DPM_Solver, DPMSolver, ModelFn, model_wrapper
from .generate import generate, load_generated

__all__ = ["NoiseScheduleVP", "make_schedule", "model_time", "model_wrapper", "ModelFn", "DPMSolver", "DPM_Solver", "generate", "load_generated"]
