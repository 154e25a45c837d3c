#include "norm.h"

#include "activation.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
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

// Mean and biased variance per (n, c): each chunk of a plane is summed twice while it is in cache
// (its mean, then its squares around that mean), and chunks combine exactly: one pass over memory,
// no cancellation when |μ| >> σ.
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
          T sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t s = 0; s < k; ++s) sum += xp[s0 + s];
          const T cm = sum / T(k);
          T sq = 0;
#pragma omp simd reduction(+ : sq)
          for (int64_t s = 0; s < k; ++s) sq += (xp[s0 + s] - cm) * (xp[s0 + s] - cm);
          m.add(double(k), double(cm), double(sq));
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
    std::vector<T> sum(C), sq(C);
    for (int64_t q = begin; q < end; ++q) {
      const int64_t n = q / blocks, s0 = (q % blocks) * block, s1 = std::min(S, s0 + block);
      const T count = T(s1 - s0);
      std::fill(sum.begin(), sum.end(), T(0));
      std::fill(sq.begin(), sq.end(), T(0));
      for (int64_t s = s0; s < s1; ++s) {
        const T* xp = x + (n * S + s) * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) sum[c] += xp[c];
      }
      for (int64_t c = 0; c < C; ++c) sum[c] /= count;
      for (int64_t s = s0; s < s1; ++s) {
        const T* xp = x + (n * S + s) * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) sq[c] += (xp[c] - sum[c]) * (xp[c] - sum[c]);
      }
      for (int64_t c = 0; c < C; ++c) {
        bmean[q * C + c] = sum[c];
        bm2[q * C + c] = sq[c];
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


// The forward's per-(g, c) tables: μ (G, C), γ r (G, C) and β (C), in the input's dtype.
struct ForwardTables {
  Tensor shift, scale, beta;
};

ForwardTables forward_tables(const Tensor& mean, const Tensor& var, const std::optional<Tensor>& weight,
                             const std::optional<Tensor>& bias, int64_t cq, double eps, const at::TensorOptions& opt) {
  const int64_t g = mean.size(0);
  Tensor r = (var.to(at::kDouble) + eps).rsqrt();  // (G, Cq)
  if (weight && weight->defined()) r = r * weight->to(at::kDouble).view({1, cq});
  ForwardTables t;
  t.shift = mean.to(opt.dtype()).contiguous();
  t.scale = r.unsqueeze(1).expand({g, 4, cq}).reshape({g, 4 * cq}).to(opt.dtype()).contiguous();
  t.beta = (bias && bias->defined()) ? bias->to(opt.dtype()).contiguous() : at::zeros({4 * cq}, opt);
  return t;
}

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
  const int64_t cq = L.C / 4;
  Tensor mean, var;
  if (o.use_input_stats) {
    // One pass over memory for the moments of every (n, c); then per statistic group (n or batch).
    Tensor plane_mean = at::empty({L.N, L.C}, input.options().dtype(at::kDouble));
    Tensor plane_m2 = at::empty({L.N, L.C}, input.options().dtype(at::kDouble));
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "qnorm_moments", [&] {
      plane_moments<scalar_t>(input.data_ptr<scalar_t>(), L, plane_mean.data_ptr<double>(), plane_m2.data_ptr<double>());
    });
    if (o.per_sample) {
      mean = plane_mean;
      var = plane_m2 / double(L.S);
    } else {  // equal counts per plane: the pooled mean, and M2 plus the spread of the plane means
      mean = plane_mean.mean(0, /*keepdim=*/true);
      var = (plane_m2.sum(0, true) + (plane_mean - mean).square().sum(0, true) * double(L.S)) / double(L.N * L.S);
    }
    mean = mean.to(input.scalar_type());
    var = var.view({-1, 4, cq}).sum(1).to(input.scalar_type());  // the shared variance E|x − μ|²
  } else {
    TORCH_CHECK(running_mean && running_var, "aqcf_kernels._C.qnorm_forward: running statistics required");
    mean = running_mean->to(input.scalar_type()).reshape({1, L.C}).clone();
    var = running_var->to(input.scalar_type()).reshape({1, cq}).clone();
  }
  const ForwardTables t = forward_tables(mean, var, weight, bias, cq, o.eps, input.options());
  Tensor y = at::empty_like(input);
  with_activation(norm_activation(o), [&](auto act) {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "qnorm_forward", [&] {
      const Tables<scalar_t> tab{t.shift.data_ptr<scalar_t>(), t.scale.data_ptr<scalar_t>(), t.beta.data_ptr<scalar_t>(),
                                 L.C, mean.size(0) > 1};
      normalize<scalar_t, decltype(act)::value>(input.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), L, tab,
                                               static_cast<scalar_t>(o.negative_slope));
    });
  });
  return {y, mean, var};
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
  const int64_t cq = L.C / 4, groups = mean.size(0);
  const bool per_sample = groups > 1;  // per-sample tables (instance norm in training, N > 1)
  const ForwardTables t = forward_tables(mean, var, weight, bias, cq, o.eps, input.options());
  const Act act = norm_activation(o);
  const auto dbl = input.options().dtype(at::kDouble);

  // Pass 1: Σ gz and Σ gz (x − μ) per (n, c), then per statistic group.
  Tensor sum_gz = at::empty({L.N, L.C}, dbl), sum_gzx = at::empty({L.N, L.C}, dbl);
  with_activation(act, [&](auto a) {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "qnorm_backward_sums", [&] {
      const Tables<scalar_t> tab{t.shift.data_ptr<scalar_t>(), t.scale.data_ptr<scalar_t>(), t.beta.data_ptr<scalar_t>(),
                                 L.C, per_sample};
      channel_sums<scalar_t, decltype(a)::value>(gy.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(), L, tab,
                                                 static_cast<scalar_t>(o.negative_slope), sum_gz.data_ptr<double>(),
                                                 sum_gzx.data_ptr<double>());
    });
  });
  if (!per_sample) {
    sum_gz = sum_gz.sum(0, /*keepdim=*/true);
    sum_gzx = sum_gzx.sum(0, /*keepdim=*/true);
  }
  const Tensor r = (var.to(at::kDouble) + o.eps).rsqrt();                 // (G, Cq)
  const Tensor gamma = (weight && weight->defined()) ? weight->to(at::kDouble).view({1, cq}) : at::ones({1, cq}, dbl);
  const Tensor xhat_sum = (sum_gzx.view({groups, 4, cq}).sum(1)) * r;      // Σ_{a,s} gz · x̂, (G, Cq)

  Tensor grad_input, grad_weight, grad_bias;
  if (mask[1] && weight && weight->defined()) grad_weight = xhat_sum.sum(0).to(input.scalar_type());
  if (mask[2] && bias && bias->defined()) grad_bias = sum_gz.sum(0).to(input.scalar_type());
  if (mask[0]) {
    const Tensor coef_a = gamma * r;  // (G, Cq)
    Tensor coef_b = at::zeros_like(coef_a), coef_d = at::zeros({groups, L.C}, dbl);
    if (o.use_input_stats) {
      const double count = static_cast<double>(o.per_sample ? L.S : L.N * L.S);
      coef_b = -coef_a * r * xhat_sum / count;
      coef_d = -(coef_a.unsqueeze(1) * sum_gz.view({groups, 4, cq})).reshape({groups, L.C}) / count;
    }
    auto per_channel = [&](const Tensor& q) {  // (G, Cq) -> (G, C), the input's dtype
      return q.unsqueeze(1).expand({groups, 4, cq}).reshape({groups, L.C}).to(input.scalar_type()).contiguous();
    };
    const Tensor ca = per_channel(coef_a), cb = per_channel(coef_b), cd = coef_d.to(input.scalar_type()).contiguous();
    grad_input = at::empty_like(input);
    with_activation(act, [&](auto a) {
      AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "qnorm_backward_input", [&] {
        const Tables<scalar_t> tab{t.shift.data_ptr<scalar_t>(), t.scale.data_ptr<scalar_t>(),
                                   t.beta.data_ptr<scalar_t>(), L.C, per_sample};
        input_grad<scalar_t, decltype(a)::value>(
            gy.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(), grad_input.data_ptr<scalar_t>(), L, tab,
            ca.data_ptr<scalar_t>(), cb.data_ptr<scalar_t>(), cd.data_ptr<scalar_t>(),
            static_cast<scalar_t>(o.negative_slope));
      });
    });
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace aqcf
