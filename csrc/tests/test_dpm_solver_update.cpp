// C++ unit tests of dpt_fast::dpm_solver_update (CPU): the op, called through the dispatcher as Python does,
// against a naive float64 loop of the same formula; plus its argument checks. Run by `ctest`.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

namespace {

int g_failures = 0;

#define EXPECT(cond, ...)                                      \
  do {                                                         \
    if (!(cond)) {                                             \
      ++g_failures;                                            \
      std::printf("FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                \
      std::printf("\n");                                       \
    }                                                          \
  } while (0)

using UpdateFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&, const at::Tensor&,
                            int64_t);

c10::TypedOperatorHandle<UpdateFn> op() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("dpt_fast::dpm_solver_update", "").typed<UpdateFn>();
}

// The formula of csrc/dpm_solver_update.h, element by element in double.
void reference(const at::Tensor& xe, const at::Tensor& mo, const at::Tensor& xb, at::Tensor& hist,
               const std::vector<double>& c, int64_t slot, at::Tensor& x_next) {
  const int64_t n = xb.numel(), H = hist.size(0);
  const bool cfg = mo.size(0) == 2 * xb.size(0);
  auto e = xe.to(at::kDouble).contiguous(), o = mo.to(at::kDouble).contiguous(), b = xb.to(at::kDouble).contiguous();
  auto h = hist.to(at::kDouble).contiguous();
  auto out = at::empty({n}, at::kDouble);
  const double *pe = e.data_ptr<double>(), *po = o.data_ptr<double>(), *pb = b.data_ptr<double>();
  double *ph = h.data_ptr<double>(), *px = out.data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) {
    double v = po[i];
    if (cfg) v = po[n + i] + c[0] * (po[i] - po[n + i]);
    const double m = c[1] * pe[i] + c[2] * v;
    double x = c[3] * pb[i];
    for (int64_t j = 0; j < H; ++j) x += c[4 + j] * (j == slot ? m : ph[j * n + i]);
    ph[slot * n + i] = m;
    px[i] = x;
  }
  hist.copy_(h.view(hist.sizes()));
  x_next = out.view(xb.sizes()).to(xb.scalar_type());
}

double rel_err(const at::Tensor& a, const at::Tensor& b) {
  auto d = (a.to(at::kDouble) - b.to(at::kDouble)).norm().item<double>();
  return d / std::max(b.to(at::kDouble).norm().item<double>(), 1e-30);
}

void check_case(at::ScalarType dtype, at::ScalarType out_dtype, bool cfg, int64_t H, int64_t slot,
                std::vector<int64_t> shape, bool zero_terms, double tol) {
  const int64_t B = shape[0];
  auto opts = at::TensorOptions().dtype(dtype);
  auto xe = at::randn(shape, opts), xb = at::randn(shape, opts);
  auto mo_shape = shape;
  if (cfg) mo_shape[0] = 2 * B;
  auto mo = at::randn(mo_shape, at::TensorOptions().dtype(out_dtype));
  std::vector<int64_t> hshape{H};
  hshape.insert(hshape.end(), shape.begin(), shape.end());
  auto hist = at::randn(hshape, opts);
  std::vector<double> c{1.4, zero_terms ? 0.0 : 1.7, -0.3, zero_terms ? 0.0 : 0.9};
  for (int64_t j = 0; j < H; ++j) c.push_back((zero_terms && j != slot) ? 0.0 : 0.25 * (j + 1) - 0.6);
  auto coeffs = at::tensor(c, at::kDouble);

  auto hist_ref = hist.clone();
  at::Tensor x_ref;
  reference(xe, mo, xb, hist_ref, c, slot, x_ref);
  auto x = op().call(xe, mo, xb, hist, coeffs, slot);
  const double ex = rel_err(x, x_ref), eh = rel_err(hist, hist_ref);
  EXPECT(ex <= tol && eh <= tol, "dtype=%s out=%s cfg=%d H=%ld slot=%ld n=%ld zero=%d: rel err x %.3g, hist %.3g",
         c10::toString(dtype), c10::toString(out_dtype), cfg, (long)H, (long)slot, (long)xb.numel(), zero_terms, ex, eh);
}

template <typename F>
void expect_throws(F f, const char* what) {
  bool threw = false;
  try {
    f();
  } catch (const c10::Error&) {
    threw = true;
  }
  EXPECT(threw, "expected an error: %s", what);
}

}  // namespace

int main() {
  at::manual_seed(0);
  EXPECT(c10::Dispatcher::singleton().findSchema({"dpt_fast::dpm_solver_update", ""}).has_value(),
         "op not registered");

  // Every history size and slot, with and without CFG, sizes with and without a vector tail.
  for (int64_t H = 1; H <= 4; ++H)
    for (int64_t slot = 0; slot < H; ++slot)
      for (bool cfg : {false, true}) {
        check_case(at::kFloat, at::kFloat, cfg, H, slot, {3, 4, 8, 8}, false, 1e-6);
        check_case(at::kFloat, at::kFloat, cfg, H, slot, {5, 1, 7, 3}, slot == 0, 1e-6);
      }
  check_case(at::kDouble, at::kDouble, true, 3, 1, {4, 4, 16, 16}, false, 1e-13);
  check_case(at::kFloat, at::kBFloat16, true, 2, 1, {4, 4, 16, 16}, false, 1e-6);  // bf16 model output
  check_case(at::kFloat, at::kHalf, false, 3, 2, {2, 3, 5, 5}, true, 1e-6);
  check_case(at::kFloat, at::kFloat, true, 3, 0, {64, 4, 32, 32}, false, 1e-6);  // several parallel chunks

  // Argument checks.
  auto x = at::randn({2, 3}), hist = at::zeros({2, 2, 3});
  auto c6 = at::zeros({6}, at::kDouble);
  expect_throws([&] { op().call(x, at::randn({3, 3}), x, hist, c6, 0); }, "model_out with 3 rows for B=2");
  expect_throws([&] { op().call(x, x, x, hist, at::zeros({5}, at::kDouble), 0); }, "coeffs of the wrong length");
  expect_throws([&] { op().call(x, x, x, hist, at::zeros({6}), 0); }, "float32 coeffs");
  expect_throws([&] { op().call(x, x, x, hist, c6, 2); }, "slot outside hist");
  expect_throws([&] { op().call(x, x, x.to(at::kDouble), hist, c6, 0); }, "x_base of another dtype");

  if (g_failures == 0) std::printf("all dpm_solver_update C++ tests passed\n");
  return g_failures == 0 ? 0 : 1;
}
