#include "fast8.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <ATen/ThreadLocalState.h>
#include <c10/util/ParallelGuard.h>

#include <algorithm>
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
// Z_c = s_c + 1/2 * sum_j kOut[c][j] * s_{4+j} (products numbered from 0)
constexpr int kOut[4][4] = {{+1, -1, +1, +1}, {+1, -1, -1, -1}, {+1, +1, +1, -1}, {+1, +1, -1, +1}};

// Product m's operand is `scale * (A_p + sum_sign * A_q)` over the raw components, with p < q.
// The scale is ±1 and is carried to the output coefficients (the products are bilinear) instead of
// costing a pass. It comes from conjugation, conj(A)_c = σ_c A_c with σ = (1, -1, -1, -1), and
// from writing the pair in component order: σ_p A_p + s σ_q A_q = σ_p (A_p + s σ_p σ_q A_q)
// = s σ_q (A_q + s σ_p σ_q A_p). Two products whose operands share a component pair read A_p + A_q
// and A_p - A_q: one pass forms both.
struct OperandForm {
  int p, q, sum_sign, scale;
};

int conjugation_sign(const QuaternionOperand& a, int component) {
  return (a.conjugate && component != R) ? -1 : 1;
}

OperandForm operand_form(const QuaternionOperand& a, ComponentSum t) {
  const int sp = conjugation_sign(a, t.p), sq = conjugation_sign(a, t.q);
  const int sum_sign = t.sign * sp * sq;
  if (t.p < t.q) return {t.p, t.q, sum_sign, sp};
  return {t.q, t.p, sum_sign, t.sign * sq};
}

// Component c of an operand on samples [n0, n0 + len) if it is batched, whole if it is shared.
at::Tensor component(const QuaternionOperand& a, int c, int64_t n0, int64_t len) {
  return a.batched ? a.components[c].narrow(0, n0, len) : a.components[c];
}

// The operand without its scale: one TensorIterator pass (ATen's vectorised add) reading both
// components once; its output follows the components' memory format (channels_last stays so), or the
// operand's own.
at::Tensor transform(const QuaternionOperand& a, OperandForm f, int64_t n0, int64_t len) {
  const at::Tensor x = component(a, f.p, n0, len), y = component(a, f.q, n0, len);
  if (a.memory_format == at::MemoryFormat::Preserve) return at::add(x, y, f.sum_sign);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(a.memory_format));
  return at::add_out(out, x, y, f.sum_sign);
}

template <typename scalar_t>
void transform_pair_kernel(at::TensorIterator& iter) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kSize = sizeof(scalar_t);
  iter.for_each([](char** data, const int64_t* strides, int64_t n, int64_t rows) {
    const bool dense = strides[0] == kSize && strides[1] == kSize && strides[2] == kSize && strides[3] == kSize;
    for (int64_t r = 0; r < rows; ++r) {
      char* p[4];
      for (int t = 0; t < 4; ++t) p[t] = data[t] + r * strides[4 + t];
      if (dense) {
        auto* plus = reinterpret_cast<scalar_t*>(p[0]);
        auto* minus = reinterpret_cast<scalar_t*>(p[1]);
        const auto* x = reinterpret_cast<const scalar_t*>(p[2]);
        const auto* y = reinterpret_cast<const scalar_t*>(p[3]);
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          const acc_t xi = acc_t(x[i]), yi = acc_t(y[i]);
          plus[i] = static_cast<scalar_t>(xi + yi);
          minus[i] = static_cast<scalar_t>(xi - yi);
        }
      } else {
        for (int64_t i = 0; i < n; ++i) {
          const acc_t xi = acc_t(*reinterpret_cast<const scalar_t*>(p[2] + i * strides[2]));
          const acc_t yi = acc_t(*reinterpret_cast<const scalar_t*>(p[3] + i * strides[3]));
          *reinterpret_cast<scalar_t*>(p[0] + i * strides[0]) = static_cast<scalar_t>(xi + yi);
          *reinterpret_cast<scalar_t*>(p[1] + i * strides[1]) = static_cast<scalar_t>(xi - yi);
        }
      }
    }
  });
}

// (A_p + A_q, A_p - A_q) in one pass that reads each component once, accumulating in opmath. The
// outputs follow the components' memory format, as ATen's add does.
std::array<at::Tensor, 2> transform_pair(const QuaternionOperand& a, int p, int q, int64_t n0, int64_t len) {
  const at::Tensor x = component(a, p, n0, len), y = component(a, q, n0, len);
  at::Tensor plus, minus;  // undefined: the iterator allocates them
  auto iter = at::TensorIteratorConfig().add_output(plus).add_output(minus).add_const_input(x).add_const_input(y).build();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "aqcf_fast8_transform_pair", [&] {
    transform_pair_kernel<scalar_t>(iter);
  });
  return {iter.output(0), iter.output(1)};
}

// The output coefficients: Z_c = sum_m coef[c][m] s_m, i.e. s_c + 1/2 sum_j kOut[c][j] s_{4+j},
// each s_m carrying its operands' scales.
using OutputCoefficients = std::array<std::array<double, 8>, 4>;

OutputCoefficients output_coefficients(const std::array<double, 8>& scale) {
  OutputCoefficients k{};
  for (int c = 0; c < 4; ++c) {
    k[c][c] = scale[c];
    for (int j = 0; j < 4; ++j) k[c][4 + j] = 0.5 * kOut[c][j] * scale[4 + j];
  }
  return k;
}

// The innermost loop, written so the compiler vectorises it: reads the 8 products once and writes
// the 4 outputs. `addend_at(c, i)` is 0, a per-row constant (a bias in a channels-first layout) or
// a per-element load (a bias in channels_last, or the output itself when accumulating); the
// activation K is applied to the sum before the store.
template <typename scalar_t, Act K, typename acc_t, typename AddendAt>
inline void combine_row(int64_t n, char* const* p, const acc_t (&k)[4][5], acc_t slope, AddendAt addend_at) {
  scalar_t* o[4];
  const scalar_t* s[8];
  for (int c = 0; c < 4; ++c) o[c] = reinterpret_cast<scalar_t*>(p[c]);
  for (int m = 0; m < 8; ++m) s[m] = reinterpret_cast<const scalar_t*>(p[4 + m]);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const acc_t s4 = acc_t(s[4][i]), s5 = acc_t(s[5][i]), s6 = acc_t(s[6][i]), s7 = acc_t(s[7][i]);
    for (int c = 0; c < 4; ++c) {
      const acc_t v = k[c][0] * acc_t(s[c][i]) + k[c][1] * s4 + k[c][2] * s5 + k[c][3] * s6 + k[c][4] * s7;
      o[c][i] = static_cast<scalar_t>(activate<acc_t, K>(v + addend_at(c, i), slope));
    }
  }
}

template <typename scalar_t, Act K>
void combine_kernel(at::TensorIterator& iter, const OutputCoefficients& coef, bool has_addend, double negative_slope) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t k[4][5];
  for (int c = 0; c < 4; ++c) {
    k[c][0] = acc_t(coef[c][c]);
    for (int j = 0; j < 4; ++j) k[c][1 + j] = acc_t(coef[c][4 + j]);
  }
  const acc_t slope = acc_t(negative_slope);
  constexpr int64_t kSize = sizeof(scalar_t);
  const int nt = iter.ntensors();
  iter.for_each([&](char** data, const int64_t* strides, int64_t n, int64_t rows) {
    bool dense = true;  // every output and product walks its row contiguously
    for (int t = 0; t < 12; ++t) dense = dense && strides[t] == kSize;
    bool addend_constant = has_addend, addend_dense = has_addend;  // the same for the four addends
    for (int t = 12; t < nt; ++t) {
      addend_constant = addend_constant && strides[t] == 0;
      addend_dense = addend_dense && strides[t] == kSize;
    }
    char* p[16];
    for (int64_t r = 0; r < rows; ++r) {
      for (int t = 0; t < nt; ++t) p[t] = data[t] + r * strides[nt + t];
      auto addend = [&](int c) { return reinterpret_cast<const scalar_t*>(p[12 + c]); };
      if (dense && !has_addend) {
        combine_row<scalar_t, K>(n, p, k, slope, [](int, int64_t) { return acc_t(0); });
      } else if (dense && addend_constant) {
        const acc_t b[4] = {acc_t(*addend(0)), acc_t(*addend(1)), acc_t(*addend(2)), acc_t(*addend(3))};
        combine_row<scalar_t, K>(n, p, k, slope, [&b](int c, int64_t) { return b[c]; });
      } else if (dense && addend_dense) {
        const scalar_t* b[4] = {addend(0), addend(1), addend(2), addend(3)};
        combine_row<scalar_t, K>(n, p, k, slope, [&b](int c, int64_t i) { return acc_t(b[c][i]); });
      } else {  // mismatched layouts (e.g. a product that ignored channels_last): any strides
        for (int64_t i = 0; i < n; ++i) {
          auto in = [&](int t) { return acc_t(*reinterpret_cast<const scalar_t*>(p[t] + i * strides[t])); };
          for (int c = 0; c < 4; ++c) {
            acc_t v = k[c][0] * in(4 + c);
            for (int j = 0; j < 4; ++j) v += k[c][1 + j] * in(8 + j);
            if (has_addend) v += in(12 + c);
            *reinterpret_cast<scalar_t*>(p[c] + i * strides[c]) = static_cast<scalar_t>(activate<acc_t, K>(v, slope));
          }
        }
      }
    }
  });
}

// out[c] = act(sum_m coef[c][m] s[m] (+ addend[c])) for the four c in ONE pass over the 8 products
// (writing each output from its own 5 would read s_4..s_7 four times), accumulating in opmath
// (float for bf16/fp16), so low-precision outputs are rounded once. The addends are all defined or
// none.
void combine(
    const std::array<at::Tensor, 4>& out,
    const std::array<at::Tensor, 8>& s,
    const OutputCoefficients& coef,
    const std::array<at::Tensor, 4>& addend,
    const Activation& act) {
  const bool has_addend = addend[0].defined();
  for (const auto& a : addend) TORCH_INTERNAL_ASSERT(a.defined() == has_addend, "fast8: addends all or none");
  at::TensorIteratorConfig config;
  for (const auto& o : out) config.add_output(o);
  for (const auto& t : s) config.add_const_input(t);
  if (has_addend)  // `out` itself is fine: same element in and out
    for (const auto& a : addend) config.add_const_input(a);
  // The outputs are views into the blocked output (or the weight gradient): never resized. They
  // are disjoint blocks of one tensor, interleaved in channels_last, which the overlap check
  // cannot tell from a partial overlap.
  auto iter = config.resize_outputs(false).set_check_mem_overlap(false).build();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out[0].scalar_type(), "aqcf_fast8_combine", [&] {
    with_activation(act.kind, [&](auto a) {
      combine_kernel<scalar_t, decltype(a)::value>(iter, coef, has_addend, act.negative_slope);
    });
  });
}

// pairs[k] = {the product reading A_p + A_q, the one reading A_p - A_q} for one component pair
// (p, q) of an operand: each table's 8 sums are 4 such pairs.
using Pairs = std::array<std::array<int, 2>, 4>;

Pairs pair_up(const std::array<OperandForm, 8>& form) {
  Pairs pairs;
  int n = 0;
  for (int m = 0; m < 8; ++m) {
    if (form[m].sum_sign < 0) continue;
    for (int k = 0; k < 8; ++k) {
      if (form[k].sum_sign < 0 && form[k].p == form[m].p && form[k].q == form[m].q) {
        TORCH_INTERNAL_ASSERT(n < 4, "fast8: an operand table does not pair up");
        pairs[n++] = {m, k};
      }
    }
  }
  TORCH_INTERNAL_ASSERT(n == 4, "fast8: an operand table does not pair up");
  return pairs;
}

// The products linked by any of `linking`'s pairs, as groups (connected components), largest first.
std::vector<std::vector<int>> linked_groups(const std::vector<Pairs>& linking) {
  std::array<int, 8> root;
  for (int m = 0; m < 8; ++m) root[m] = m;
  auto find = [&](int m) {
    while (root[m] != m) m = root[m];
    return m;
  };
  for (const Pairs& pairs : linking)
    for (const auto& pair : pairs) root[find(pair[1])] = find(pair[0]);
  std::vector<std::vector<int>> groups;
  for (int m = 0; m < 8; ++m) {
    auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return find(g[0]) == find(m); });
    if (it == groups.end()) groups.push_back({m});
    else it->push_back(m);
  }
  std::stable_sort(groups.begin(), groups.end(), [](const auto& a, const auto& b) { return a.size() > b.size(); });
  return groups;
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
  TORCH_CHECK(left.batched || right.batched, "fast8_hamilton_product: one operand must be batched");
  const int64_t slices = (batch.batch + batch.slice - 1) / batch.slice;
  auto slice_start = [&](int64_t s) { return s * batch.slice; };
  auto slice_len = [&](int64_t s) { return std::min(batch.slice, batch.batch - s * batch.slice); };
  std::array<OperandForm, 8> left_form, right_form;
  std::array<double, 8> scale{};
  for (int m = 0; m < 8; ++m) {
    left_form[m] = operand_form(left, kLeft[m]);
    right_form[m] = operand_form(right, kRight[m]);
    scale[m] = left_form[m].scale * right_form[m].scale;
  }
  const OutputCoefficients coef = output_coefficients(scale);
  // A shared operand (the weight) is transformed once for every slice; a batched one per item, in
  // pairs A_p ± A_q formed in one pass each, right before the products read them. An item computes
  // one group of products: the products whose batched operands' pairs link them. One batched
  // operand (a conv, its input gradient) gives 4 groups of 2; two (a weight gradient: both tables'
  // pairs) give {0, 1, 2, 3}, {4, 5}, {6, 7}.
  std::array<at::Tensor, 8> left_shared, right_shared;
  for (int m = 0; m < 8; ++m) {
    if (!left.batched) left_shared[m] = transform(left, left_form[m], 0, 0);
    if (!right.batched) right_shared[m] = transform(right, right_form[m], 0, 0);
  }
  const Pairs left_pairs = pair_up(left_form), right_pairs = pair_up(right_form);
  std::vector<std::vector<int>> groups;
  {
    std::vector<Pairs> linking;
    if (left.batched) linking.push_back(left_pairs);
    if (right.batched) linking.push_back(right_pairs);
    groups = linked_groups(linking);
  }
  // Group g's products on slice s, at their indices m (the other entries undefined). A batched
  // operand's pair is formed when the first of its two products needs it, and each operand is
  // dropped right after its product: every operand is read by one product only. The next product is
  // the one needing the fewest new pairs, so a weight gradient's group {0, 1, 2, 3} holds 4
  // operands at most rather than all 8.
  auto group_products = [&](const std::vector<int>& group, int64_t s) {
    const int64_t n0 = slice_start(s), len = slice_len(s);
    std::array<at::Tensor, 8> left_op, right_op;
    auto missing = [&](int m) { return int(left.batched && !left_op[m].defined()) + int(right.batched && !right_op[m].defined()); };
    auto form_pair = [&](const QuaternionOperand& a, const std::array<OperandForm, 8>& form, const Pairs& pairs,
                         std::array<at::Tensor, 8>& op, int m) {
      if (!a.batched || op[m].defined()) return;
      for (const auto& pair : pairs) {
        if (pair[0] != m && pair[1] != m) continue;
        const std::array<at::Tensor, 2> both = transform_pair(a, form[pair[0]].p, form[pair[0]].q, n0, len);
        op[pair[0]] = both[0];
        op[pair[1]] = both[1];
        return;
      }
    };
    std::array<at::Tensor, 8> result;
    std::vector<int> todo = group;
    while (!todo.empty()) {
      auto next = std::min_element(todo.begin(), todo.end(), [&](int a, int b) { return missing(a) < missing(b); });
      const int m = *next;
      todo.erase(next);
      form_pair(left, left_form, left_pairs, left_op, m);
      form_pair(right, right_form, right_pairs, right_op, m);
      result[m] = product(left.batched ? left_op[m] : left_shared[m], right.batched ? right_op[m] : right_shared[m]);
      left_op[m] = right_op[m] = at::Tensor();
    }
    return result;
  };
  const int64_t n_groups = static_cast<int64_t>(groups.size());

  if (out_batched) {
    // Items (slice, group), slice-major, so only ~threads + 1 slices are in flight; whoever
    // finishes a slice's last group writes that slice's output while it is still in cache.
    std::vector<std::array<at::Tensor, 8>> products(slices);
    std::unique_ptr<std::atomic<int>[]> pending(new std::atomic<int>[slices]);
    for (int64_t s = 0; s < slices; ++s) pending[s].store(int(n_groups));
    parallel_items(n_groups * slices, [&](int64_t i) {
      const int64_t s = i / n_groups;
      const std::vector<int>& group = groups[i % n_groups];
      const std::array<at::Tensor, 8> computed = group_products(group, s);
      for (int m : group) products[s][m] = computed[m];
      if (pending[s].fetch_sub(1, std::memory_order_acq_rel) != 1) return;
      std::array<at::Tensor, 4> out_s;
      for (int c = 0; c < 4; ++c) out_s[c] = out[c].narrow(0, slice_start(s), slice_len(s));
      combine(out_s, products[s], coef, addend, act);
      products[s] = {};
    });
    return;
  }
  // Shared output: the slices are cut into one contiguous run per thread, and item (run, group)
  // sums its run's products in order; runs are then added in order, so the sum does not depend on
  // which thread took which item.
  const int64_t runs = std::min<int64_t>(slices, std::max(1, at::get_num_threads()));
  std::vector<std::array<at::Tensor, 8>> sums(runs);
  parallel_items(n_groups * runs, [&](int64_t i) {
    const int64_t run = i / n_groups;
    const std::vector<int>& group = groups[i % n_groups];
    for (int64_t s = run * slices / runs; s < (run + 1) * slices / runs; ++s) {
      std::array<at::Tensor, 8> computed = group_products(group, s);
      for (int m : group) {
        at::Tensor& sum = sums[run][m];
        sum = sum.defined() ? sum.add_(computed[m]) : std::move(computed[m]);
      }
    }
  });
  for (int64_t run = 1; run < runs; ++run)
    for (int m = 0; m < 8; ++m) sums[0][m].add_(sums[run][m]);
  combine(out, sums[0], coef, {}, act);
}

void fast8_hamilton_product_in_sequence(
    const QuaternionOperand& left,
    const QuaternionOperand& right,
    BilinearProduct product,
    const std::array<at::Tensor, 4>& out,
    const std::array<at::Tensor, 4>& addend,
    const Activation& act) {
  auto whole = [](const QuaternionOperand& a, OperandForm f) {
    return transform(a, f, 0, a.batched ? a.components[f.p].size(0) : 0);
  };
  std::array<at::Tensor, 8> s;
  std::array<double, 8> scale{};
  for (int m = 0; m < 8; ++m) {
    const OperandForm l = operand_form(left, kLeft[m]), r = operand_form(right, kRight[m]);
    s[m] = product(whole(left, l), whole(right, r));
    scale[m] = l.scale * r.scale;
  }
  const OutputCoefficients coef = output_coefficients(scale);
  const at::ScalarType acc = at::toOpMathType(out[0].scalar_type());
  for (int c = 0; c < 4; ++c) {
    at::Tensor z = s[c].to(acc).mul(coef[c][c]);
    for (int j = 4; j < 8; ++j) z.add_(s[j].to(acc), coef[c][j]);
    if (addend[c].defined()) z.add_(addend[c]);
    activate_(z, act);
    out[c].copy_(z);
  }
}

}  // namespace aqcf
