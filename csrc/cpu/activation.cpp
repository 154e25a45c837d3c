#include "activation.h"

namespace aqcf {

Activation parse_activation(const std::optional<std::string_view>& name, double negative_slope) {
  if (!name) return {};
  if (*name == "relu") return {Activation::Kind::Relu, 0.0};
  if (*name == "leaky_relu") return {Activation::Kind::LeakyRelu, negative_slope};
  TORCH_CHECK(*name == "gelu", "aqcf: unknown activation ", *name, " (expected relu, leaky_relu or gelu)");
  return {Activation::Kind::Gelu, 0.0};
}

void activate_(const at::Tensor& t, const Activation& act) {
  switch (act.kind) {
    case Activation::Kind::Relu:
      at::relu_(const_cast<at::Tensor&>(t));
      break;
    case Activation::Kind::LeakyRelu:
      at::leaky_relu_(const_cast<at::Tensor&>(t), act.negative_slope);
      break;
    case Activation::Kind::Gelu:
      at::gelu_(const_cast<at::Tensor&>(t));
      break;
    case Activation::Kind::None:
      break;
  }
}

}  // namespace aqcf
