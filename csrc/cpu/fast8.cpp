#include "fast8.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <ATen/ThreadLocalState.h>
#include <c10/util/ParallelGuard.h>

#include <atomic>
#include <exception>
#include <memory>
#include <omp.h>
#include <vector>

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
// conj(A)_c = σ_c A_c with σ = (1, -1, -1, -1), and σ_p A_p + s σ_q A_q = σ_p (A_p + s σ_p σ_q A_q):
// the transform of a conjugated operand is σ_p times a plain sum.
int conjugation_sign(const QuaternionOperand& a, int component) {
  return (a.conjugate && component != R) ? -1 : 1;
}

double transform_scale(const QuaternionOperand& a, ComponentSum t) {
  return conjugation_sign(a, t.p);
}

// The transformed operand (without its scale) on samples [n0, n0 + len) of a batched operand, or
// whole for a shared one. One TensorIterator pass (ATen's vectorised kernel) reading both
// components once; its output follows the components' memory format (channels_last stays so).
at::Tensor transform(const QuaternionOperand& a, ComponentSum t, int64_t n0, int64_t len) {
  const int sign = t.sign * conjugation_sign(a, t.p) * conjugation_sign(a, t.q);
  if (!a.batched) return at::add(a.components[t.p], a.components[t.q], sign);
  return at::add(a.components[t.p].narrow(0, n0, len), a.components[t.q].narrow(0, n0, len), sign);
}

// The innermost loop, written so the compiler vectorises it. `addend_at(i)` is 0, a per-row
// constant (a bias in a channels-first layout) or a per-element load (a bias in channels_last, or
// the output itself when accumulating); the activation K is applied to the sum before the store.
template <typename scalar_t, Act K, typename acc_t, typename AddendAt>
inline void combine_row(int64_t n, char* const* p, const acc_t* k, acc_t slope, AddendAt addend_at) {
  auto* o = reinterpret_cast<scalar_t*>(p[0]);
  const auto* a = reinterpret_cast<const scalar_t*>(p[1]);
  const auto* s5 = reinterpret_cast<const scalar_t*>(p[2]);
  const auto* s6 = reinterpret_cast<const scalar_t*>(p[3]);
  const auto* s7 = reinterpret_cast<const scalar_t*>(p[4]);
  const auto* s8 = reinterpret_cast<const scalar_t*>(p[5]);
  const acc_t k0 = k[0], k1 = k[1], k2 = k[2], k3 = k[3], k4 = k[4];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    o[i] = static_cast<scalar_t>(activate<acc_t, K>(
        k0 * acc_t(a[i]) + k1 * acc_t(s5[i]) + k2 * acc_t(s6[i]) + k3 * acc_t(s7[i]) + k4 * acc_t(s8[i]) +
            addend_at(i),
        slope));
  }
}

template <typename scalar_t, Act K>
void combine_kernel(at::TensorIterator& iter, const std::array<double, 5>& coef, bool has_addend, double negative_slope) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t k[5] = {acc_t(coef[0]), acc_t(coef[1]), acc_t(coef[2]), acc_t(coef[3]), acc_t(coef[4])};
  const acc_t slope = acc_t(negative_slope);
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
        combine_row<scalar_t, K>(n, p, k, slope, [](int64_t) { return acc_t(0); });
      } else if (dense && addend_stride == 0) {
        const acc_t b = *reinterpret_cast<const scalar_t*>(p[6]);
        combine_row<scalar_t, K>(n, p, k, slope, [b](int64_t) { return b; });
      } else if (dense && addend_stride == kSize) {
        const auto* b = reinterpret_cast<const scalar_t*>(p[6]);
        combine_row<scalar_t, K>(n, p, k, slope, [b](int64_t i) { return acc_t(b[i]); });
      } else {  // mismatched layouts (e.g. a product that ignored channels_last): any strides
        for (int64_t i = 0; i < n; ++i) {
          auto in = [&](int t) { return acc_t(*reinterpret_cast<const scalar_t*>(p[t] + i * strides[t])); };
          acc_t v = k[0] * in(1) + k[1] * in(2) + k[2] * in(3) + k[3] * in(4) + k[4] * in(5);
          if (has_addend) v += in(6);
          *reinterpret_cast<scalar_t*>(p[0] + i * strides[0]) = static_cast<scalar_t>(activate<acc_t, K>(v, slope));
        }
      }
    }
  });
}

// out = act(coef[0] * s + sum_j coef[1 + j] * shared[j] (+ addend)), in one pass accumulating in
// opmath (float for bf16/fp16), so low-precision outputs are rounded once.
void combine(
    const at::Tensor& out,
    const at::Tensor& s,
    const std::array<at::Tensor, 4>& shared,
    const std::array<double, 5>& coef,
    const at::Tensor& addend,
    const Activation& act) {
  at::TensorIteratorConfig config;
  config.add_output(out).add_const_input(s);
  for (const auto& t : shared) config.add_const_input(t);
  if (addend.defined()) config.add_const_input(addend);  // `out` itself is fine: same element in and out
  // `out` is a view into the blocked output (or the weight gradient): never resized.
  auto iter = config.resize_outputs(false).build();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "aqcf_fast8_combine", [&] {
    with_activation(act.kind, [&](auto a) {
      combine_kernel<scalar_t, decltype(a)::value>(iter, coef, addend.defined(), act.negative_slope);
    });
  });
}

// Runs item(i) for i in [0, n) on at::get_num_threads() threads in ONE parallel region, handing
// items out on demand (a shared counter), so a thread that gets less CPU takes fewer items and
// nobody waits at a barrier until the end. Inside, ATen (and oneDNN) see a parallel region and
// run serially; the caller's thread-local state (grad mode, dispatch exclusions) is carried over.
template <typename Item>
void parallel_items(int64_t n, const Item& item) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (threads <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < n; ++i) item(i);
    return;
  }
  std::atomic<int64_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  const at::ThreadLocalState state;
#pragma omp parallel num_threads(threads)
  {
    at::ThreadLocalStateGuard tls(state);
    c10::ParallelGuard in_parallel(true);
    // One thread per item, and every library below must know it: oneDNN sizes a primitive (its
    // work split, and barriers between its threads) by omp_get_max_threads() when it creates it,
    // and a primitive made for 2 threads but run inside this region deadlocks at its first barrier
    // (seen with the fp32 weight-gradient kernels). This ICV is this implicit task's own.
    omp_set_num_threads(1);
    for (int64_t i = next.fetch_add(1); i < n && !failed.load(std::memory_order_relaxed); i = next.fetch_add(1)) {
      try {
        item(i);
      } catch (...) {
        if (!failed.exchange(true)) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace

void fast8_hamilton_product(
    const QuaternionOperand& left,
    const QuaternionOperand& right,
    BilinearProduct product,
    const std::array<at::Tensor, 4>& out,
    bool out_batched,
    const std::array<at::Tensor, 4>& addend,
    BatchSlices batch,
    const Activation& act) {
  TORCH_CHECK(out_batched || !act.any(), "fast8_hamilton_product: an activation needs a batched output");
  const int64_t slices = (batch.batch + batch.slice - 1) / batch.slice;
  auto slice_start = [&](int64_t s) { return s * batch.slice; };
  auto slice_len = [&](int64_t s) { return std::min(batch.slice, batch.batch - s * batch.slice); };
  // A shared operand (the weight) is transformed once for every slice; a batched one per item,
  // right before its product reads it.
  std::array<at::Tensor, 8> left_shared, right_shared;
  std::array<double, 8> scale{};
  for (int m = 0; m < 8; ++m) {
    if (!left.batched) left_shared[m] = transform(left, kLeft[m], 0, 0);
    if (!right.batched) right_shared[m] = transform(right, kRight[m], 0, 0);
    scale[m] = transform_scale(left, kLeft[m]) * transform_scale(right, kRight[m]);
  }
  auto product_m = [&](int m, int64_t s) {
    const int64_t n0 = slice_start(s), len = slice_len(s);
    const at::Tensor l = left.batched ? transform(left, kLeft[m], n0, len) : left_shared[m];
    const at::Tensor r = right.batched ? transform(right, kRight[m], n0, len) : right_shared[m];
    return product(l, r);
  };
  // Z_c = s_c + 1/2 sum_j kOut[c][j] s_{5+j}, each s_m carrying its conjugation scale.
  auto write_output = [&](const std::array<at::Tensor, 8>& s, auto&& out_c, auto&& addend_c) {
    for (int c = 0; c < 4; ++c) {
      std::array<double, 5> k{scale[c]};
      for (int j = 0; j < 4; ++j) k[1 + j] = 0.5 * kOut[c][j] * scale[4 + j];
      combine(out_c(c), s[c], {s[4], s[5], s[6], s[7]}, k, addend_c(c), act);
    }
  };

  if (out_batched) {
    // Items (slice, product), slice-major, so only ~threads + 1 slices are in flight; whoever
    // finishes a slice's 8th product writes that slice's output while it is still in cache.
    std::vector<std::array<at::Tensor, 8>> products(slices);
    std::unique_ptr<std::atomic<int>[]> pending(new std::atomic<int>[slices]);
    for (int64_t s = 0; s < slices; ++s) pending[s].store(8);
    parallel_items(8 * slices, [&](int64_t i) {
      const int64_t s = i / 8;
      const int m = int(i % 8);
      products[s][m] = product_m(m, s);
      if (pending[s].fetch_sub(1, std::memory_order_acq_rel) != 1) return;
      write_output(
          products[s], [&](int c) { return out[c].narrow(0, slice_start(s), slice_len(s)); },
          [&](int c) { return addend[c]; });
      products[s] = {};
    });
    return;
  }
  // Shared output: the slices are cut into one contiguous run per thread, and item (run, product)
  // sums its run's products in order; runs are then added in order, so the sum does not depend on
  // which thread took which item.
  const int64_t runs = std::min<int64_t>(slices, std::max(1, at::get_num_threads()));
  std::vector<std::array<at::Tensor, 8>> sums(runs);
  parallel_items(8 * runs, [&](int64_t i) {
    const int64_t run = i / 8;
    const int m = int(i % 8);
    at::Tensor& sum = sums[run][m];
    for (int64_t s = run * slices / runs; s < (run + 1) * slices / runs; ++s) {
      at::Tensor p = product_m(m, s);
      sum = sum.defined() ? sum.add_(p) : std::move(p);
    }
  });
  for (int64_t run = 1; run < runs; ++run)
    for (int m = 0; m < 8; ++m) sums[0][m].add_(sums[run][m]);
  write_output(sums[0], [&](int c) { return out[c]; }, [](int) { return at::Tensor(); });
}

void fast8_hamilton_product_in_sequence(
    const QuaternionOperand& left,
    const QuaternionOperand& right,
    BilinearProduct product,
    const std::array<at::Tensor, 4>& out,
    const std::array<at::Tensor, 4>& addend,
    const Activation& act) {
  auto whole = [](const QuaternionOperand& a, ComponentSum t) {
    return transform(a, t, 0, a.batched ? a.components[t.p].size(0) : 0);
  };
  std::array<at::Tensor, 8> s;
  std::array<double, 8> scale{};
  for (int m = 0; m < 8; ++m) {
    s[m] = product(whole(left, kLeft[m]), whole(right, kRight[m]));
    scale[m] = transform_scale(left, kLeft[m]) * transform_scale(right, kRight[m]);
  }
  const at::ScalarType acc = at::toOpMathType(out[0].scalar_type());
  for (int c = 0; c < 4; ++c) {  // Z_c = s_c + 1/2 sum_j kOut[c][j] s_{5+j}, each s_m carrying its scale
    at::Tensor z = s[c].to(acc).mul(scale[c]);
    for (int j = 0; j < 4; ++j) z.add_(s[4 + j].to(acc), 0.5 * kOut[c][j] * scale[4 + j]);
    if (addend[c].defined()) z.add_(addend[c]);
    activate_(z, act);
    out[c].copy_(z);
  }
}

}  // namespace aqcf
