// CUDA kernel of the fused DPM-Solver step update (math and layout: dpm_solver_update.h).
//
// Memory-bound: each element is read once from x_eval, x_base, model_out (two rows with CFG) and the used
// history rows, and written once to hist[slot] and x_next. The coefficients travel by value in the kernel
// arguments (they are read on the host from a CPU tensor, so no device sync and nothing to go stale when a
// CUDA graph captures the launch: each captured step keeps its own constants).
#include "dpm_solver_update.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>

namespace dpt_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kPack = 4;  // elements per vectorised load/store

template <typename T>
struct alignas(sizeof(T) * kPack) Pack {
  T v[kPack];
};

template <typename acc_t>
struct DevCoeffs {
  acc_t g, px, po, a;
  acc_t c[kMaxHist];
  int hist, slot;
  bool cfg, use_xe, use_xb;
  bool use[kMaxHist];
};

// One element. h[j] holds history row j at this element (unused rows and the slot row are ignored).
template <typename T, typename O, typename acc_t>
__device__ __forceinline__ void update_one(const T xe, const O oc, const O ou, const T xb, const T (&h)[kMaxHist],
                                           const DevCoeffs<acc_t>& k, T& m_out, T& x_out) {
  acc_t o = static_cast<acc_t>(oc);
  if (k.cfg) {
    const acc_t u = static_cast<acc_t>(ou);
    o = u + k.g * (o - u);
  }
  acc_t m = k.po * o;
  if (k.use_xe) m = k.px * static_cast<acc_t>(xe) + m;
  acc_t x = k.use_xb ? k.a * static_cast<acc_t>(xb) : acc_t(0);
#pragma unroll
  for (int j = 0; j < kMaxHist; ++j) {
    if (!k.use[j]) continue;
    x += k.c[j] * (j == k.slot ? m : static_cast<acc_t>(h[j]));
  }
  m_out = static_cast<T>(m);
  x_out = static_cast<T>(x);
}

// Scalar grid-stride kernel: any size and alignment.
template <typename T, typename O, typename acc_t>
__global__ void update_kernel(const T* __restrict__ xe, const O* __restrict__ mo, const T* __restrict__ xb,
                              T* __restrict__ hist, T* __restrict__ xn, int64_t n, DevCoeffs<acc_t> k) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    T h[kMaxHist];
#pragma unroll
    for (int j = 0; j < kMaxHist; ++j) h[j] = (k.use[j] && j != k.slot) ? hist[j * n + i] : T(0);
    T m, x;
    update_one<T, O, acc_t>(k.use_xe ? xe[i] : T(0), mo[i], k.cfg ? mo[n + i] : O(0), k.use_xb ? xb[i] : T(0), h, k,
                            m, x);
    hist[k.slot * n + i] = m;
    xn[i] = x;
  }
}

// Vectorised kernel: n % kPack == 0 and every pointer aligned to its Pack (checked on the host).
template <typename T, typename O, typename acc_t>
__global__ void update_kernel_packed(const T* __restrict__ xe, const O* __restrict__ mo, const T* __restrict__ xb,
                                     T* __restrict__ hist, T* __restrict__ xn, int64_t n, DevCoeffs<acc_t> k) {
  const int64_t n_packs = n / kPack;
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < n_packs;
       p += (int64_t)gridDim.x * blockDim.x) {
    Pack<T> vxe{}, vxb{}, vh[kMaxHist] = {}, vm, vx;
    Pack<O> vou{};
    const Pack<O> voc = reinterpret_cast<const Pack<O>*>(mo)[p];
    if (k.use_xe) vxe = reinterpret_cast<const Pack<T>*>(xe)[p];
    if (k.use_xb) vxb = reinterpret_cast<const Pack<T>*>(xb)[p];
    if (k.cfg) vou = reinterpret_cast<const Pack<O>*>(mo + n)[p];
#pragma unroll
    for (int j = 0; j < kMaxHist; ++j) {
      if (k.use[j] && j != k.slot) vh[j] = reinterpret_cast<const Pack<T>*>(hist + j * n)[p];
    }
#pragma unroll
    for (int e = 0; e < kPack; ++e) {
      T h[kMaxHist];
#pragma unroll
      for (int j = 0; j < kMaxHist; ++j) h[j] = vh[j].v[e];
      update_one<T, O, acc_t>(vxe.v[e], voc.v[e], vou.v[e], vxb.v[e], h, k, vm.v[e], vx.v[e]);
    }
    reinterpret_cast<Pack<T>*>(hist + k.slot * n)[p] = vm;
    reinterpret_cast<Pack<T>*>(xn)[p] = vx;
  }
}

// Streaming multiprocessors of the current device, queried once per device (the first call runs eagerly, before
// any CUDA graph capture, so capture never sees the attribute query).
int sm_count() {
  static std::array<std::atomic<int>, 64> cache{};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  const bool cached = dev < static_cast<int>(cache.size());
  int sms = cached ? cache[dev].load(std::memory_order_relaxed) : 0;
  if (sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    if (cached) cache[dev].store(sms, std::memory_order_relaxed);
  }
  return sms;
}

template <typename P>
bool aligned(const void* ptr) {
  return reinterpret_cast<std::uintptr_t>(ptr) % alignof(P) == 0;
}

at::Tensor dpm_solver_update_cuda(const at::Tensor& x_eval, const at::Tensor& model_out, const at::Tensor& x_base,
                                  at::Tensor& hist, const at::Tensor& coeffs, int64_t slot) {
  const StepCoeffs sk = check_update_args(x_eval, model_out, x_base, hist, coeffs, slot);
  const c10::cuda::CUDAGuard guard(x_base.device());
  at::Tensor x_next = at::empty_like(x_base);
  const int64_t n = x_base.numel();
  if (n == 0) return x_next;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int max_blocks = sm_count() * 16;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_base.scalar_type(), "dpm_solver_update_cuda", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, model_out.scalar_type(), "dpm_solver_update_cuda", [&] {
      using O = scalar_t;
      using acc_t = at::opmath_type<T>;
      DevCoeffs<acc_t> k{};
      k.g = static_cast<acc_t>(sk.g);
      k.px = static_cast<acc_t>(sk.px);
      k.po = static_cast<acc_t>(sk.po);
      k.a = static_cast<acc_t>(sk.a);
      k.hist = static_cast<int>(sk.hist);
      k.slot = static_cast<int>(sk.slot);
      k.cfg = sk.cfg;
      k.use_xe = sk.px != 0.0;
      k.use_xb = sk.a != 0.0;
      for (int j = 0; j < kMaxHist; ++j) {
        k.c[j] = j < sk.hist ? static_cast<acc_t>(sk.c[j]) : acc_t(0);
        k.use[j] = j < sk.hist && (j == sk.slot || sk.c[j] != 0.0);
      }
      const T* xe = x_eval.const_data_ptr<T>();
      const O* mo = model_out.const_data_ptr<O>();
      const T* xb = x_base.const_data_ptr<T>();
      T* hp = hist.data_ptr<T>();
      T* xn = x_next.data_ptr<T>();
      const bool packed = n % kPack == 0 && aligned<Pack<T>>(xe) && aligned<Pack<T>>(xb) && aligned<Pack<T>>(hp) &&
                          aligned<Pack<T>>(xn) && aligned<Pack<O>>(mo);
      const int64_t work = packed ? n / kPack : n;
      const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, max_blocks)));
      if (packed) {
        update_kernel_packed<T, O, acc_t><<<blocks, kThreads, 0, stream>>>(xe, mo, xb, hp, xn, n, k);
      } else {
        update_kernel<T, O, acc_t><<<blocks, kThreads, 0, stream>>>(xe, mo, xb, hp, xn, n, k);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return x_next;
}

}  // namespace

TORCH_LIBRARY_IMPL(dpt_fast, CUDA, m) { m.impl("dpm_solver_update", &dpm_solver_update_cuda); }

}  // namespace dpt_fast
