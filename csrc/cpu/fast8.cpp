#include "fast8.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorIterator.h>

#include <utility>

namespace aqcf {
namespace {

constexpr int R = 0, I = 1, J = 2, K = 3;

// Operand m of product m is A_p + sign * A_q. Same tables as FAST8_LEFT / FAST8_RIGHT /
// FAST8_OUT in aqcf_kernels/quaternion.py (the tests compare both to the reference).
struct ComponentSum {
  int p, q, sign;
};
constexpr ComponentSum kLeft[8] = {
    {K, J, -1}, {R, I, +1}, {R, I, -1}, {J, K, +1}, {K, I, -1}, {K, I, +1}, {R, J, +1}, {R, J, -1},
};
constexpr ComponentSum kRight[8] = {
    {J, K, -1}, {R, I, +1}, {J, K, +1}, {R, I, -1}, {I, J, -1}, {I, J, +1}, {R, K, -1}, {R, K, +1},
};
// Z_c = s_c + 1/2 * sum_j kOut[c][j] * s_{5+j}
constexpr int kOut[4][4] = {{+1, -1, +1, +1}, {+1, -1, -1, -1}, {+1, +1, +1, -1}, {+1, +1, -1, +1}};

// A transformed operand is `scale * tensor`. The scale is ±1 and only comes from conjugation: it
// is carried to the output coefficients (the products are bilinear) instead of costing a pass.
struct Scaled {
  at::Tensor tensor;
  double scale;
};

Scaled transform(const QuaternionOperand& a, ComponentSum t) {
  // conj(A)_c = σ_c A_c with σ = (1, -1, -1, -1), and σ_p A_p + s σ_q A_q = σ_p (A_p + s σ_p σ_q A_q).
  const int sp = (a.conjugate && t.p != R) ? -1 : 1;
  const int sq = (a.conjugate && t.q != R) ? -1 : 1;
  // One TensorIterator pass (ATen's vectorised kernel) reading both components once. Its output
  // follows the components' memory format, so channels_last stays channels_last for the product.
  return {at::add(a.components[t.p], a.components[t.q], t.sign * sp * sq), double(sp)};
}

// The innermost loop, written so the compiler vectorises it. `addend_at(i)` is 0, a per-row
// constant (a bias in a channels-first layout) or a per-element load (a bias in channels_last, or
// the output itself when accumulating).
template <typename scalar_t, typename acc_t, typename AddendAt>
inline void combine_row(int64_t n, char* const* p, const acc_t* k, AddendAt addend_at) {
  auto* o = reinterpret_cast<scalar_t*>(p[0]);
  const auto* a = reinterpret_cast<const scalar_t*>(p[1]);
  const auto* s5 = reinterpret_cast<const scalar_t*>(p[2]);
  const auto* s6 = reinterpret_cast<const scalar_t*>(p[3]);
  const auto* s7 = reinterpret_cast<const scalar_t*>(p[4]);
  const auto* s8 = reinterpret_cast<const scalar_t*>(p[5]);
  const acc_t k0 = k[0], k1 = k[1], k2 = k[2], k3 = k[3], k4 = k[4];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    o[i] = static_cast<scalar_t>(
        k0 * acc_t(a[i]) + k1 * acc_t(s5[i]) + k2 * acc_t(s6[i]) + k3 * acc_t(s7[i]) + k4 * acc_t(s8[i]) +
        addend_at(i));
  }
}

template <typename scalar_t>
void combine_kernel(at::TensorIterator& iter, const std::array<double, 5>& coef, bool has_addend) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t k[5] = {acc_t(coef[0]), acc_t(coef[1]), acc_t(coef[2]), acc_t(coef[3]), acc_t(coef[4])};
  constexpr int64_t kSize = sizeof(scalar_t);
  const int nt = iter.ntensors();
  iter.for_each([&](char** data, const int64_t* strides, int64_t n, int64_t rows) {
    bool dense = true;  // every operand but the addend walks its row contiguously
    for (int t = 0; t < 6; ++t) dense = dense && strides[t] == kSize;
    const int64_t addend_stride = has_addend ? strides[6] : 0;
    char* p[7];
    for (int64_t r = 0; r < rows; ++r) {
      for (int t = 0; t < nt; ++t) p[t] = data[t] + r * strides[nt + t];
      if (dense && !has_addend) {
        combine_row<scalar_t>(n, p, k, [](int64_t) { return acc_t(0); });
      } else if (dense && addend_stride == 0) {
        const acc_t b = *reinterpret_cast<const scalar_t*>(p[6]);
        combine_row<scalar_t>(n, p, k, [b](int64_t) { return b; });
      } else if (dense && addend_stride == kSize) {
        const auto* b = reinterpret_cast<const scalar_t*>(p[6]);
        combine_row<scalar_t>(n, p, k, [b](int64_t i) { return acc_t(b[i]); });
      } else {  // mismatched layouts (e.g. a product that ignored channels_last): any strides
        for (int64_t i = 0; i < n; ++i) {
          auto in = [&](int t) { return acc_t(*reinterpret_cast<const scalar_t*>(p[t] + i * strides[t])); };
          acc_t v = k[0] * in(1) + k[1] * in(2) + k[2] * in(3) + k[3] * in(4) + k[4] * in(5);
          if (has_addend) v += in(6);
          *reinterpret_cast<scalar_t*>(p[0] + i * strides[0]) = static_cast<scalar_t>(v);
        }
      }
    }
  });
}

// out = coef[0] * s + sum_j coef[1 + j] * shared[j] (+ addend), in one pass accumulating in opmath
// (float for bf16/fp16), so low-precision outputs are rounded once.
void combine(
    const at::Tensor& out,
    const at::Tensor& s,
    const std::array<at::Tensor, 4>& shared,
    const std::array<double, 5>& coef,
    const at::Tensor& addend) {
  at::TensorIteratorConfig config;
  config.add_output(out).add_const_input(s);
  for (const auto& t : shared) config.add_const_input(t);
  if (addend.defined()) config.add_const_input(addend);  // `out` itself is fine: same element in and out
  // `out` is a view into the blocked output (or the weight gradient): never resized.
  auto iter = config.resize_outputs(false).build();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "aqcf_fast8_combine", [&] {
    combine_kernel<scalar_t>(iter, coef, addend.defined());
  });
}

}  // namespace

void fast8_hamilton_product(
    const QuaternionOperand& left,
    const QuaternionOperand& right,
    BilinearProduct product,
    const std::array<at::Tensor, 4>& out,
    const std::array<at::Tensor, 4>& addend) {
  // Each transform is read by exactly one product, so transforming on demand costs the same as
  // precomputing (a weight-sized operand is re-transformed per batch slice: 8 tiny adds), and a
  // large operand's transform dies as soon as its product returns.
  auto scaled_product = [&](int m) -> Scaled {
    Scaled l = transform(left, kLeft[m]);
    Scaled r = transform(right, kRight[m]);
    return {product(l.tensor, r.tensor), l.scale * r.scale};
  };
  // s5..s8 feed every output component, so they are computed first and kept; each s_c then lives
  // only until the pass that writes Z_c.
  std::array<at::Tensor, 4> shared;
  std::array<double, 4> shared_scale{};
  for (int j = 0; j < 4; ++j) {
    Scaled s = scaled_product(4 + j);
    shared[j] = std::move(s.tensor);
    shared_scale[j] = s.scale;
  }
  for (int c = 0; c < 4; ++c) {
    Scaled s = scaled_product(c);
    std::array<double, 5> k{s.scale};
    for (int j = 0; j < 4; ++j) k[1 + j] = 0.5 * kOut[c][j] * shared_scale[j];
    combine(out[c], s.tensor, shared, k, addend[c]);
  }
}

}  // namespace aqcf
