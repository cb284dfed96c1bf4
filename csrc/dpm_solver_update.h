// The fused DPM-Solver step update: shared argument checks and the coefficient layout.
//
// One call = one model evaluation of the sampler, in one pass over memory:
//
//   o      = model_out                                   (model_out: [B, ...])
//   o      = o_u + g (o_c - o_u)                         (model_out: [2B, ...] = [cond; uncond], CFG)
//   m      = p_x * x_eval + p_o * o                      (noise -> data (or noise) prediction, linear in x, o)
//   hist[slot] <- m
//   x_next = a * x_base + sum_j c_j * hist[j]            (hist[slot] is the new m)
//
// coeffs is a small float64 CPU tensor [4 + H] = (g, p_x, p_o, a, c_0 .. c_{H-1}); the sampler builds all of
// them once per sampling call in double precision (dpt_fast/sampling/dpm_solver.py). The arithmetic runs in
// the op-math type of x (float for float/half/bfloat16, double for double).
#pragma once

#include <ATen/ATen.h>

namespace dpt_fast {

constexpr int64_t kMaxHist = 4;

struct StepCoeffs {
  double g, px, po, a;
  double c[kMaxHist];
  int64_t hist;  // H
  int64_t slot;
  bool cfg;  // model_out holds [cond; uncond]
};

// Checks every argument (one-line messages that name the argument) and unpacks the coefficients.
inline StepCoeffs check_update_args(const at::Tensor& x_eval, const at::Tensor& model_out, const at::Tensor& x_base,
                                    const at::Tensor& hist, const at::Tensor& coeffs, int64_t slot) {
  TORCH_CHECK(x_base.dim() >= 1 && x_base.size(0) >= 1, "dpm_solver_update: x_base must be [B, ...] with B >= 1");
  TORCH_CHECK(at::isFloatingType(x_base.scalar_type()), "dpm_solver_update: x_base must be floating point");
  TORCH_CHECK(x_eval.sizes() == x_base.sizes() && x_eval.scalar_type() == x_base.scalar_type() &&
                  x_eval.device() == x_base.device(),
              "dpm_solver_update: x_eval must match x_base in shape, dtype and device");
  TORCH_CHECK(at::isFloatingType(model_out.scalar_type()) && model_out.device() == x_base.device(),
              "dpm_solver_update: model_out must be floating point on the device of x_base");
  const int64_t B = x_base.size(0);
  TORCH_CHECK(model_out.dim() == x_base.dim() && model_out.sizes().slice(1) == x_base.sizes().slice(1) &&
                  (model_out.size(0) == B || model_out.size(0) == 2 * B),
              "dpm_solver_update: model_out must be [B, ...] or [2B, ...] (cond; uncond) with the shape of x_base");
  TORCH_CHECK(hist.dim() == x_base.dim() + 1 && hist.sizes().slice(1) == x_base.sizes() &&
                  hist.scalar_type() == x_base.scalar_type() && hist.device() == x_base.device(),
              "dpm_solver_update: hist must be [H, *x_base.shape] with the dtype and device of x_base");
  const int64_t H = hist.size(0);
  TORCH_CHECK(H >= 1 && H <= kMaxHist, "dpm_solver_update: hist must hold 1..", kMaxHist, " model values, got ", H);
  TORCH_CHECK(slot >= 0 && slot < H, "dpm_solver_update: slot ", slot, " is outside hist[0..", H - 1, "]");
  TORCH_CHECK(x_eval.is_contiguous() && x_base.is_contiguous() && model_out.is_contiguous() && hist.is_contiguous(),
              "dpm_solver_update: x_eval, model_out, x_base and hist must be contiguous");
  TORCH_CHECK(coeffs.device().is_cpu() && coeffs.scalar_type() == at::kDouble && coeffs.dim() == 1 &&
                  coeffs.numel() == 4 + H,
              "dpm_solver_update: coeffs must be a float64 CPU tensor [4 + H] = (g, p_x, p_o, a, c_0..c_{H-1})");
  const at::Tensor cc = coeffs.contiguous();
  const double* p = cc.data_ptr<double>();
  StepCoeffs k{};
  k.g = p[0];
  k.px = p[1];
  k.po = p[2];
  k.a = p[3];
  for (int64_t j = 0; j < H; ++j) k.c[j] = p[4 + j];
  k.hist = H;
  k.slot = slot;
  k.cfg = model_out.size(0) == 2 * B;
  return k;
}

}  // namespace dpt_fast
