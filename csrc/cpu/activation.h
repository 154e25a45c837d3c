// The activation aqcf::qconv may apply to every real output channel, run in a conv's epilogue (oneDNN's
// post-op on the expanded conv, fast8's output pass) instead of as a pass of its own over the output.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <string_view>

namespace aqcf {

// none, relu, leaky_relu (with its negative slope) or gelu (erf form), as aqcf::qconv names them.
struct Activation {
  enum class Kind { None, Relu, LeakyRelu, Gelu };
  Kind kind = Kind::None;
  double negative_slope = 0.0;

  bool any() const { return kind != Kind::None; }
};

// From aqcf::qconv's arguments; an unknown name is an error.
Activation parse_activation(const std::optional<std::string_view>& name, double negative_slope);

// `t` = act(t), in place (any layout, a view included).
void activate_(const at::Tensor& t, const Activation& act);

// act(v) for one value in the accumulation type, as ATen's kernels compute it (NaN stays NaN).
template <Activation::Kind K, typename T>
inline T activate_value(T v, T slope) {
  if constexpr (K == Activation::Kind::Relu) {
    return v < T(0) ? T(0) : v;
  } else if constexpr (K == Activation::Kind::LeakyRelu) {
    return v > T(0) ? v : v * slope;
  } else if constexpr (K == Activation::Kind::Gelu) {
    return T(0.5) * v * (T(1) + std::erf(v * T(0.70710678118654752440)));
  } else {
    return v;
  }
}

}  // namespace aqcf
