"""Fused (residual add +) LayerNorm (+ adaLN modulate): Triton forward/backward, PyTorch reference, autograd.

For x [B, L, D] (rows of D features; row r belongs to batch element b = r // L):

    x_new = x + gate[b] * delta              optional residual add (gate optional, else 1)
    y     = LN(x_new) * weight + bias        weight/bias optional (adaLN norms have none)
    y     = y * (1 + scale[b]) + shift[b]    optional adaLN modulate

One pass reads x (and delta) once and writes x_new and y, where eager PyTorch makes 2-6 passes. The backward
is one pass too: it recomputes x_hat from the saved per-row mean / 1/std and gives dx, ddelta and the reduced
grads of weight, bias, shift, scale and gate (per-program partial sums in fp32, summed by torch).
All arithmetic is fp32; y is written in `out_dtype` (e.g. bf16 under autocast, where the next Linear wants it).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # platforms without triton: the reference below still works
    triton = None


def layer_norm_reference(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                         delta: Optional[torch.Tensor] = None, gate: Optional[torch.Tensor] = None,
                         shift: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
                         out_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same math in PyTorch: returns (x_new, y); x_new is x when there is no delta.

    x, delta [B, L, D] (or [M, D] without gate/shift/scale); weight, bias [D]; gate, shift, scale [B, D].
    LN and modulate run in fp32; y has `out_dtype` (default: x_new's dtype).
    """
    if delta is not None:
        x = x + (delta if gate is None else delta * gate[:, None])
    y = F.layer_norm(x.float(), x.shape[-1:], None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    if scale is not None:
        y = y * (1 + scale.float()[:, None]) + shift.float()[:, None]
    return x, y.to(out_dtype or x.dtype)


if triton is not None:

    @triton.jit
    def _ln_fwd_kernel(X, DELTA, GATE, W, Bias, SHIFT, SCALE, XNEW, Y, MEAN, RSTD,
                       M, L, D, stride_gate, stride_shift, stride_scale, eps,
                       HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr, HAS_AFFINE: tl.constexpr,
                       HAS_MOD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        # A [BLOCK_M, BLOCK_D] tile: BLOCK_M whole rows (several rows per program keep narrow D efficient).
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        rmask = rows < M
        cmask = cols < D
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None] * D + cols[None, :]
        b = (rows // L)[:, None]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            d = tl.load(DELTA + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_GATE:
                d = d * tl.load(GATE + b * stride_gate + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            xn = (x + d).to(XNEW.dtype.element_ty)
            tl.store(XNEW + offs, xn, mask=mask)
            x = xn.to(tl.float32)  # normalise the stored residual, exactly as the reference does
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / D + eps)
        y = xc * rstd[:, None]
        if HAS_AFFINE:
            y = y * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :] \
                + tl.load(Bias + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_MOD:
            scale = tl.load(SCALE + b * stride_scale + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            shift = tl.load(SHIFT + b * stride_shift + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            y = y * (1.0 + scale) + shift
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + rows, mean, mask=rmask)
        tl.store(RSTD + rows, rstd, mask=rmask)

    @triton.jit
    def _ln_bwd_kernel(DY, DXNEW, X, DELTA, GATE, W, Bias, SCALE, MEAN, RSTD,
                       DX, DDELTA, DW_PART, DB_PART, DSHIFT_PART, DSCALE_PART, DGATE_PART,
                       L, D, rows_per_prog, stride_gate, stride_scale,
                       HAS_DXNEW: tl.constexpr, HAS_GATE: tl.constexpr, STORE_DDELTA: tl.constexpr,
                       HAS_AFFINE: tl.constexpr, HAS_MOD: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        # Program (b, chunk) owns rows [chunk * rows_per_prog, ...) of batch element b, so the per-batch
        # reductions (shift, scale, gate) never mix batch elements; the partials are summed by torch.
        b = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        part = b * tl.num_programs(1) + chunk
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        if HAS_AFFINE:
            w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            bias = tl.load(Bias + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_MOD:
            scale = tl.load(SCALE + b * stride_scale + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_GATE:
            gate = tl.load(GATE + b * stride_gate + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        acc_dw = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_db = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_dshift = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_dscale = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_dgate = tl.zeros([BLOCK_D], dtype=tl.float32)
        start = chunk * rows_per_prog
        stop = tl.minimum(start + rows_per_prog, L)
        for i0 in range(start, stop, BLOCK_M):
            i = i0 + tl.arange(0, BLOCK_M)
            rmask = i < stop
            mask = rmask[:, None] & cmask[None, :]
            rows = b * L + i
            offs = rows[:, None] * D + cols[None, :]
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=rmask, other=0.0)[:, None]
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)[:, None]
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_MOD:
                y_ln = xhat
                if HAS_AFFINE:
                    y_ln = xhat * w + bias
                acc_dshift += tl.sum(dy, axis=0)
                acc_dscale += tl.sum(dy * y_ln, axis=0)
                dy = dy * (1.0 + scale)
            if HAS_AFFINE:
                acc_db += tl.sum(dy, axis=0)
                acc_dw += tl.sum(dy * xhat, axis=0)
                dy = dy * w
            c1 = tl.sum(dy * xhat, axis=1)[:, None] / D
            c2 = tl.sum(dy, axis=1)[:, None] / D
            dx = tl.where(mask, (dy - (xhat * c1 + c2)) * rstd, 0.0)
            if HAS_DXNEW:
                dx += tl.load(DXNEW + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_GATE:
                d = tl.load(DELTA + offs, mask=mask, other=0.0).to(tl.float32)
                acc_dgate += tl.sum(dx * d, axis=0)
                dx = dx * gate
            if STORE_DDELTA:
                tl.store(DDELTA + offs, dx.to(DDELTA.dtype.element_ty), mask=mask)
        if HAS_AFFINE:
            tl.store(DW_PART + part * D + cols, acc_dw, mask=cmask)
            tl.store(DB_PART + part * D + cols, acc_db, mask=cmask)
        if HAS_MOD:
            tl.store(DSHIFT_PART + part * D + cols, acc_dshift, mask=cmask)
            tl.store(DSCALE_PART + part * D + cols, acc_dscale, mask=cmask)
        if HAS_GATE:
            tl.store(DGATE_PART + part * D + cols, acc_dgate, mask=cmask)


# Argument types of the two kernels for ahead-of-time compilation (triton.compiler.ASTSource) in the
# bf16-activation / fp32-residual setting of the U-ViT blocks: register reports and cubin build checks.
FWD_SIGNATURE = dict(X="*fp32", DELTA="*bf16", GATE="*bf16", W="*fp32", Bias="*fp32", SHIFT="*bf16", SCALE="*bf16",
                     XNEW="*fp32", Y="*bf16", MEAN="*fp32", RSTD="*fp32", M="i32", L="i32", D="i32",
                     stride_gate="i32", stride_shift="i32", stride_scale="i32", eps="fp32")
BWD_SIGNATURE = dict(DY="*bf16", DXNEW="*fp32", X="*fp32", DELTA="*bf16", GATE="*bf16", W="*fp32", Bias="*fp32",
                     SCALE="*bf16", MEAN="*fp32", RSTD="*fp32", DX="*fp32", DDELTA="*bf16", DW_PART="*fp32",
                     DB_PART="*fp32", DSHIFT_PART="*fp32", DSCALE_PART="*fp32", DGATE_PART="*fp32", L="i32", D="i32",
                     rows_per_prog="i32", stride_gate="i32", stride_scale="i32")


def _tile(D: int) -> tuple[int, int, int, int]:
    """(BLOCK_M rows, BLOCK_D columns, forward num_warps, backward num_warps) for rows of width D.

    Tiles of ~2K elements (whole rows, up to 16 of them); the forward holds ~8 elements per thread, the
    backward, with its five column accumulators, ~4. ptxas (sm_90) then reports no spills and <= 118
    registers for every flag combination at D = 72, 512, 1152 (the model's D=1152 variants: <= 57 forward,
    <= 97 backward); 2-row tiles on 8 warps needed up to 255 in the backward.
    """
    block_d = triton.next_power_of_2(D)
    block_m = max(1, min(16, 2048 // block_d))
    tile = block_m * block_d
    return block_m, block_d, min(max(tile // 256, 4), 8), min(max(tile // 128, 4), 16)


def _rows_per_program(B: int, L: int, block_m: int, device: torch.device) -> int:
    """Rows per backward program: enough programs to fill the GPU several times over, and no more
    (fewer partial sums); a multiple of block_m."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    rows = max(1, min(L, triton.cdiv(B * L, 8 * sms)))
    return triton.cdiv(rows, block_m) * block_m


class FusedLayerNorm(torch.autograd.Function):
    """autograd for the Triton kernels; see `fused_layer_norm` for the arguments."""

    @staticmethod
    def forward(ctx, x, delta, gate, weight, bias, shift, scale, eps, out_dtype):
        B, L, D = x.shape
        x = x.contiguous()
        has_res, has_gate, has_affine, has_mod = delta is not None, gate is not None, weight is not None, scale is not None
        if has_res:
            delta = delta.contiguous()
            res_dtype = torch.promote_types(x.dtype, delta.dtype)  # eager type promotion of x + gate * delta
            if has_gate:
                res_dtype = torch.promote_types(res_dtype, gate.dtype)
            x_new = torch.empty(x.shape, dtype=res_dtype, device=x.device)
        else:
            x_new = x
        y = torch.empty(x.shape, dtype=out_dtype or x_new.dtype, device=x.device)
        mean = torch.empty(B * L, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        block_m, block_d, warps, _ = _tile(D)
        any_ = x  # stand-in pointer for absent optional tensors (never read: its flag is off)
        _ln_fwd_kernel[(triton.cdiv(B * L, block_m),)](
            x, delta if has_res else any_, gate if has_gate else any_, weight if has_affine else any_,
            bias if has_affine else any_, shift if has_mod else any_, scale if has_mod else any_,
            x_new, y, mean, rstd, B * L, L, D,
            gate.stride(0) if has_gate else 0, shift.stride(0) if has_mod else 0, scale.stride(0) if has_mod else 0,
            eps, HAS_RES=has_res, HAS_GATE=has_gate, HAS_AFFINE=has_affine, HAS_MOD=has_mod,
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps)
        ctx.save_for_backward(x_new, delta if has_gate else None, gate, weight, bias, scale, mean, rstd)
        ctx.flags = (has_res, has_gate, has_affine, has_mod)
        ctx.x_dtype = x.dtype
        if has_res:
            return x_new, y
        return y

    @staticmethod
    def backward(ctx, *grads):
        x_new, delta, gate, weight, bias, scale, mean, rstd = ctx.saved_tensors
        has_res, has_gate, has_affine, has_mod = ctx.flags
        dx_new, dy = grads if has_res else (None, grads[0])
        B, L, D = x_new.shape
        dy = dy.contiguous()
        has_dxnew = dx_new is not None
        if has_dxnew:
            dx_new = dx_new.contiguous()
        dx = torch.empty_like(x_new)
        store_ddelta = has_gate
        ddelta = torch.empty_like(delta) if store_ddelta else None
        block_m, block_d, _, warps = _tile(D)
        rows = _rows_per_program(B, L, block_m, x_new.device)
        chunks = triton.cdiv(L, rows)
        f32 = dict(dtype=torch.float32, device=x_new.device)
        part = lambda on: torch.empty(B * chunks, D, **f32) if on else None  # noqa: E731
        dw_p, db_p = part(has_affine), part(has_affine)
        dshift_p, dscale_p, dgate_p = part(has_mod), part(has_mod), part(has_gate)
        any_ = x_new
        _ln_bwd_kernel[(B, chunks)](
            dy, dx_new if has_dxnew else any_, x_new, delta if has_gate else any_, gate if has_gate else any_,
            weight if has_affine else any_, bias if has_affine else any_, scale if has_mod else any_, mean, rstd,
            dx, ddelta if store_ddelta else any_, dw_p if has_affine else any_, db_p if has_affine else any_,
            dshift_p if has_mod else any_, dscale_p if has_mod else any_, dgate_p if has_gate else any_,
            L, D, rows, gate.stride(0) if has_gate else 0, scale.stride(0) if has_mod else 0,
            HAS_DXNEW=has_dxnew, HAS_GATE=has_gate, STORE_DDELTA=store_ddelta, HAS_AFFINE=has_affine,
            HAS_MOD=has_mod, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps)
        per_batch = lambda p, like: p.view(B, chunks, D).sum(1).to(like.dtype)  # noqa: E731
        dw = dw_p.sum(0).to(weight.dtype) if has_affine else None
        db = db_p.sum(0).to(bias.dtype) if has_affine else None
        dshift = per_batch(dshift_p, scale) if has_mod else None
        dscale = per_batch(dscale_p, scale) if has_mod else None
        dgate = per_batch(dgate_p, gate) if has_gate else None
        if has_res:
            ddelta = ddelta if store_ddelta else dx
        return dx.to(ctx.x_dtype), ddelta, dgate, dw, db, dshift, dscale, None, None


def fused_layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                     delta: Optional[torch.Tensor] = None, gate: Optional[torch.Tensor] = None,
                     shift: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
                     out_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `layer_norm_reference` (same arguments, same result): returns (x_new, y).

    x [B, L, D] or [M, D]; gate/shift/scale [B, D] need unit stride along D (chunks of one [B, k*D] tensor are
    fine). Runs on CUDA, or on CPU under TRITON_INTERPRET=1.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    x3 = x if x.dim() == 3 else x.reshape(1, -1, x.shape[-1])
    d3 = None if delta is None else delta.reshape(x3.shape)
    for name, t in (("gate", gate), ("shift", shift), ("scale", scale)):
        if t is not None and (t.shape != (x3.shape[0], x3.shape[2]) or t.stride(1) != 1):
            raise ValueError(f"{name} must be [B, D] with unit stride along D, got {tuple(t.shape)}")
    if (shift is None) != (scale is None) or (weight is None) != (bias is None):
        raise ValueError("shift/scale and weight/bias come in pairs")
    out = FusedLayerNorm.apply(x3, d3, gate, weight, bias, shift, scale, eps, out_dtype)
    x_new, y = out if delta is not None else (x3, out)
    return x_new.view(x.shape) if delta is not None else x, y.view(x.shape)
