#include "activation.h"

namespace aqcf {

Activation parse_activation(const std::optional<std::string_view>& name, double negative_slope) {
  if (!name) return {};
  if (*name == "relu") return {Act::Relu, 0.0};
  if (*name == "leaky_relu") return {Act::Leaky, negative_slope};
  TORCH_CHECK(*name == "gelu", "aqcf: unknown activation ", *name, " (expected relu, leaky_relu or gelu)");
  return {Act::Gelu, 0.0};
}

void activate_(at::Tensor t, const Activation& act) {
  switch (act.kind) {
    case Act::Relu:
      at::relu_(t);
      break;
    case Act::Leaky:
      at::leaky_relu_(t, act.negative_slope);
      break;
    case Act::Gelu:
      at::gelu_(t);
      break;
    case Act::None:
      break;
  }
}

at::Tensor activated(const at::Tensor& z, const Activation& act) {
  switch (act.kind) {
    case Act::Relu:
      return at::relu(z);
    case Act::Leaky:
      return at::leaky_relu(z, act.negative_slope);
    case Act::Gelu:
      return at::gelu(z);
    case Act::None:
      break;
  }
  return z;
}

}  // namespace aqcf
