#include "rnn_cell.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace aqcf {
namespace {

using at::Tensor;

// Plain scalar loops under `omp simd`, as csrc/cpu/norm.cpp (Vectorized<T> runs element by element in
// an extension built without ATen's CPU_CAPABILITY flags). std::exp and std::tanh do not vectorise
// without -ffast-math (glibc declares its vector variants only then), so float32 uses exp_approx below:
// branch-free, vectorisable, within ~2 ulp of expf. float64 keeps libm (gradcheck needs its accuracy).

// e^x for float: x = n ln2 + r, |r| ≤ ln2/2, Cephes' degree-6 polynomial for e^r, 2^n from the exponent
// bits. The rounding adds 1.5·2^23 (n lands in the low mantissa bits: no float→int conversion needed).
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  constexpr float kShift = 12582912.0f;  // 1.5·2^23, bits 0x4B400000
  const float shifted = x * 1.44269504088896341f + kShift;
  int32_t bits;
  std::memcpy(&bits, &shifted, sizeof bits);
  const float n = shifted - kShift;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t scale_bits = (bits - 0x4B400000 + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  return p * scale;
}

template <typename T>
inline T sigmoid(T x);
template <>
inline float sigmoid(float x) {
  return 1.0f / (1.0f + exp_approx(-x));
}
template <>
inline double sigmoid(double x) {
  return 1.0 / (1.0 + std::exp(-x));
}

template <typename T>
inline T tanh_(T x);
template <>
inline float tanh_(float x) {
  // (1 − e)/(1 + e), e = e^{−2|x|}, loses relative accuracy near 0: an odd Taylor polynomial there
  // (its first omitted term is < 1e-9 relative at |x| = 0.25).
  const float ax = std::min(std::fabs(x), 20.0f);
  const float e = exp_approx(-2.0f * ax);
  const float big = (1.0f - e) / (1.0f + e);
  const float x2 = ax * ax;
  const float small = ax * (1.0f + x2 * (-1.0f / 3 + x2 * (2.0f / 15 + x2 * (-17.0f / 315 + x2 * (62.0f / 2835)))));
  return std::copysign(ax < 0.25f ? small : big, x);
}
template <>
inline double tanh_(double x) {
  return std::tanh(x);
}

enum class Act { Tanh, Relu, Leaky };

Act parse_activation(const RnnOptions& o) {
  if (o.mode == "lstm" || o.nonlinearity == "tanh") return Act::Tanh;
  if (o.nonlinearity == "relu") return Act::Relu;
  TORCH_CHECK(o.nonlinearity == "leaky_relu" && o.mode == "ligru", "aqcf rnn_sequence: nonlinearity ",
              o.nonlinearity, " is not one of mode ", o.mode);
  return Act::Leaky;
}

template <typename T, Act A>
inline T activate(T a, T slope) {
  if constexpr (A == Act::Tanh) {
    return tanh_(a);
  } else if constexpr (A == Act::Relu) {
    return std::max(a, T(0));
  } else {
    return std::max(a, T(0)) + slope * std::min(a, T(0));
  }
}

// act'(a) from the pre-activation a and the activation v = act(a)
template <typename T, Act A>
inline T activation_slope(T a, T v, T slope) {
  if constexpr (A == Act::Tanh) {
    return T(1) - v * v;
  } else if constexpr (A == Act::Relu) {
    return a > T(0) ? T(1) : T(0);
  } else {
    return a > T(0) ? T(1) : slope;
  }
}

template <typename F>
void with_activation(Act a, F&& f) {
  switch (a) {
    case Act::Tanh: f(std::integral_constant<Act, Act::Tanh>{}); break;
    case Act::Relu: f(std::integral_constant<Act, Act::Relu>{}); break;
    case Act::Leaky: f(std::integral_constant<Act, Act::Leaky>{}); break;
  }
}

// The Hamilton product y = W ⊗ h per step without the expanded weight: the four components of h,
// stacked as rows (4B, H/4), times the four weight components side by side (Wcat, (G·H, H/4)): one
// GEMM that reads the 1/4-size quaternion weight (at batch 8 the step is bound by reading the weight:
// the expanded one, 4 MiB for an LSTM at 512 hidden, misses the L2 cache, the quaternion one does not).
// Then y_c = Σ_a s(c, a) · (W_{p(c,a)} h_a), with p, s from HAMILTON[c][a] = (p, s)
// (aqcf_kernels/quaternion.py), summed into the gates by the element-wise passes below.
constexpr int kP[4][4] = {{0, 1, 2, 3}, {1, 0, 3, 2}, {2, 3, 0, 1}, {3, 2, 1, 0}};
constexpr int kS[4][4] = {{1, -1, -1, -1}, {1, 1, -1, 1}, {1, 1, 1, -1}, {1, -1, 1, 1}};

// gates (B, 4A) = proj (B, 4A) + Σ_a s · Y[a·B + b, p·A : (p+1)·A] per output component c; Y (4B, 4A)
template <typename T>
void hamilton_gates(const T* proj, const T* y, T* gates, int64_t B, int64_t A) {
  for (int64_t b = 0; b < B; ++b) {
    for (int c = 0; c < 4; ++c) {
      const T* pr = proj + b * 4 * A + c * A;
      T* g = gates + b * 4 * A + c * A;
      const T* y0 = y + (0 * B + b) * 4 * A + kP[c][0] * A;
      const T* y1 = y + (1 * B + b) * 4 * A + kP[c][1] * A;
      const T* y2 = y + (2 * B + b) * 4 * A + kP[c][2] * A;
      const T* y3 = y + (3 * B + b) * 4 * A + kP[c][3] * A;
      const T s0 = T(kS[c][0]), s1 = T(kS[c][1]), s2 = T(kS[c][2]), s3 = T(kS[c][3]);
#pragma omp simd
      for (int64_t o = 0; o < A; ++o) g[o] = pr[o] + s0 * y0[o] + s1 * y1[o] + s2 * y2[o] + s3 * y3[o];
    }
  }
}

// The adjoint: dY (4B, 4A) with dY[a·B + b, p(c,a)·A + o] = s(c, a) · dgates[b, c·A + o] (for each a,
// c ↦ p(c, a) is a permutation: every entry is written once), so that dh_stacked = dY · Wcat.
template <typename T>
void hamilton_scatter(const T* dgates, T* dy, int64_t B, int64_t A) {
  for (int64_t b = 0; b < B; ++b) {
    for (int a = 0; a < 4; ++a) {
      for (int c = 0; c < 4; ++c) {
        const T* dg = dgates + b * 4 * A + c * A;
        T* d = dy + (a * B + b) * 4 * A + kP[c][a] * A;
        const T s = T(kS[c][a]);
#pragma omp simd
        for (int64_t o = 0; o < A; ++o) d[o] = s * dg[o];
      }
    }
  }
}

// h (B, H) <-> its stacked components (4B, H/4); `accumulate` adds into h
template <typename T>
void stack_components(const T* h, T* stacked, int64_t B, int64_t Q) {
  for (int64_t a = 0; a < 4; ++a)
    for (int64_t b = 0; b < B; ++b) std::memcpy(stacked + (a * B + b) * Q, h + b * 4 * Q + a * Q, Q * sizeof(T));
}

template <typename T>
void unstack_components(const T* stacked, T* h, int64_t B, int64_t Q, bool accumulate) {
  for (int64_t a = 0; a < 4; ++a) {
    for (int64_t b = 0; b < B; ++b) {
      const T* src = stacked + (a * B + b) * Q;
      T* dst = h + b * 4 * Q + a * Q;
      if (accumulate) {
#pragma omp simd
        for (int64_t k = 0; k < Q; ++k) dst[k] += src[k];
      } else {
        std::memcpy(dst, src, Q * sizeof(T));
      }
    }
  }
}

// Rows of one step in parallel only when a step has enough elements to pay for waking the threads
// (a batch of 8 at 512 hidden does not; under load the wake-up costs far more than the cell).
template <typename F>
void for_rows(int64_t rows, int64_t row_elements, F&& f) {
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(row_elements, 1));
  if (rows <= grain) {
    f(0, rows);
  } else {
    at::parallel_for(0, rows, grain, f);
  }
}

// Forward cells, one step: `gates` (B, G·H) holds the pre-activations and is overwritten with what
// the backward needs (ligru: a stays, z becomes σ(z); lstm: the four activated gates).

template <typename T, Act A>
void rnn_step(T* h, int64_t B, int64_t H, T slope) {  // in place: pre-activation → h
  for_rows(B, H, [&, slope](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      T* hp = h + b * H;
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) hp[j] = activate<T, A>(hp[j], slope);
    }
  });
}

template <typename T>
void lstm_step(T* gates, const T* c_prev, T* c, T* h, int64_t B, int64_t H) {
  for_rows(B, 5 * H, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      T* gi = gates + b * 4 * H;
      T *gf = gi + H, *go = gi + 2 * H, *gg = gi + 3 * H;
      const T* cp = c_prev + b * H;
      T* cb = c + b * H;
      T* hb = h + b * H;
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) {
        const T i = sigmoid(gi[j]), f = sigmoid(gf[j]), o = sigmoid(go[j]), g = tanh_(gg[j]);
        const T cn = f * cp[j] + i * g;
        gi[j] = i;
        gf[j] = f;
        go[j] = o;
        gg[j] = g;
        cb[j] = cn;
        hb[j] = o * tanh_(cn);
      }
    }
  });
}

template <typename T, Act A>
void ligru_step(T* gates, const T* h_prev, T* h, int64_t B, int64_t H, T slope) {
  for_rows(B, 2 * H, [&, slope](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const T* ga = gates + b * 2 * H;
      T* gz = gates + b * 2 * H + H;
      const T* hp = h_prev + b * H;
      T* hb = h + b * H;
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) {
        const T z = sigmoid(gz[j]);
        const T cand = activate<T, A>(ga[j], slope);
        gz[j] = z;
        hb[j] = cand + z * (hp[j] - cand);  // torch.lerp(cand, h_prev, z), as the composite cell
      }
    }
  });
}

// Backward cells, one step. dh (B, H): on entry the gradient reaching h_t through the recurrence; `go`
// the gradient of output[t] (nullable). Writes the gate gradients (B, G·H) and, for the LSTM, turns dc
// (B, H; the gradient of c_t through the recurrence) into that of c_{t−1}; `gc` the gradient of cells[t]
// (nullable). For the LiGRU dh becomes the direct part of the gradient of h_{t−1} (z · dh_t), to which
// the caller adds the GEMM part.

template <typename T, Act A>
void rnn_step_backward(const T* go, T* dh, const T* h, T* dgates, int64_t B, int64_t H, T slope) {
  for_rows(B, H, [&, slope](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const T* gob = go ? go + b * H : nullptr;
      const T* hb = h + b * H;
      const T* dhb = dh + b * H;
      T* dg = dgates + b * H;
      if (gob) {
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) dg[j] = (dhb[j] + gob[j]) * activation_slope<T, A>(hb[j], hb[j], slope);
      } else {
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) dg[j] = dhb[j] * activation_slope<T, A>(hb[j], hb[j], slope);
      }
    }
  });
}

template <typename T>
void lstm_step_backward(const T* go, const T* gc, const T* dh, T* dc, const T* acts, const T* c_prev, const T* c,
                        T* dgates, int64_t B, int64_t H) {
  for_rows(B, 6 * H, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const T* ai = acts + b * 4 * H;
      const T *af = ai + H, *ao = ai + 2 * H, *ag = ai + 3 * H;
      T* di = dgates + b * 4 * H;
      T *df = di + H, *dout = di + 2 * H, *dgg = di + 3 * H;
      const T *cp = c_prev + b * H, *cb = c + b * H, *dhb = dh + b * H;
      const T* gob = go ? go + b * H : nullptr;
      const T* gcb = gc ? gc + b * H : nullptr;
      T* dcb = dc + b * H;
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) {
        const T i = ai[j], f = af[j], o = ao[j], g = ag[j];
        const T dht = dhb[j] + (gob ? gob[j] : T(0));
        const T tc = tanh_(cb[j]);
        const T dct = dcb[j] + (gcb ? gcb[j] : T(0)) + dht * o * (T(1) - tc * tc);
        di[j] = dct * g * i * (T(1) - i);
        df[j] = dct * cp[j] * f * (T(1) - f);
        dout[j] = dht * tc * o * (T(1) - o);
        dgg[j] = dct * i * (T(1) - g * g);
        dcb[j] = dct * f;
      }
    }
  });
}

template <typename T, Act A>
void ligru_step_backward(const T* go, T* dh, const T* acts, const T* h_prev, T* dgates, int64_t B, int64_t H,
                         T slope) {
  for_rows(B, 3 * H, [&, slope](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const T* aa = acts + b * 2 * H;
      const T* az = aa + H;
      T* da = dgates + b * 2 * H;
      T* dz = da + H;
      const T* hp = h_prev + b * H;
      const T* gob = go ? go + b * H : nullptr;
      T* dhb = dh + b * H;
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) {
        const T a = aa[j], z = az[j];
        const T cand = activate<T, A>(a, slope);
        const T dht = dhb[j] + (gob ? gob[j] : T(0));
        dz[j] = dht * (hp[j] - cand) * z * (T(1) - z);
        da[j] = dht * (T(1) - z) * activation_slope<T, A>(a, cand, slope);
        dhb[j] = dht * z;
      }
    }
  });
}

int64_t gate_count(const std::string& mode) {
  if (mode == "rnn") return 1;
  if (mode == "lstm") return 4;
  TORCH_CHECK(mode == "ligru", "aqcf rnn_sequence: mode must be rnn, lstm or ligru, got ", mode);
  return 2;
}

struct Sizes {
  int64_t T, B, H, G;
};

Sizes check_inputs(const Tensor& proj, const Tensor& h0, const std::optional<Tensor>& c0, const Tensor& weight,
                   const RnnOptions& o) {
  const int64_t G = gate_count(o.mode);
  TORCH_CHECK(proj.device().is_cpu(), "aqcf rnn_sequence: expects CPU tensors");
  TORCH_CHECK(proj.scalar_type() == at::kFloat || proj.scalar_type() == at::kDouble,
              "aqcf rnn_sequence: float32 or float64 only, got ", proj.scalar_type());
  TORCH_CHECK(proj.dim() == 3 && h0.dim() == 2 && weight.dim() == 3, "aqcf rnn_sequence: proj (T, B, G·H), h0 (B, H), "
              "weight (4, G·H/4, H/4) expected, got ", proj.sizes(), ", ", h0.sizes(), ", ", weight.sizes());
  const int64_t T = proj.size(0), B = proj.size(1), H = h0.size(1);
  TORCH_CHECK(H % 4 == 0 && proj.size(2) == G * H && h0.size(0) == B && weight.size(0) == 4 &&
                  weight.size(1) == G * H / 4 && weight.size(2) == H / 4,
              "aqcf rnn_sequence: shapes disagree: proj ", proj.sizes(), ", h0 ", h0.sizes(), ", weight ",
              weight.sizes(), " for ", G, " gates");
  TORCH_CHECK(h0.scalar_type() == proj.scalar_type() && weight.scalar_type() == proj.scalar_type(),
              "aqcf rnn_sequence: proj, h0 and weight must share a dtype");
  if (o.mode == "lstm") {
    TORCH_CHECK(c0 && c0->defined() && c0->sizes() == h0.sizes() && c0->scalar_type() == proj.scalar_type(),
                "aqcf rnn_sequence: the LSTM needs c0 shaped and typed as h0");
  }
  return {T, B, H, G};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> rnn_sequence_forward(const Tensor& proj_, const Tensor& h0_,
                                                        const std::optional<Tensor>& c0_, const Tensor& weight,
                                                        const RnnOptions& o) {
  const Sizes s = check_inputs(proj_, h0_, c0_, weight, o);
  const int64_t A = s.G * s.H / 4, Q = s.H / 4;
  const Act act = parse_activation(o);
  const auto opt = proj_.options();
  const Tensor proj = proj_.contiguous();
  const Tensor h0 = h0_.contiguous();
  const Tensor wcat_t = weight.reshape({4 * A, Q}).t();  // Y = h_stacked Wcatᵀ
  Tensor output = at::empty({s.T, s.B, s.H}, opt);
  Tensor cells = o.mode == "lstm" ? at::empty({s.T, s.B, s.H}, opt) : at::empty({0}, opt);
  Tensor saved = o.mode == "rnn" ? at::empty({0}, opt) : at::empty({s.T, s.B, s.G * s.H}, opt);
  const Tensor c0 = o.mode == "lstm" ? c0_->contiguous() : Tensor();
  Tensor h_stacked = at::empty({4 * s.B, Q}, opt);
  Tensor y = at::empty({4 * s.B, 4 * A}, opt);

  AT_DISPATCH_FLOATING_TYPES(proj.scalar_type(), "rnn_sequence_forward", [&] {
    const auto slope = static_cast<scalar_t>(o.negative_slope);
    scalar_t* out = output.data_ptr<scalar_t>();
    scalar_t* hs = h_stacked.data_ptr<scalar_t>();
    stack_components(h0.data_ptr<scalar_t>(), hs, s.B, Q);
    const int64_t row = s.B * s.H, gate_row = s.B * s.G * s.H;
    for (int64_t step = 0; step < s.T; ++step) {
      const int64_t t = o.reverse ? s.T - 1 - step : step;
      const int64_t prev = o.reverse ? t + 1 : t - 1;
      const scalar_t* h_prev = step == 0 ? h0.data_ptr<scalar_t>() : out + prev * row;
      at::mm_out(y, h_stacked, wcat_t);
      // the pre-activations: straight into output[t] for the RNN (activated in place), else into saved[t]
      scalar_t* gates = o.mode == "rnn" ? out + t * row : saved.data_ptr<scalar_t>() + t * gate_row;
      hamilton_gates<scalar_t>(proj.data_ptr<scalar_t>() + t * gate_row, y.data_ptr<scalar_t>(), gates, s.B, A);
      if (o.mode == "lstm") {
        const scalar_t* c_prev = step == 0 ? c0.data_ptr<scalar_t>() : cells.data_ptr<scalar_t>() + prev * row;
        lstm_step<scalar_t>(gates, c_prev, cells.data_ptr<scalar_t>() + t * row, out + t * row, s.B, s.H);
      } else {
        with_activation(act, [&](auto a) {
          constexpr Act Ac = decltype(a)::value;
          if (o.mode == "rnn") {
            rnn_step<scalar_t, Ac>(gates, s.B, s.H, slope);
          } else {
            ligru_step<scalar_t, Ac>(gates, h_prev, out + t * row, s.B, s.H, slope);
          }
        });
      }
      stack_components(out + t * row, hs, s.B, Q);
    }
  });
  return {output, cells, saved};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> rnn_sequence_backward(
    const std::optional<Tensor>& grad_output_, const std::optional<Tensor>& grad_cells_, const Tensor& output,
    const Tensor& cells, const Tensor& saved, const Tensor& h0_, const std::optional<Tensor>& c0_,
    const Tensor& weight, const RnnOptions& o, std::array<bool, 4> mask) {
  const int64_t G = gate_count(o.mode);
  const int64_t T = output.size(0), B = output.size(1), H = output.size(2);
  const int64_t A = G * H / 4, Q = H / 4;
  const Act act = parse_activation(o);
  const auto opt = output.options();
  const Tensor wcat = weight.reshape({4 * A, Q}).contiguous();
  const Tensor h0 = h0_.contiguous();
  const bool lstm = o.mode == "lstm";
  const Tensor c0 = lstm ? c0_->contiguous() : Tensor();
  const Tensor grad_output = grad_output_ && grad_output_->defined() ? grad_output_->contiguous() : Tensor();
  const Tensor grad_cells = lstm && grad_cells_ && grad_cells_->defined() ? grad_cells_->contiguous() : Tensor();

  Tensor grad_gates = at::empty({T, B, G * H}, opt);  // = grad_proj
  Tensor dh = at::zeros({B, H}, opt);                 // gradient of h_t through the recurrence
  Tensor dc = lstm ? at::zeros({B, H}, opt) : Tensor();
  Tensor dy = at::empty({4 * B, 4 * A}, opt);
  Tensor dh_stacked = at::empty({4 * B, Q}, opt);
  AT_DISPATCH_FLOATING_TYPES(output.scalar_type(), "rnn_sequence_backward", [&] {
    const auto slope = static_cast<scalar_t>(o.negative_slope);
    const scalar_t* out = output.data_ptr<scalar_t>();
    const int64_t row = B * H, gate_row = B * G * H;
    scalar_t* dhp = dh.data_ptr<scalar_t>();
    for (int64_t step = T - 1; step >= 0; --step) {
      const int64_t t = o.reverse ? T - 1 - step : step;
      const int64_t prev = o.reverse ? t + 1 : t - 1;
      scalar_t* dg = grad_gates.data_ptr<scalar_t>() + t * gate_row;
      const scalar_t* go = grad_output.defined() ? grad_output.data_ptr<scalar_t>() + t * row : nullptr;
      if (lstm) {
        const scalar_t* gc = grad_cells.defined() ? grad_cells.data_ptr<scalar_t>() + t * row : nullptr;
        const scalar_t* c_prev = step == 0 ? c0.data_ptr<scalar_t>() : cells.data_ptr<scalar_t>() + prev * row;
        lstm_step_backward<scalar_t>(go, gc, dhp, dc.data_ptr<scalar_t>(), saved.data_ptr<scalar_t>() + t * gate_row,
                                     c_prev, cells.data_ptr<scalar_t>() + t * row, dg, B, H);
      } else {
        with_activation(act, [&](auto a) {
          constexpr Act Ac = decltype(a)::value;
          if (o.mode == "rnn") {
            rnn_step_backward<scalar_t, Ac>(go, dhp, out + t * row, dg, B, H, slope);
          } else {
            const scalar_t* h_prev = step == 0 ? h0.data_ptr<scalar_t>() : out + prev * row;
            ligru_step_backward<scalar_t, Ac>(go, dhp, saved.data_ptr<scalar_t>() + t * gate_row, h_prev, dg, B, H,
                                              slope);
          }
        });
      }
      // the gradient of h_{t−1} through the GEMM (the LiGRU adds it to the direct z·dh already in dh)
      hamilton_scatter<scalar_t>(dg, dy.data_ptr<scalar_t>(), B, A);
      at::mm_out(dh_stacked, dy, wcat);
      unstack_components<scalar_t>(dh_stacked.data_ptr<scalar_t>(), dhp, B, Q, o.mode == "ligru");
    }
  });

  Tensor grad_weight;
  if (mask[3]) {
    // Σ_t dgates_tᵀ h_{t−1} as the expanded (G·H, H) gradient, in one GEMM over every step (the first
    // step processed reads h0), then folded onto the four components: dW_p = Σ_{p(c,a) = p} s · dE[c, a]
    const int64_t first = o.reverse ? T - 1 : 0;
    Tensor grad_expanded = at::mm(grad_gates[first].t(), h0);
    if (T > 1) {
      const Tensor later = o.reverse ? grad_gates.narrow(0, 0, T - 1) : grad_gates.narrow(0, 1, T - 1);
      const Tensor h_prev = o.reverse ? output.narrow(0, 1, T - 1) : output.narrow(0, 0, T - 1);
      grad_expanded.addmm_(later.reshape({-1, G * H}).t(), h_prev.reshape({-1, H}));
    }
    const Tensor blocks = grad_expanded.view({4, A, 4, Q});
    grad_weight = at::zeros({4, A, Q}, opt);
    for (int c = 0; c < 4; ++c) {
      for (int a = 0; a < 4; ++a) grad_weight[kP[c][a]].add_(blocks.select(0, c).select(1, a), kS[c][a]);
    }
  }
  return {mask[0] ? grad_gates : Tensor(), mask[1] ? dh : Tensor(), mask[2] && lstm ? dc : Tensor(), grad_weight};
}

}  // namespace aqcf

namespace {

aqcf::RnnOptions options(std::string mode, std::string nonlinearity, double negative_slope, bool reverse) {
  return {std::move(mode), std::move(nonlinearity), negative_slope, reverse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& proj, const at::Tensor& h0,
                                                           const std::optional<at::Tensor>& c0,
                                                           const at::Tensor& weight, std::string mode,
                                                           std::string nonlinearity, double negative_slope,
                                                           bool reverse) {
  return aqcf::rnn_sequence_forward(proj, h0, c0, weight,
                                    options(std::move(mode), std::move(nonlinearity), negative_slope, reverse));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const std::optional<at::Tensor>& grad_output, const std::optional<at::Tensor>& grad_cells,
    const at::Tensor& output, const at::Tensor& cells, const at::Tensor& saved, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& weight, std::string mode, std::string nonlinearity,
    double negative_slope, bool reverse, std::array<bool, 4> mask) {
  auto [gp, gh, gc, gw] = aqcf::rnn_sequence_backward(
      grad_output, grad_cells, output, cells, saved, h0, c0, weight,
      options(std::move(mode), std::move(nonlinearity), negative_slope, reverse), mask);
  // the op returns tensors, never None: an empty one where a gradient was not asked
  auto or_empty = [&](const at::Tensor& g) { return g.defined() ? g : at::empty({0}, output.options()); };
  return {or_empty(gp), or_empty(gh), or_empty(gc), or_empty(gw)};
}

}  // namespace

// The kernels behind aqcf::rnn_sequence (aqcf_kernels/ops/rnn_cell.py defines that op, its fake and
// autograd, and calls these on CPU float32/float64 when the extension is loaded).
TORCH_LIBRARY_FRAGMENT(aqcf, m) {
  m.def(
      "_rnn_sequence_forward_cpu(Tensor proj, Tensor h0, Tensor? c0, Tensor weight, str mode, str nonlinearity, "
      "float negative_slope, bool reverse) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_rnn_sequence_backward_cpu(Tensor? grad_output, Tensor? grad_cells, Tensor output, Tensor cells, "
      "Tensor saved, Tensor h0, Tensor? c0, Tensor weight, str mode, str nonlinearity, float negative_slope, "
      "bool reverse, bool[4] mask) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(aqcf, CPU, m) {
  m.impl("_rnn_sequence_forward_cpu", &forward_cpu);
  m.impl("_rnn_sequence_backward_cpu", &backward_cpu);
}
