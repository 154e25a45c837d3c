// The activation aqcf::qconv and aqcf::qnorm may apply to every real output channel, in the pass that
// writes their output (oneDNN's post-op on the expanded conv, fast8's output pass, the fused norm's
// normalise pass) instead of as a pass of its own; and its derivative, for the fused norm's backward.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string_view>
#include <type_traits>

namespace aqcf {

enum class Act { None, Relu, Leaky, Gelu };

// One activation: none, relu, leaky_relu (with its negative slope) or gelu (erf form).
struct Activation {
  Act kind = Act::None;
  double negative_slope = 0.0;

  bool any() const { return kind != Act::None; }
};

// From the ops' arguments (None, "relu", "leaky_relu", "gelu"); an unknown name is an error.
Activation parse_activation(const std::optional<std::string_view>& name, double negative_slope);

// `t` = act(t), in place (any layout, a view included; `t` is a handle to the data it changes).
void activate_(at::Tensor t, const Activation& act);

// act(z) in a new tensor (where z itself must be kept: the backward reads the pre-activation).
at::Tensor activated(const at::Tensor& z, const Activation& act);

constexpr double kSqrtHalf = 0.7071067811865476;    // 1/sqrt(2)
constexpr double kInvSqrt2Pi = 0.3989422804014327;  // 1/sqrt(2π)

// act(z) for one value, in plain scalar code the compiler vectorises (-O3, `omp simd`). The selects
// vectorise only with -fno-trapping-math (setup.py): otherwise GCC keeps a branch per element, which
// mispredicts half the time. NaN stays NaN, as in ATen's kernels.
template <typename T, Act A>
inline T activate(T z, T slope) {
  if constexpr (A == Act::None) {
    return z;
  } else if constexpr (A == Act::Relu) {
    return std::max(z, T(0));
  } else if constexpr (A == Act::Leaky) {
    return std::max(z, T(0)) + slope * std::min(z, T(0));
  } else {
    return z * T(0.5) * (T(1) + std::erf(z * T(kSqrtHalf)));
  }
}

// dL/dz = g · act'(z)
template <typename T, Act A>
inline T activation_grad(T z, T g, T slope) {
  if constexpr (A == Act::None) {
    return g;
  } else if constexpr (A == Act::Relu) {
    return z > T(0) ? g : T(0);
  } else if constexpr (A == Act::Leaky) {
    return g * (z > T(0) ? T(1) : slope);
  } else {
    const T cdf = T(0.5) * (T(1) + std::erf(z * T(kSqrtHalf)));
    return g * (cdf + z * std::exp(T(-0.5) * z * z) * T(kInvSqrt2Pi));
  }
}

// f(std::integral_constant<Act, a>{}): one instantiation of a kernel per activation.
template <typename F>
void with_activation(Act a, F&& f) {
  switch (a) {
    case Act::None: f(std::integral_constant<Act, Act::None>{}); break;
    case Act::Relu: f(std::integral_constant<Act, Act::Relu>{}); break;
    case Act::Leaky: f(std::integral_constant<Act, Act::Leaky>{}); break;
    case Act::Gelu: f(std::integral_constant<Act, Act::Gelu>{}); break;
  }
}

}  // namespace aqcf
