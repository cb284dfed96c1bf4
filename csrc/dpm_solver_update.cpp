// CPU kernel of the fused DPM-Solver step update, the op schema, and its CPU / Meta registrations.
// The math and the coefficient layout are documented in dpm_solver_update.h; the PyTorch reference of the
// same math is dpt_fast/ops/dpm_solver_update.py:dpm_solver_update_reference.
#include "dpm_solver_update.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

namespace dpt_fast {
namespace {

// Elements per parallel chunk: large enough that OpenMP overhead is noise, small enough to use every core at
// B x 4 x 32 x 32.
constexpr int64_t kGrain = 16384;
// Elements per block: the block's temporaries stay in L1, and each term is one branch-free loop over it that the
// compiler vectorises (at::vec for float/double where the inputs share the dtype).
constexpr int64_t kBlock = 256;

template <typename T, typename O>
struct UpdateArgs {
  const T* __restrict__ xe;
  const O* __restrict__ mo;
  const T* __restrict__ xb;
  T* __restrict__ hist;
  T* __restrict__ xn;
  int64_t n;
};

// out[k] = a * in[k] + out[k] over one block, vectorised when the input has the accumulator's type.
template <typename acc_t, typename In>
inline void axpy(acc_t* __restrict__ out, const In* __restrict__ in, acc_t a, int64_t len) {
  if constexpr (std::is_same_v<In, acc_t>) {
    using Vec = at::vec::Vectorized<acc_t>;
    const Vec va(a);
    int64_t k = 0;
    for (; k + Vec::size() <= len; k += Vec::size()) {
      at::vec::fmadd(va, Vec::loadu(in + k), Vec::loadu(out + k)).store(out + k);
    }
    for (; k < len; ++k) out[k] = a * in[k] + out[k];
  } else {
    for (int64_t k = 0; k < len; ++k) out[k] = a * static_cast<acc_t>(in[k]) + out[k];
  }
}

template <typename T, typename O>
void update_block(const UpdateArgs<T, O>& p, const StepCoeffs& k, int64_t i, int64_t len) {
  using acc_t = at::opmath_type<T>;
  const int64_t n = p.n;
  acc_t m[kBlock], x[kBlock];
  const acc_t g = k.g, po = k.po;
  // m = p_o * o, o = model_out (or the CFG combination o_u + g (o_c - o_u))
  const O* oc = p.mo + i;
  if (k.cfg) {
    const O* ou = p.mo + n + i;
    for (int64_t e = 0; e < len; ++e) {
      const acc_t u = static_cast<acc_t>(ou[e]);
      m[e] = (u + g * (static_cast<acc_t>(oc[e]) - u)) * po;
    }
  } else {
    for (int64_t e = 0; e < len; ++e) m[e] = static_cast<acc_t>(oc[e]) * po;
  }
  if (k.px != 0.0) axpy<acc_t>(m, p.xe + i, static_cast<acc_t>(k.px), len);  // m += p_x * x_eval
  // x = a * x_base + sum_j c_j * hist[j], the new m standing in for hist[slot]
  for (int64_t e = 0; e < len; ++e) x[e] = acc_t(0);
  if (k.a != 0.0) axpy<acc_t>(x, p.xb + i, static_cast<acc_t>(k.a), len);
  for (int64_t j = 0; j < k.hist; ++j) {
    if (j == k.slot) {
      axpy<acc_t>(x, m, static_cast<acc_t>(k.c[j]), len);
    } else if (k.c[j] != 0.0) {  // a zero coefficient skips reading that history row
      axpy<acc_t>(x, p.hist + j * n + i, static_cast<acc_t>(k.c[j]), len);
    }
  }
  T* hs = p.hist + k.slot * n + i;
  T* xn = p.xn + i;
  for (int64_t e = 0; e < len; ++e) {
    hs[e] = static_cast<T>(m[e]);
    xn[e] = static_cast<T>(x[e]);
  }
}

template <typename T, typename O>
void update_cpu_kernel(const UpdateArgs<T, O>& p, const StepCoeffs& k) {
  at::parallel_for(0, p.n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i += kBlock) update_block<T, O>(p, k, i, std::min(kBlock, end - i));
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
      const UpdateArgs<T, O> args{x_eval.const_data_ptr<T>(), model_out.const_data_ptr<O>(), x_base.const_data_ptr<T>(),
                                  hist.data_ptr<T>(), x_next.data_ptr<T>(), n};
      update_cpu_kernel<T, O>(args, k);
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
