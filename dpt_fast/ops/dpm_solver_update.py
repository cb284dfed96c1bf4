"""The fused DPM-Solver step update: Python front of `torch.ops.dpt_fast.dpm_solver_update` + its reference.

One call per model evaluation of the sampler, one pass over memory (csrc/dpm_solver_update.{h,cpp} and
csrc/dpm_solver_update_cuda.cu):

    o          = model_out                        model_out [B, ...]
    o          = o_u + g * (o_c - o_u)            model_out [2B, ...] = [cond; uncond]  (classifier-free guidance)
    m          = p_x * x_eval + p_o * o           the model value the solver keeps: data (DPM-Solver++) or noise
    hist[slot] = m                                (in place)
    x_next     = a * x_base + sum_j c_j * hist[j] (hist[slot] being the new m)

`coeffs` is a float64 CPU tensor [4 + H] = (g, p_x, p_o, a, c_0, ..., c_{H-1}); `hist` is [H, *x_base.shape]
(H <= 4). The sampler computes every step's coefficients once per call, in double precision.

Backends: 'cpp' (the extension: ATen-vectorised/OpenMP CPU kernel, CUDA kernel), 'python' (the reference below,
plain PyTorch). 'auto' takes 'cpp' when the extension has a kernel for the tensor's device. The environment
variable DPT_FAST_SAMPLER_BACKEND=cpp|python overrides the argument (for benchmarks and bug reports).
"""
from __future__ import annotations

import os

import torch

from ..utils import UserError, log

__all__ = ["dpm_solver_update", "dpm_solver_update_reference", "resolve_backend", "cpp_available"]

MAX_HIST = 4
_ENV = "DPT_FAST_SAMPLER_BACKEND"
_logged: set[tuple[str, str]] = set()


def _load_extension() -> bool:
    try:
        import dpt_fast._C  # noqa: F401  (registers torch.ops.dpt_fast.*)
    except ImportError:
        return False
    return True


_HAVE_EXT = _load_extension()


def cpp_available(device: torch.device | str = "cpu") -> bool:
    """Whether the C++ extension is built and has a kernel for `device`'s type (cpu / cuda)."""
    if not _HAVE_EXT:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("dpt_fast::dpm_solver_update", key)


def resolve_backend(backend: str = "auto", device: torch.device | str = "cpu") -> str:
    """'auto' | 'cpp' | 'python' (or the DPT_FAST_SAMPLER_BACKEND variable) -> the backend that will run.

    Asking for 'cpp' where the extension has no kernel for `device` is a UserError; the choice is logged once.
    """
    env = os.environ.get(_ENV, "").strip().lower()
    want = env or backend
    if want not in ("auto", "cpp", "python"):
        src = f"environment variable {_ENV}" if env else "sample.backend"
        raise UserError(f"{src}={want!r} is not one of auto, cpp, python")
    dev = torch.device(device).type
    if want == "cpp" and not cpp_available(device):
        raise UserError(
            f"sample.backend=cpp but the C++ extension dpt_fast._C has no {dev} kernel; rebuild it with "
            "`pip install --no-build-isolation -e .` (CUDA kernels need nvcc) or use sample.backend=python"
        )
    chosen = want if want != "auto" else ("cpp" if cpp_available(device) else "python")
    if (dev, chosen) not in _logged:
        _logged.add((dev, chosen))
        why = f" (forced by {_ENV})" if env else ""
        log.info(f"DPM-Solver step update: {chosen} backend on {dev}{why}")
    return chosen


def dpm_solver_update_reference(
    x_eval: torch.Tensor, model_out: torch.Tensor, x_base: torch.Tensor, hist: torch.Tensor, coeffs: torch.Tensor, slot: int
) -> torch.Tensor:
    """The PyTorch reference of the fused update (same math, same order of operations). Mutates hist[slot]."""
    g, p_x, p_o, a, *c = coeffs.tolist()
    acc = torch.float64 if x_base.dtype == torch.float64 else torch.float32
    b = x_base.shape[0]
    o = model_out.to(acc)
    if o.shape[0] == 2 * b:
        o_c, o_u = o[:b], o[b:]
        o = torch.add(o_u, o_c - o_u, alpha=g)
    m = o * p_o
    if p_x != 0.0:
        m = torch.add(m, x_eval.to(acc), alpha=p_x)
    x = x_base.to(acc) * a if a != 0.0 else torch.zeros_like(m)
    for j, cj in enumerate(c):
        if j == slot:
            x = torch.add(x, m, alpha=cj)
        elif cj != 0.0:
            x = torch.add(x, hist[j].to(acc), alpha=cj)
    hist[slot].copy_(m)
    return x.to(x_base.dtype)


def _check(x_eval, model_out, x_base, hist, coeffs, slot) -> None:
    b = x_base.shape[0]
    if x_eval.shape != x_base.shape:
        raise ValueError(f"dpm_solver_update: x_eval {tuple(x_eval.shape)} must have the shape of x_base {tuple(x_base.shape)}")
    if model_out.shape[1:] != x_base.shape[1:] or model_out.shape[0] not in (b, 2 * b):
        raise ValueError(f"dpm_solver_update: model_out {tuple(model_out.shape)} must be [B or 2B, *{tuple(x_base.shape[1:])}] with B={b}")
    if hist.shape[1:] != x_base.shape or not 1 <= hist.shape[0] <= MAX_HIST:
        raise ValueError(f"dpm_solver_update: hist {tuple(hist.shape)} must be [H <= {MAX_HIST}, *{tuple(x_base.shape)}]")
    if coeffs.dtype != torch.float64 or coeffs.device.type != "cpu" or coeffs.shape != (4 + hist.shape[0],):
        raise ValueError("dpm_solver_update: coeffs must be a float64 CPU tensor [4 + H]")
    if not 0 <= slot < hist.shape[0]:
        raise ValueError(f"dpm_solver_update: slot {slot} outside hist[0..{hist.shape[0] - 1}]")


def dpm_solver_update(
    x_eval: torch.Tensor,
    model_out: torch.Tensor,
    x_base: torch.Tensor,
    hist: torch.Tensor,
    coeffs: torch.Tensor,
    slot: int,
    backend: str = "auto",
) -> torch.Tensor:
    """One fused DPM-Solver update (see the module docstring); returns x_next [B, ...] and writes hist[slot].

    Args:
        x_eval: [B, ...] the point where the model was evaluated.
        model_out: [B, ...] or [2B, ...] (cond rows, then uncond rows) raw model output, any float dtype.
        x_base: [B, ...] the point the step starts from (== x_eval for multistep methods).
        hist: [H, B, ...] the solver's model values (dtype of x_base), updated in place at `slot`.
        coeffs: float64 CPU [4 + H] = (g, p_x, p_o, a, c_0..c_{H-1}).
        slot: which history row receives the new model value.
        backend: 'auto' | 'cpp' | 'python' (resolved by `resolve_backend`; pass a resolved name in loops).
    """
    _check(x_eval, model_out, x_base, hist, coeffs, slot)
    if backend not in ("cpp", "python"):
        backend = resolve_backend(backend, x_base.device)
    if backend == "cpp":
        return torch.ops.dpt_fast.dpm_solver_update(
            x_eval.contiguous(), model_out.contiguous(), x_base.contiguous(), hist, coeffs, slot
        )
    return dpm_solver_update_reference(x_eval, model_out, x_base, hist, coeffs, slot)
