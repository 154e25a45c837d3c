#include "norm.h"

#include "activation.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace aqcf {
namespace {

using at::Tensor;

// (Every parallel lambda below takes `slope` by value: captured by reference it was reloaded per
// element in the OpenMP-outlined loops and blocked their vectorisation: leaky_relu's backward ran 9x
// slower on 2 threads than on 1.)
// Plain scalar loops the compiler vectorises (-O3, `omp simd`) for whatever the extension is built for.
// ATen's Vectorized<T> emulates its vectors element by element in an extension built without ATen's
// CPU_CAPABILITY flags (this pass ran ~5x slower than the composite norm with it); the activation's
// per-value form is activation.h's.

Act norm_activation(const NormOptions& o) {
  return parse_activation(o.activation ? std::optional<std::string_view>(*o.activation) : std::nullopt, o.negative_slope).kind;
}

// The input as (N, C, S), S the flattened spatial dims, in one of two layouts: planes (each (n, c)
// contiguous over S: NCHW) or rows (each (n, s) contiguous over C: channels_last).
struct Layout {
  int64_t N, C, S;
  bool rows;
};

Tensor in_supported_layout(const Tensor& x) {
  const at::MemoryFormat format = x.suggest_memory_format();
  if ((x.dim() == 4 || x.dim() == 5) && format != at::MemoryFormat::Contiguous && x.is_contiguous(format)) return x;
  return x.contiguous();
}

Layout layout_of(const Tensor& x) {
  const int64_t n = x.size(0), c = x.size(1);
  return {n, c, n * c == 0 ? 0 : x.numel() / (n * c), !x.is_contiguous()};
}

constexpr int64_t kChunk = 1024;  // elements summed in T before the sum joins a double accumulator

// Per-(g, c) coefficient tables, G = N (instance norm) or 1 (batch norm).
template <typename T>
struct Tables {
  const T* shift;  // μ
  const T* scale;  // γ r
  const T* beta;   // β (C entries)
  int64_t C;
  bool per_sample;
  int64_t row(int64_t n) const { return per_sample ? n * C : 0; }
};

int64_t row_grain(int64_t C) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)); }

// Count, mean and M2 = Σ (x − mean)² of a run of values, combined by Chan et al.'s formula.
struct Moments {
  double n = 0, mean = 0, m2 = 0;
  void add(double count, double chunk_mean, double chunk_m2) {
    if (count == 0) return;
    const double total = n + count, delta = chunk_mean - mean;
    mean += delta * count / total;
    m2 += chunk_m2 + delta * delta * n * count / total;
    n = total;
  }
};

// The shifted, corrected two-pass moments (see plane_moments) of k values: K their shift, m̃ the first
// pass's mean of x − K (rounded), dev and sq the sums of d = x − K − m̃ and of d². Returns (mean, M2).
inline std::pair<double, double> corrected_moments(double k, double shift, double first_mean, double dev, double sq) {
  return {shift + (first_mean + dev / k), sq - dev * dev / k};
}

// Rows s0..s1 of a channels_last block, four at a time, then one at a time: rows(s, R) takes R rows from
// s (R a std::integral_constant). A short row's per-channel accumulators (C = 32 real channels: two AVX-512
// vectors) are so loaded and stored once per four rows, not once per row: an InstanceNorm3d forward,
// 2x32x32³ channels_last, ~11% faster on 2 threads (Intel Xeon, 2026-12-06).
template <typename Rows>
void rows_by_four(int64_t s0, int64_t s1, Rows rows) {
  int64_t s = s0;
  for (; s + 4 <= s1; s += 4) rows(s, std::integral_constant<int, 4>{});
  for (; s < s1; ++s) rows(s, std::integral_constant<int, 1>{});
}

// Mean and biased variance per (n, c): each chunk of a plane is summed twice while it is in cache
// (its mean, then its squares around that mean), and chunks combine exactly: one pass over memory,
// no cancellation when |μ| >> σ. Both sums run on x − K, K the chunk's first value (as the Triton
// kernels do), so that the first one is a sum of O(σ) values, not of values near μ whose running sum
// loses the digits of σ (float32, 1000 values of 3e4: ulp 2). The second is the corrected two-pass
// algorithm (Chan, Golub & LeVeque): it also sums the deviations d from the first sum's mean m̃, whose
// rounding it removes, mean = K + m̃ + Σd / k and M2 = Σd² − (Σd)² / k. Without the two, that rounding
// reached the mean, and through the merge of the chunks the variance, to first order (float32,
// |μ| = 1e4 σ: variance off by 1e-5..4e-4 relative, the output by up to 10x torch.nn's error).
template <typename T>
void plane_moments(const T* x, const Layout& L, double* mean, double* m2) {
  const int64_t C = L.C, S = L.S;
  if (!L.rows) {
    at::parallel_for(0, L.N * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const T* xp = x + p * S;
        Moments m;
        for (int64_t s0 = 0; s0 < S; s0 += kChunk) {
          const int64_t k = std::min(kChunk, S - s0);
          const T shift = xp[s0];
          T sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t s = 0; s < k; ++s) sum += xp[s0 + s] - shift;
          const T cm = sum / T(k);  // the chunk's mean minus its shift
          T sq = 0, dev = 0;
#pragma omp simd reduction(+ : sq, dev)
          for (int64_t s = 0; s < k; ++s) {
            const T d = (xp[s0 + s] - shift) - cm;
            dev += d;
            sq += d * d;
          }
          const auto [chunk_mean, chunk_m2] = corrected_moments(double(k), shift, cm, dev, sq);
          m.add(double(k), chunk_mean, chunk_m2);
        }
        mean[p] = m.mean;
        m2[p] = m.m2;
      }
    });
    return;
  }
  // Rows: fixed blocks of rows per sample, each block's per-channel moments, combined in block order.
  const int64_t block = std::max<int64_t>(1, std::min<int64_t>(S, 256));
  const int64_t blocks = (S + block - 1) / block;
  std::vector<double> bmean(L.N * blocks * C), bm2(L.N * blocks * C);
  at::parallel_for(0, L.N * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> sum(C), sq(C), dev(C);
    for (int64_t q = begin; q < end; ++q) {
      const int64_t n = q / blocks, s0 = (q % blocks) * block, s1 = std::min(S, s0 + block);
      const T count = T(s1 - s0);
      std::fill(sum.begin(), sum.end(), T(0));
      std::fill(sq.begin(), sq.end(), T(0));
      std::fill(dev.begin(), dev.end(), T(0));
      T *su = sum.data(), *sqp = sq.data(), *dv = dev.data();
      const T* shift = x + (n * S + s0) * C;  // the block's first row
      rows_by_four(s0, s1, [&](int64_t s, auto rows) {
        const T* xs = x + (n * S + s) * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          T acc = 0;
          for (int i = 0; i < decltype(rows)::value; ++i) acc += xs[i * C + c] - shift[c];
          su[c] += acc;
        }
      });
      for (int64_t c = 0; c < C; ++c) su[c] /= count;
      rows_by_four(s0, s1, [&](int64_t s, auto rows) {
        const T* xs = x + (n * S + s) * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          T acc_d = 0, acc_sq = 0;
          for (int i = 0; i < decltype(rows)::value; ++i) {
            const T d = (xs[i * C + c] - shift[c]) - su[c];
            acc_d += d;
            acc_sq += d * d;
          }
          dv[c] += acc_d;
          sqp[c] += acc_sq;
        }
      });
      for (int64_t c = 0; c < C; ++c) {
        std::tie(bmean[q * C + c], bm2[q * C + c]) = corrected_moments(count, shift[c], su[c], dv[c], sqp[c]);
      }
    }
  });
  for (int64_t n = 0; n < L.N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      Moments m;
      for (int64_t k = 0; k < blocks; ++k) {
        const int64_t q = n * blocks + k;
        m.add(double(std::min(S, (k + 1) * block) - k * block), bmean[q * C + c], bm2[q * C + c]);
      }
      mean[n * C + c] = m.mean;
      m2[n * C + c] = m.m2;
    }
  }
}

template <typename T, Act A>
void normalize(const T* x, T* y, const Layout& L, const Tables<T>& t, T slope) {
  const int64_t C = L.C, S = L.S;
  if (!L.rows) {
    at::parallel_for(0, L.N * C, 1, [&, slope](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t n = p / C, c = p % C, g = t.row(n) + c;
        const T* xp = x + p * S;
        T* yp = y + p * S;
        const T sh = t.shift[g], sc = t.scale[g], b = t.beta[c];
#pragma omp simd
        for (int64_t s = 0; s < S; ++s) yp[s] = activate<T, A>((xp[s] - sh) * sc + b, slope);
      }
    });
    return;
  }
  at::parallel_for(0, L.N * S, row_grain(C), [&, slope](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t g = t.row(r / S);
      const T* xp = x + r * C;
      T* yp = y + r * C;
      const T *sh = t.shift + g, *sc = t.scale + g, *b = t.beta;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) yp[c] = activate<T, A>((xp[c] - sh[c]) * sc[c] + b[c], slope);
    }
  });
}

// Σ gz and Σ gz·(x − μ) per (n, c), gz = dL/dz; summed over s only (the caller sums over n).
template <typename T, Act A>
void channel_sums(const T* gy, const T* x, const Layout& L, const Tables<T>& t, const T slope, double* sum_gz,
                  double* sum_gzx) {
  const int64_t C = L.C, S = L.S;
  if (!L.rows) {
    at::parallel_for(0, L.N * C, 1, [&, slope](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t n = p / C, c = p % C, g = t.row(n) + c;
        const T* xp = x + p * S;
        const T* gp = gy + p * S;
        const T sh = t.shift[g], sc = t.scale[g], b = t.beta[c];
        double total_gz = 0, total_gzx = 0;
        for (int64_t s0 = 0; s0 < S; s0 += kChunk) {
          const int64_t s1 = std::min(S, s0 + kChunk);
          T acc_gz = 0, acc_gzx = 0;
#pragma omp simd reduction(+ : acc_gz, acc_gzx)
          for (int64_t s = s0; s < s1; ++s) {
            const T xc = xp[s] - sh;
            const T gz = activation_grad<T, A>(xc * sc + b, gp[s], slope);
            acc_gz += gz;
            acc_gzx += gz * xc;
          }
          total_gz += acc_gz;
          total_gzx += acc_gzx;
        }
        sum_gz[p] = total_gz;
        sum_gzx[p] = total_gzx;
      }
    });
    return;
  }
  // Rows: fixed blocks of rows (independent of the thread count: the sums are deterministic), each
  // with its own partial sums per channel, added in block order.
  const int64_t block = std::max<int64_t>(1, std::min<int64_t>(S, 256));
  const int64_t blocks = (S + block - 1) / block;
  std::vector<double> part_gz(L.N * blocks * C), part_gzx(L.N * blocks * C);
  at::parallel_for(0, L.N * blocks, 1, [&, slope](int64_t begin, int64_t end) {
    std::vector<T> acc_gz(C), acc_gzx(C);
    for (int64_t q = begin; q < end; ++q) {
      const int64_t n = q / blocks, s0 = (q % blocks) * block, s1 = std::min(S, s0 + block), g = t.row(n);
      std::fill(acc_gz.begin(), acc_gz.end(), T(0));
      std::fill(acc_gzx.begin(), acc_gzx.end(), T(0));
      const T *sh = t.shift + g, *sc = t.scale + g, *b = t.beta;
      T *agz = acc_gz.data(), *agzx = acc_gzx.data();
      for (int64_t s = s0; s < s1; ++s) {
        const T* xp = x + (n * S + s) * C;
        const T* gp = gy + (n * S + s) * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const T xc = xp[c] - sh[c];
          const T gz = activation_grad<T, A>(xc * sc[c] + b[c], gp[c], slope);
          agz[c] += gz;
          agzx[c] += gz * xc;
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        part_gz[q * C + c] = acc_gz[c];
        part_gzx[q * C + c] = acc_gzx[c];
      }
    }
  });
  for (int64_t n = 0; n < L.N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      double a = 0, b = 0;
      for (int64_t k = 0; k < blocks; ++k) {
        a += part_gz[(n * blocks + k) * C + c];
        b += part_gzx[(n * blocks + k) * C + c];
      }
      sum_gz[n * C + c] = a;
      sum_gzx[n * C + c] = b;
    }
  }
}

// dx = A·gz + B·(x − μ) + D per (g, c) (B = D = 0 with running statistics).
template <typename T, Act A>
void input_grad(const T* gy, const T* x, T* dx, const Layout& L, const Tables<T>& fwd, const T* coef_a,
                const T* coef_b, const T* coef_d, T slope) {
  const int64_t C = L.C, S = L.S;
  if (!L.rows) {
    at::parallel_for(0, L.N * C, 1, [&, slope](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t n = p / C, c = p % C, g = fwd.row(n) + c;
        const T* xp = x + p * S;
        const T* gp = gy + p * S;
        T* dp = dx + p * S;
        const T sh = fwd.shift[g], sc = fwd.scale[g], b = fwd.beta[c], ca = coef_a[g], cb = coef_b[g], cd = coef_d[g];
#pragma omp simd
        for (int64_t s = 0; s < S; ++s) {
          const T xc = xp[s] - sh;
          dp[s] = ca * activation_grad<T, A>(xc * sc + b, gp[s], slope) + cb * xc + cd;
        }
      }
    });
    return;
  }
  at::parallel_for(0, L.N * S, row_grain(C), [&, slope](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t g = fwd.row(r / S);
      const T* xp = x + r * C;
      const T* gp = gy + r * C;
      T* dp = dx + r * C;
      const T *sh = fwd.shift + g, *sc = fwd.scale + g, *b = fwd.beta;
      const T *ca = coef_a + g, *cb = coef_b + g, *cd = coef_d + g;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T xc = xp[c] - sh[c];
        dp[c] = ca[c] * activation_grad<T, A>(xc * sc[c] + b[c], gp[c], slope) + cb[c] * xc + cd[c];
      }
    }
  });
}


// The per-channel arithmetic between the passes runs on plain vectors of doubles: a few dozen numbers,
// where each ATen op on them cost ~1 µs of dispatch and allocation (some 30 ops had been most of a small
// norm's time: a 1x8x32² fwd+bwd took 78 µs against a few µs of passes over the data).

// t's values (any floating dtype) as doubles, in its row-major order.
std::vector<double> doubles(const Tensor& t) {
  const Tensor c = t.contiguous();
  std::vector<double> out(c.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "qnorm_doubles", [&] {
    const scalar_t* p = c.data_ptr<scalar_t>();
    for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<double>(p[i]);
  });
  return out;
}

// A tensor of `sizes` and opt's dtype holding v (rounded to the dtype).
Tensor tensor_of(const std::vector<double>& v, at::IntArrayRef sizes, const at::TensorOptions& opt) {
  Tensor t = at::empty(sizes, opt);
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "qnorm_tensor_of", [&] {
    scalar_t* p = t.data_ptr<scalar_t>();
    for (size_t i = 0; i < v.size(); ++i) p[i] = static_cast<scalar_t>(v[i]);
  });
  return t;
}

template <typename T>
std::vector<T> cast(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}

// The forward's per-(g, c) tables: μ (G, C), γ r (G, C) and β (C); r = 1/sqrt(σ² + eps) per (g, q).
struct ForwardTables {
  std::vector<double> shift, scale, beta;
  std::vector<double> r;  // (G, Cq), without γ
};

ForwardTables forward_tables(const std::vector<double>& mean, const std::vector<double>& var,
                             const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, int64_t cq,
                             double eps) {
  const int64_t groups = static_cast<int64_t>(var.size()) / cq, C = 4 * cq;
  const std::vector<double> gamma = (weight && weight->defined()) ? doubles(*weight) : std::vector<double>(cq, 1.0);
  ForwardTables t;
  t.shift = mean;
  t.r.resize(var.size());
  t.scale.resize(groups * C);
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t q = 0; q < cq; ++q) {
      const double r = 1.0 / std::sqrt(var[g * cq + q] + eps);
      t.r[g * cq + q] = r;
      for (int64_t a = 0; a < 4; ++a) t.scale[g * C + a * cq + q] = r * gamma[q];
    }
  }
  t.beta = (bias && bias->defined()) ? doubles(*bias) : std::vector<double>(C, 0.0);
  return t;
}

// The tables in the kernels' type T (they live as long as the vectors).
template <typename T>
struct TypedTables {
  std::vector<T> shift, scale, beta;
  TypedTables(const ForwardTables& t) : shift(cast<T>(t.shift)), scale(cast<T>(t.scale)), beta(cast<T>(t.beta)) {}
  Tables<T> view(int64_t C, bool per_sample) const { return {shift.data(), scale.data(), beta.data(), C, per_sample}; }
};

void check_input(const Tensor& input, const char* fn) {
  TORCH_CHECK(input.device().is_cpu(), "aqcf_kernels._C.", fn, ": expects CPU tensors");
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "aqcf_kernels._C.", fn, ": float32 or float64 only, got ", input.scalar_type());
  TORCH_CHECK(input.dim() >= 2 && input.size(1) % 4 == 0, "aqcf_kernels._C.", fn,
              ": input must be (N, 4Cq, *spatial), got ", input.sizes());
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> qnorm_forward(
    const Tensor& input_, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var, const NormOptions& o) {
  check_input(input_, "qnorm_forward");
  const Tensor input = in_supported_layout(input_);
  const Layout L = layout_of(input);
  const int64_t C = L.C, cq = C / 4;
  int64_t groups = 1;
  std::vector<double> mean, var;  // (G, C) and (G, Cq)
  if (o.use_input_stats) {
    // One pass over memory for the moments of every (n, c); then per statistic group (n or batch).
    std::vector<double> plane_mean(L.N * C), plane_m2(L.N * C);
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "qnorm_moments", [&] {
      plane_moments<scalar_t>(input.data_ptr<scalar_t>(), L, plane_mean.data(), plane_m2.data());
    });
    std::vector<double> channel_var(L.N * C);
    if (o.per_sample) {
      groups = L.N;
      mean = plane_mean;
      for (int64_t p = 0; p < L.N * C; ++p) channel_var[p] = plane_m2[p] / double(L.S);
    } else {  // equal counts per plane: the pooled mean, and M2 plus the spread of the plane means
      mean.assign(C, 0.0);
      for (int64_t c = 0; c < C; ++c) {
        double sum = 0, m2 = 0, spread = 0;
        for (int64_t n = 0; n < L.N; ++n) sum += plane_mean[n * C + c];
        mean[c] = sum / double(L.N);
        for (int64_t n = 0; n < L.N; ++n) {
          const double d = plane_mean[n * C + c] - mean[c];
          m2 += plane_m2[n * C + c];
          spread += d * d;
        }
        channel_var[c] = (m2 + spread * double(L.S)) / double(L.N * L.S);
      }
    }
    var.assign(groups * cq, 0.0);  // the shared variance E|x − μ|²
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t a = 0; a < 4; ++a)
        for (int64_t q = 0; q < cq; ++q) var[g * cq + q] += channel_var[g * C + a * cq + q];
  } else {
    TORCH_CHECK(running_mean && running_var, "aqcf_kernels._C.qnorm_forward: running statistics required");
    mean = doubles(*running_mean);
    var = doubles(*running_var);
  }
  // What is returned is in the input's dtype, and the tables are made from exactly that (the backward
  // makes them again from the returned tensors).
  const Tensor mean_out = tensor_of(mean, {groups, C}, input.options());
  const Tensor var_out = tensor_of(var, {groups, cq}, input.options());
  const ForwardTables t = forward_tables(doubles(mean_out), doubles(var_out), weight, bias, cq, o.eps);
  Tensor y = at::empty_like(input);
  with_activation(norm_activation(o), [&](auto act) {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "qnorm_forward", [&] {
      const TypedTables<scalar_t> tab(t);
      normalize<scalar_t, decltype(act)::value>(input.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), L,
                                               tab.view(C, groups > 1), static_cast<scalar_t>(o.negative_slope));
    });
  });
  return {y, mean_out, var_out};
}

std::tuple<Tensor, Tensor, Tensor> qnorm_backward(
    const Tensor& grad_output, const Tensor& input_, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const Tensor& mean, const Tensor& var, const NormOptions& o,
    std::array<bool, 3> mask) {
  check_input(input_, "qnorm_backward");
  const Tensor input = in_supported_layout(input_);
  // grad_output in the input's layout (a copy only when it arrives in another one).
  const Tensor gy = grad_output.contiguous(input.is_contiguous() ? at::MemoryFormat::Contiguous : input.suggest_memory_format());
  const Layout L = layout_of(input);
  const int64_t C = L.C, cq = C / 4, groups = mean.size(0);
  const bool per_sample = groups > 1;  // per-sample tables (instance norm in training, N > 1)
  const ForwardTables t = forward_tables(doubles(mean), doubles(var), weight, bias, cq, o.eps);
  const Act act = norm_activation(o);

  // Pass 1: Σ gz and Σ gz (x − μ) per (n, c), then per statistic group.
  std::vector<double> sum_gz(L.N * C), sum_gzx(L.N * C);
  with_activation(act, [&](auto a) {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "qnorm_backward_sums", [&] {
      const TypedTables<scalar_t> tab(t);
      channel_sums<scalar_t, decltype(a)::value>(gy.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(), L,
                                                 tab.view(C, per_sample), static_cast<scalar_t>(o.negative_slope),
                                                 sum_gz.data(), sum_gzx.data());
    });
  });
  if (!per_sample) {
    for (int64_t n = 1; n < L.N; ++n) {
      for (int64_t c = 0; c < C; ++c) {
        sum_gz[c] += sum_gz[n * C + c];
        sum_gzx[c] += sum_gzx[n * C + c];
      }
    }
    sum_gz.resize(C);
    sum_gzx.resize(C);
  }
  const std::vector<double> gamma = (weight && weight->defined()) ? doubles(*weight) : std::vector<double>(cq, 1.0);
  std::vector<double> xhat_sum(groups * cq, 0.0);  // Σ_{a,s} gz · x̂, (G, Cq)
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t q = 0; q < cq; ++q) {
      double sum = 0;
      for (int64_t a = 0; a < 4; ++a) sum += sum_gzx[g * C + a * cq + q];
      xhat_sum[g * cq + q] = sum * t.r[g * cq + q];
    }
  }

  Tensor grad_input, grad_weight, grad_bias;
  const at::TensorOptions opt = input.options();
  if (mask[1] && weight && weight->defined()) {
    std::vector<double> gw(cq, 0.0);
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t q = 0; q < cq; ++q) gw[q] += xhat_sum[g * cq + q];
    grad_weight = tensor_of(gw, {cq}, opt);
  }
  if (mask[2] && bias && bias->defined()) {
    std::vector<double> gb(C, 0.0);
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t c = 0; c < C; ++c) gb[c] += sum_gz[g * C + c];
    grad_bias = tensor_of(gb, {C}, opt);
  }
  if (mask[0]) {
    // dx = A·gz + B·(x − μ) + D per (g, c): A = γ r, and in training B = −A r Σ gz x̂ / count and
    // D = −A Σ gz / count (the statistics' dependence on x); 0 with running statistics.
    const double count = static_cast<double>(o.per_sample ? L.S : L.N * L.S);
    std::vector<double> coef_a(groups * C), coef_b(groups * C, 0.0), coef_d(groups * C, 0.0);
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t q = 0; q < cq; ++q) {
        const double r = t.r[g * cq + q], ca = gamma[q] * r;
        const double cb = o.use_input_stats ? -ca * r * xhat_sum[g * cq + q] / count : 0.0;
        for (int64_t a = 0; a < 4; ++a) {
          const int64_t i = g * C + a * cq + q;
          coef_a[i] = ca;
          coef_b[i] = cb;
          if (o.use_input_stats) coef_d[i] = -(ca * sum_gz[i]) / count;
        }
      }
    }
    grad_input = at::empty_like(input);
    with_activation(act, [&](auto a) {
      AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "qnorm_backward_input", [&] {
        const TypedTables<scalar_t> tab(t);
        const std::vector<scalar_t> ca = cast<scalar_t>(coef_a), cb = cast<scalar_t>(coef_b), cd = cast<scalar_t>(coef_d);
        input_grad<scalar_t, decltype(a)::value>(
            gy.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(), grad_input.data_ptr<scalar_t>(), L,
            tab.view(C, per_sample), ca.data(), cb.data(), cd.data(), static_cast<scalar_t>(o.negative_slope));
      });
    });
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace aqcf
