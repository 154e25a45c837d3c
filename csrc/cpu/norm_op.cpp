#include "norm_op.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <cstdlib>
#include <string_view>
#include <utility>

#include "below_autograd.h"
#include "choices.h"
#include "norm.h"

namespace aqcf {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

RememberedChoices<bool> choices;
NormFallbacks fallbacks;

// What decides whether the compiled kernels serve a call, beyond signature_start's: the Triton
// interpreter (TRITON_INTERPRET: with the triton backend forced, Triton serves CPU tensors) and the dtype.
std::string signature(const Tensor& input) {
  std::string key = signature_start("norm", input.device());
  const char* interpreter = std::getenv("TRITON_INTERPRET");
  key.append(interpreter ? interpreter : "").push_back('|');
  key.append(std::to_string(static_cast<int>(input.scalar_type())));
  return key;
}

bool recall(const Tensor& input) {
  return choices.recall(signature(input)).has_value();
}

std::optional<std::string> owned(std::optional<std::string_view> s) {
  return s ? std::optional<std::string>(std::string(*s)) : std::nullopt;
}

std::optional<Tensor> optional(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}

NormTensors qnorm_native(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var, bool use_input_stats,
    bool per_sample, double eps, std::optional<std::string_view> activation, double negative_slope) {
  if (recall(input)) {
    return qnorm_forward(
        input, weight, bias, running_mean, running_var,
        {use_input_stats, per_sample, eps, owned(activation), negative_slope});
  }
  TORCH_CHECK(fallbacks.qnorm, "aqcf::qnorm: the Python implementation is not registered (import aqcf_kernels)");
  return fallbacks.qnorm(
      input, weight, bias, running_mean, running_var, use_input_stats, per_sample, eps, owned(activation),
      negative_slope);
}

NormTensors qnorm_backward_native(
    const Tensor& grad_output, const Tensor& input, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const Tensor& mean, const Tensor& var, bool use_input_stats, bool per_sample,
    double eps, std::optional<std::string_view> activation, double negative_slope, const c10::List<bool>& needs) {
  TORCH_CHECK(needs.size() == 3, "aqcf::qnorm_backward: needs has 3 entries, got ", needs.size());
  if (recall(input)) {
    auto grads = qnorm_backward(
        grad_output, input, weight, bias, mean, var,
        {use_input_stats, per_sample, eps, owned(activation), negative_slope}, {needs.get(0), needs.get(1), needs.get(2)});
    // a fresh empty tensor for each gradient not computed (outputs of an op may not alias)
    auto or_empty = [&](const Tensor& g) { return g.defined() ? g : input.new_empty({0}); };
    return {or_empty(std::get<0>(grads)), or_empty(std::get<1>(grads)), or_empty(std::get<2>(grads))};
  }
  TORCH_CHECK(fallbacks.qnorm_backward, "aqcf::qnorm_backward: the Python implementation is not registered");
  return fallbacks.qnorm_backward(
      grad_output, input, weight, bias, mean, var, use_input_stats, per_sample, eps, owned(activation),
      negative_slope, std::vector<bool>{needs.get(0), needs.get(1), needs.get(2)});
}

const auto& qnorm_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("aqcf::qnorm", "")
          .typed<NormTensors(
              const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&, const std::optional<Tensor>&,
              const std::optional<Tensor>&, bool, bool, double, std::optional<std::string_view>, double)>();
  return op;
}

const auto& qnorm_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("aqcf::qnorm_backward", "")
          .typed<NormTensors(
              const Tensor&, const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&, const Tensor&,
              const Tensor&, bool, bool, double, std::optional<std::string_view>, double, const c10::List<bool>&)>();
  return op;
}

// The backward is the backward op (no derivative of its own); a gradient that must be differentiable
// (create_graph=True) goes through the composite reference instead (ops/norm.py).
class QNormFunction : public torch::autograd::Function<QNormFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
      const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var, bool use_input_stats,
      bool per_sample, double eps, std::optional<std::string_view> activation, double negative_slope) {
    NormTensors out;
    out = call_below_autograd(
        qnorm_op(), input, weight, bias, running_mean, running_var, use_input_stats, per_sample, eps, activation,
        negative_slope);
    auto& [y, mean, var] = out;
    ctx->mark_non_differentiable({mean, var});
    // The statistics get undefined gradients, not tensors of zeros (two launches per norm and step on a GPU)
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({input, weight.value_or(Tensor()), bias.value_or(Tensor()), mean, var});
    ctx->saved_data["use_input_stats"] = use_input_stats;
    ctx->saved_data["per_sample"] = per_sample;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["activation"] = owned(activation);
    ctx->saved_data["negative_slope"] = negative_slope;
    return {y, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const bool use_input_stats = ctx->saved_data["use_input_stats"].toBool();
    const bool per_sample = ctx->saved_data["per_sample"].toBool();
    const double eps = ctx->saved_data["eps"].toDouble();
    const c10::IValue& act = ctx->saved_data["activation"];
    const std::optional<std::string> activation = act.isNone() ? std::nullopt : std::optional(act.toStringRef());
    const double slope = ctx->saved_data["negative_slope"].toDouble();
    // Autograd numbers the tensors given (an absent weight or bias has no input edge).
    const bool has_weight = s[1].defined(), has_bias = s[2].defined();
    const std::vector<bool> needs{
        ctx->needs_input_grad(0), has_weight && ctx->needs_input_grad(1),
        has_bias && ctx->needs_input_grad(has_weight ? 2 : 1)};
    variable_list out(10);
    if (!grads[0].defined()) return out;  // y never reached the loss
    if (at::GradMode::is_enabled()) {  // create_graph=True
      TORCH_CHECK(fallbacks.composite_backward, "aqcf::qnorm: the Python implementation is not registered");
      auto [gx, gw, gb] = fallbacks.composite_backward(
          grads[0], s[0], optional(s[1]), optional(s[2]), s[3], s[4], use_input_stats, per_sample, eps, activation,
          slope, needs);
      out[0] = gx.value_or(Tensor()), out[1] = gw.value_or(Tensor()), out[2] = gb.value_or(Tensor());
    } else {
      std::optional<std::string_view> act_view;
      if (activation) act_view = *activation;
      auto [gx, gw, gb] = qnorm_backward_op().call(
          grads[0], s[0], optional(s[1]), optional(s[2]), s[3], s[4], use_input_stats, per_sample, eps, act_view,
          slope, c10::List<bool>({needs[0], needs[1], needs[2]}));
      out[0] = gx, out[1] = gw, out[2] = gb;
    }
    for (int i = 0; i < 3; ++i) {
      if (!needs[i]) out[i] = Tensor();
    }
    return out;
  }
};

NormTensors qnorm_autograd(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var, bool use_input_stats,
    bool per_sample, double eps, std::optional<std::string_view> activation, double negative_slope) {
  if (!records_graph(input, weight, bias)) {
    return call_below_autograd(
        qnorm_op(), input, weight, bias, running_mean, running_var, use_input_stats, per_sample, eps, activation,
        negative_slope);
  }
  auto out = QNormFunction::apply(
      input, weight, bias, running_mean, running_var, use_input_stats, per_sample, eps, activation, negative_slope);
  return {out[0], out[1], out[2]};
}

}  // namespace

void set_norm_fallbacks(NormFallbacks fns) {
  fallbacks = std::move(fns);
}

void remember_norm_choice(const Tensor& input) {
  choices.remember(signature(input), true);
}

void forget_norm_choices() {
  choices.forget();
}

int64_t remembered_norm_choices() {
  return choices.size();
}

void update_running_stats(
    const Tensor& running_mean, const Tensor& running_var, const Tensor& mean, const Tensor& var, int64_t count,
    double momentum) {
  TORCH_CHECK(count > 1, "update_running_stats: count must be > 1, got ", count);
  const int64_t m = running_mean.numel(), v = running_var.numel();
  TORCH_CHECK(m > 0 && v > 0 && mean.numel() % m == 0 && var.numel() % v == 0 && mean.numel() / m == var.numel() / v,
              "update_running_stats: statistics of ", mean.numel(), " and ", var.numel(),
              " values for running statistics of ", m, " and ", v);
  at::NoGradGuard no_grad;  // the statistics may carry a graph in training; the buffers must not
  Tensor new_mean, new_var;
  if (mean.numel() == m) {  // one set of statistics (batch norm): no average to take
    new_mean = mean.reshape(running_mean.sizes());
    new_var = var.reshape(running_var.sizes());
  } else {  // instance norm: the average of the samples' statistics
    new_mean = mean.reshape({-1, m}).mean(0).view(running_mean.sizes());
    new_var = var.reshape({-1, v}).mean(0).view(running_var.sizes());
  }
  if (new_mean.scalar_type() != running_mean.scalar_type()) {  // float32 statistics of a half-precision module
    new_mean = new_mean.to(running_mean.scalar_type());
    new_var = new_var.to(running_var.scalar_type());
  }
  // r += momentum (s - r) for both (one multi-tensor launch on a GPU), then the variance's unbiased part,
  // momentum (count / (count - 1) - 1) var, in place: two ops and no temporary (the Python update's too).
  at::_foreach_lerp_({running_mean, running_var}, {new_mean, new_var}, momentum);
  running_var.add_(new_var, momentum / static_cast<double>(count - 1));
}

}  // namespace aqcf

// The schemas are those torch.library.custom_op infers from ops/norm.py's Python signatures, which define
// the ops instead when this extension is not built.
TORCH_LIBRARY_FRAGMENT(aqcf, m) {
  m.def(
      "qnorm(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
      "bool use_input_stats, bool per_sample, float eps, str? activation, float negative_slope) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "qnorm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor? bias, Tensor mean, Tensor var, "
      "bool use_input_stats, bool per_sample, float eps, str? activation, float negative_slope, bool[] needs) "
      "-> (Tensor, Tensor, Tensor)");
}

// CPU only: on CUDA the Triton kernels serve (Python's registration for every other device).
TORCH_LIBRARY_IMPL(aqcf, CPU, m) {
  m.impl("qnorm", &aqcf::qnorm_native);
  m.impl("qnorm_backward", &aqcf::qnorm_backward_native);
}

TORCH_LIBRARY_IMPL(aqcf, Autograd, m) {
  m.impl("qnorm", &aqcf::qnorm_autograd);
  m.impl("qnorm_backward", torch::autograd::autogradNotImplementedFallback());
}
