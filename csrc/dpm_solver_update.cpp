// CPU kernel of the fused DPM-Solver step update, the op schema, and its CPU / Meta registrations.
// The math and the coefficient layout are documented in dpm_solver_update.h; the PyTorch reference of the
// same math is dpt_fast/ops/dpm_solver_update.py:dpm_solver_update_reference.
#include "dpm_solver_update.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <type_traits>

namespace dpt_fast {
namespace {

// Elements per parallel chunk: large enough that OpenMP overhead is noise, small enough to use every core
// at B x 4 x 32 x 32.
constexpr int64_t kGrain = 16384;

template <typename T, typename O>
void update_cpu_kernel(const T* __restrict__ xe, const O* __restrict__ mo, const T* __restrict__ xb,
                       T* __restrict__ hist, T* __restrict__ xn, int64_t n, const StepCoeffs& k) {
  using acc_t = at::opmath_type<T>;
  const acc_t g = k.g, px = k.px, po = k.po, a = k.a;
  acc_t c[kMaxHist];
  bool use[kMaxHist];
  for (int64_t j = 0; j < k.hist; ++j) {
    c[j] = static_cast<acc_t>(k.c[j]);
    use[j] = j == k.slot || k.c[j] != 0.0;  // a zero coefficient skips reading that history row
  }
  const bool use_xe = k.px != 0.0, use_xb = k.a != 0.0, cfg = k.cfg;
  const int64_t H = k.hist, slot = k.slot;

  // The scalar formula; the vector loop below evaluates the same expression in the same order.
  auto scalar = [&](int64_t i) {
    acc_t o = static_cast<acc_t>(mo[i]);
    if (cfg) {
      const acc_t ou = static_cast<acc_t>(mo[n + i]);
      o = ou + g * (o - ou);
    }
    acc_t m = po * o;
    if (use_xe) m = px * static_cast<acc_t>(xe[i]) + m;
    acc_t x = use_xb ? a * static_cast<acc_t>(xb[i]) : acc_t(0);
    for (int64_t j = 0; j < H; ++j) {
      if (!use[j]) continue;
      x += c[j] * (j == slot ? m : static_cast<acc_t>(hist[j * n + i]));
    }
    hist[slot * n + i] = static_cast<T>(m);
    xn[i] = static_cast<T>(x);
  };

  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    if constexpr (std::is_same_v<T, O> && std::is_same_v<T, acc_t>) {
      using Vec = at::vec::Vectorized<T>;
      constexpr int64_t W = Vec::size();
      const Vec vg(g), vpx(px), vpo(po), va(a);
      for (; i + W <= end; i += W) {
        Vec o = Vec::loadu(mo + i);
        if (cfg) {
          const Vec ou = Vec::loadu(mo + n + i);
          o = at::vec::fmadd(vg, o - ou, ou);
        }
        Vec m = vpo * o;
        if (use_xe) m = at::vec::fmadd(vpx, Vec::loadu(xe + i), m);
        Vec x = use_xb ? va * Vec::loadu(xb + i) : Vec(T(0));
        for (int64_t j = 0; j < H; ++j) {
          if (!use[j]) continue;
          x = at::vec::fmadd(Vec(c[j]), j == slot ? m : Vec::loadu(hist + j * n + i), x);
        }
        m.store(hist + slot * n + i);
        x.store(xn + i);
      }
    }
    for (; i < end; ++i) scalar(i);
  });
}

at::Tensor dpm_solver_update_cpu(const at::Tensor& x_eval, const at::Tensor& model_out, const at::Tensor& x_base,
                                 at::Tensor& hist, const at::Tensor& coeffs, int64_t slot) {
  const StepCoeffs k = check_update_args(x_eval, model_out, x_base, hist, coeffs, slot);
  at::Tensor x_next = at::empty_like(x_base);
  const int64_t n = x_base.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_base.scalar_type(), "dpm_solver_update_cpu", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, model_out.scalar_type(), "dpm_solver_update_cpu", [&] {
      using O = scalar_t;
      update_cpu_kernel<T, O>(x_eval.const_data_ptr<T>(), model_out.const_data_ptr<O>(), x_base.const_data_ptr<T>(),
                              hist.data_ptr<T>(), x_next.data_ptr<T>(), n, k);
    });
  });
  return x_next;
}

// Shape-only implementation for torch.compile's fake tensors.
at::Tensor dpm_solver_update_meta(const at::Tensor& x_eval, const at::Tensor& model_out, const at::Tensor& x_base,
                                  at::Tensor& hist, const at::Tensor& coeffs, int64_t slot) {
  TORCH_CHECK(hist.dim() == x_base.dim() + 1 && slot >= 0 && slot < hist.size(0),
              "dpm_solver_update: hist must be [H, *x_base.shape] and 0 <= slot < H");
  return at::empty_like(x_base);
}

}  // namespace

TORCH_LIBRARY(dpt_fast, m) {
  m.def(
      "dpm_solver_update(Tensor x_eval, Tensor model_out, Tensor x_base, Tensor(a!) hist, Tensor coeffs, int slot) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(dpt_fast, CPU, m) { m.impl("dpm_solver_update", &dpm_solver_update_cpu); }

TORCH_LIBRARY_IMPL(dpt_fast, Meta, m) { m.impl("dpm_solver_update", &dpm_solver_update_meta); }

}  // namespace dpt_fast
