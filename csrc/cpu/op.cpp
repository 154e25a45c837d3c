#include "op.h"

#include "autocast.h"
#include "below_autograd.h"
#include "choices.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/MemoryFormat.h>
#include <c10/util/strides.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string_view>

namespace aqcf {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ------------------------------------------------------------------------------------------------
// Choices remembered from Python
// ------------------------------------------------------------------------------------------------

struct Choice {
  bool fast8;
  Engine engine;
};
RememberedChoices<Choice> choices;
QConvFallback conv_fallback;
QConvWeightGradFallback weight_grad_fallback;
QConvWeightBiasGradFallback weight_bias_grad_fallback;

// What a choice depends on beyond signature_start's: the thread count (tuning measures per thread
// count); the device is there too, since the CPU and CUDA kernels share the table (a choice is made per
// device model, and per device).
std::string signature(
    std::string_view kind, std::string_view algorithm, const Tensor& input, const Tensor& other,
    at::IntArrayRef weight_shape, const ConvParams& p) {
  std::string key = signature_start(kind, input.device());
  key.append(algorithm).append("|");
  auto put = [&](int64_t v) { key.append(std::to_string(v)).push_back(','); };
  auto put_all = [&](at::IntArrayRef values) {
    for (int64_t v : values) put(v);
    key.push_back(';');
  };
  put(static_cast<int64_t>(input.scalar_type()));
  put(at::get_num_threads());
  put_all(input.sizes());
  put_all(input.strides());
  put_all(other.sizes());
  put_all(other.strides());
  put_all(weight_shape);
  put_all(p.stride);
  put_all(p.padding);
  put_all(p.dilation);
  put_all(p.output_padding);
  put(p.transposed);
  put(p.groups);
  return key;
}

// ------------------------------------------------------------------------------------------------
// Helpers shared by the kernels and the autograd formulas
// ------------------------------------------------------------------------------------------------

std::vector<int64_t> ints(c10::SymIntArrayRef values) {
  return C10_AS_INTARRAYREF_SLOW(values).vec();
}

ConvParams params_of(
    c10::SymIntArrayRef stride, c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation, bool transposed,
    c10::SymIntArrayRef output_padding, const c10::SymInt& groups) {
  return {ints(stride), ints(padding), ints(dilation), transposed, ints(output_padding), groups.expect_int()};
}

bool stores_preactivation(const std::optional<std::string_view>& activation, double negative_slope) {
  return activation && (*activation == "gelu" || (*activation == "leaky_relu" && negative_slope < 0));
}

// The gate an activation's backward reads: y for ReLU and LeakyReLU with a slope >= 0 (y > 0 <=> z > 0),
// the pre-activation z otherwise.
const Tensor& activation_gate(const Tensor& y, const Tensor& pre, std::string_view activation, double negative_slope) {
  return stores_preactivation(activation, negative_slope) ? pre : y;
}

// dL/dz from dL/dy (differentiable: double backward goes through it); as ops/conv.py's activation_grad:
// aten's own backward of each activation, one element-wise kernel. With `out`, written into it in its
// layout (aten's out= variant: not differentiable).
Tensor activation_grad(
    const Tensor& grad, const Tensor& y, const Tensor& pre, std::string_view activation, double negative_slope,
    std::optional<Tensor> out = std::nullopt) {
  const Tensor& gate = activation_gate(y, pre, activation, negative_slope);
  if (activation == "gelu") {
    return out ? at::gelu_backward_outf(grad, gate, "none", *out) : at::gelu_backward(grad, gate);
  }
  if (activation == "relu") {
    return out ? at::threshold_backward_outf(grad, gate, 0.0, *out) : at::threshold_backward(grad, gate, 0.0);
  }
  const bool gate_is_y = gate.is_same(y);  // leaky_relu: y unless the slope is negative
  return out ? at::leaky_relu_backward_outf(grad, gate, negative_slope, gate_is_y, *out)
             : at::leaky_relu_backward(grad, gate, negative_slope, gate_is_y);
}

// The gradient of a per-channel bias added to an output whose gradient is grad_output: its sum over every
// dim but the channels (dim 1).
Tensor bias_grad(const Tensor& grad_output) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < grad_output.dim(); ++d) dims.push_back(d);
  return grad_output.sum(dims);
}

// aqcf::activation_grad_bias on CPU (and wherever Python registers nothing faster): dL/dz as
// activation_grad, in the gate's layout, and its sum over every dim but the channels (the bias
// gradient). aten's two passes; the CUDA kernel (backends/triton/activation_grad.py) makes it one.
std::tuple<Tensor, Tensor> activation_grad_bias_cpu(
    const Tensor& grad, const Tensor& y, const Tensor& pre, std::string_view activation, double negative_slope) {
  const Tensor& gate = activation_gate(y, pre, activation, negative_slope);
  // written straight into the gate's layout (what the fake says), whatever grad's layout
  const Tensor grad_z = activation_grad(grad, y, pre, activation, negative_slope, at::empty_like(gate));
  return {grad_z, bias_grad(grad_z)};
}

// The op's outputs follow the input's memory format (as the fake implementation in ops/conv.py):
// channels_last in, channels_last out; a backend output with other strides is copied once.
Tensor in_output_format(const Tensor& input, const Tensor& t) {
  const bool spatial = t.dim() == 4 || t.dim() == 5;
  const at::MemoryFormat format = spatial ? input.suggest_memory_format() : at::MemoryFormat::Contiguous;
  std::vector<int64_t> expected;
  if (format == at::MemoryFormat::ChannelsLast) {
    expected = c10::get_channels_last_strides_2d(t.sizes());
  } else if (format == at::MemoryFormat::ChannelsLast3d) {
    expected = c10::get_channels_last_strides_3d(t.sizes());
  } else {
    const auto strides = c10::contiguous_strides(t.sizes());
    expected.assign(strides.begin(), strides.end());
  }
  if (t.strides() == at::IntArrayRef(expected)) return t;
  return at::empty_strided(t.sizes(), expected, t.options()).copy_(t);
}

// ------------------------------------------------------------------------------------------------
// CPU and CUDA kernels: a remembered choice runs here; anything else asks Python
// ------------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> qconv_native(
    const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias, c10::SymIntArrayRef stride,
    c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation, bool transposed, c10::SymIntArrayRef output_padding,
    c10::SymInt groups, std::string_view algorithm, std::optional<std::string_view> activation,
    double negative_slope, std::string_view kind) {
  ConvParams p = params_of(stride, padding, dilation, transposed, output_padding, groups);
  const std::optional<Choice> choice = choices.recall(signature(kind, algorithm, input, weight, weight.sizes(), p));
  if (!choice) {
    TORCH_CHECK(conv_fallback, "aqcf::qconv: the Python implementation is not registered (import aqcf_kernels)");
    std::optional<std::string> act;
    if (activation) act = std::string(*activation);
    return conv_fallback(input, weight, bias, p, std::string(algorithm), act, negative_slope, std::string(kind));
  }
  const bool cpu_engine = choice->engine != Engine::Aten;
  p.im2col = choice->engine == Engine::CpuIm2col;
  const Activation act = parse_activation(activation, negative_slope);
  const bool keep = stores_preactivation(activation, negative_slope);
  if (cpu_engine && !keep) {  // none, relu, leaky_relu >= 0: in the engine's epilogue
    return {in_output_format(input, conv(input, weight, bias, p, choice->fast8, act)), input.new_empty({0})};
  }
  const Tensor raw = cpu_engine ? conv(input, weight, bias, p, choice->fast8) : conv_aten(input, weight, bias, p, choice->fast8);
  if (!activation) return {in_output_format(input, raw), input.new_empty({0})};
  // In the order ops/conv.py's _qconv takes for the same choice, so that a served call equals the first one bit for
  // bit: the cpu engines (a backend that fuses the activation: conv_act) activate their output, then each goes into
  // the output format; the ATen path (no epilogue) activates the output already in it. The orders differ in the last
  // bit where the engine's output is in another format (GELU's vectorised and scalar loops round differently, and
  // which one an element takes depends on the layout).
  // (an elementwise op may give a map whose spatial dims are all 1 channels-first strides: the input's format again)
  if (cpu_engine) {
    return {in_output_format(input, activated(raw, act)), keep ? in_output_format(input, raw) : input.new_empty({0})};
  }
  const Tensor z = in_output_format(input, raw);
  return {in_output_format(input, activated(z, act)), keep ? z : input.new_empty({0})};
}

std::optional<Tensor> remembered_weight_grad(
    const Tensor& input, const Tensor& grad_output, const std::vector<int64_t>& shape, ConvParams p,
    std::string_view algorithm) {
  const std::optional<Choice> choice = choices.recall(signature("weight_grad", algorithm, input, grad_output, shape, p));
  if (!choice) return std::nullopt;
  p.im2col = choice->engine == Engine::CpuIm2col;
  const Tensor gw = choice->engine != Engine::Aten ? conv_weight_grad(input, grad_output, shape, p, choice->fast8)
                                                   : conv_weight_grad_aten(input, grad_output, shape, p, choice->fast8);
  return gw.contiguous();
}

Tensor qconv_weight_grad_native(
    const Tensor& input, const Tensor& grad_output, c10::SymIntArrayRef weight_shape, c10::SymIntArrayRef stride,
    c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation, bool transposed, c10::SymIntArrayRef output_padding,
    c10::SymInt groups, std::string_view algorithm) {
  const ConvParams p = params_of(stride, padding, dilation, transposed, output_padding, groups);
  const std::vector<int64_t> shape = ints(weight_shape);
  if (std::optional<Tensor> gw = remembered_weight_grad(input, grad_output, shape, p, algorithm)) return *gw;
  TORCH_CHECK(weight_grad_fallback, "aqcf::qconv_weight_grad: the Python implementation is not registered");
  return weight_grad_fallback(input, grad_output, shape, p, std::string(algorithm));
}

// The weight gradient and the bias gradient (grad_output summed over every dim but the channels). A
// remembered choice runs the two one after the other (oneDNN's and cuDNN's weight gradients do not sum
// it); otherwise Python's implementation, which lets the Triton weight-gradient launch sum it.
std::tuple<Tensor, Tensor> qconv_weight_bias_grad_native(
    const Tensor& input, const Tensor& grad_output, c10::SymIntArrayRef weight_shape, c10::SymIntArrayRef stride,
    c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation, bool transposed, c10::SymIntArrayRef output_padding,
    c10::SymInt groups, std::string_view algorithm) {
  const ConvParams p = params_of(stride, padding, dilation, transposed, output_padding, groups);
  const std::vector<int64_t> shape = ints(weight_shape);
  if (std::optional<Tensor> gw = remembered_weight_grad(input, grad_output, shape, p, algorithm)) {
    return {std::move(*gw), bias_grad(grad_output)};
  }
  TORCH_CHECK(weight_bias_grad_fallback, "aqcf::qconv_weight_bias_grad: the Python implementation is not registered");
  return weight_bias_grad_fallback(input, grad_output, shape, p, std::string(algorithm));
}

// ------------------------------------------------------------------------------------------------
// Autograd: the backward is made of the same two ops (double backward, torch.compile, opcheck)
// ------------------------------------------------------------------------------------------------

const auto& qconv_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("aqcf::qconv", "")
          .typed<std::tuple<Tensor, Tensor>(
              const Tensor&, const Tensor&, const std::optional<Tensor>&, c10::SymIntArrayRef, c10::SymIntArrayRef,
              c10::SymIntArrayRef, bool, c10::SymIntArrayRef, c10::SymInt, std::string_view,
              std::optional<std::string_view>, double, std::string_view)>();
  return op;
}

const auto& weight_grad_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("aqcf::qconv_weight_grad", "")
          .typed<Tensor(
              const Tensor&, const Tensor&, c10::SymIntArrayRef, c10::SymIntArrayRef, c10::SymIntArrayRef,
              c10::SymIntArrayRef, bool, c10::SymIntArrayRef, c10::SymInt, std::string_view)>();
  return op;
}

const auto& weight_bias_grad_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("aqcf::qconv_weight_bias_grad", "")
          .typed<std::tuple<Tensor, Tensor>(
              const Tensor&, const Tensor&, c10::SymIntArrayRef, c10::SymIntArrayRef, c10::SymIntArrayRef,
              c10::SymIntArrayRef, bool, c10::SymIntArrayRef, c10::SymInt, std::string_view)>();
  return op;
}

const auto& activation_grad_bias_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("aqcf::activation_grad_bias", "")
                             .typed<std::tuple<Tensor, Tensor>(
                                 const Tensor&, const Tensor&, const Tensor&, std::string_view, double)>();
  return op;
}

// The geometry an autograd context keeps: stride, padding, dilation, output_padding, groups, transposed.
struct Geometry {
  std::vector<c10::SymInt> stride, padding, dilation, output_padding;
  c10::SymInt groups;
  bool transposed;

  void save(AutogradContext* ctx) const {
    ctx->saved_data["stride"] = c10::SymIntArrayRef(stride);
    ctx->saved_data["padding"] = c10::SymIntArrayRef(padding);
    ctx->saved_data["dilation"] = c10::SymIntArrayRef(dilation);
    ctx->saved_data["output_padding"] = c10::SymIntArrayRef(output_padding);
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["transposed"] = transposed;
  }
  static Geometry load(AutogradContext* ctx) {
    return {ctx->saved_data["stride"].toSymIntVector(), ctx->saved_data["padding"].toSymIntVector(),
            ctx->saved_data["dilation"].toSymIntVector(), ctx->saved_data["output_padding"].toSymIntVector(),
            ctx->saved_data["groups"].toSymInt(), ctx->saved_data["transposed"].toBool()};
  }
};

Tensor conv_via_op(const Tensor& input, const Tensor& weight, const Geometry& g, std::string_view algorithm,
                   std::string_view kind) {
  return std::get<0>(qconv_op().call(
      input, weight, std::nullopt, g.stride, g.padding, g.dilation, g.transposed, g.output_padding, g.groups,
      algorithm, std::nullopt, 0.01, kind));
}

// d/d input of qconv(input, weight): the adjoint conv of grad_output (a quaternion transposed conv is
// defined as the adjoint). For a strided conv, output_padding lands the result on the input's size.
Tensor input_grad(const Tensor& grad_output, const Tensor& weight, c10::SymIntArrayRef input_shape,
                  const Geometry& g, std::string_view algorithm) {
  Geometry adjoint = g;
  adjoint.transposed = !g.transposed;
  const size_t n = g.stride.size();
  for (size_t d = 0; d < n; ++d) {
    if (g.transposed) {
      adjoint.output_padding[d] = 0;
    } else {
      const c10::SymInt k = weight.sym_size(3 + d);
      const c10::SymInt natural =
          (grad_output.sym_size(2 + d) - 1) * g.stride[d] - 2 * g.padding[d] + g.dilation[d] * (k - 1) + 1;
      adjoint.output_padding[d] = input_shape[2 + d] - natural;
    }
  }
  return conv_via_op(grad_output, weight, adjoint, algorithm, "input_grad");
}

Tensor weight_grad(const Tensor& input, const Tensor& grad_output, c10::SymIntArrayRef weight_shape,
                   const Geometry& g, std::string_view algorithm) {
  return weight_grad_op().call(
      input, grad_output, weight_shape, g.stride, g.padding, g.dilation, g.transposed, g.output_padding, g.groups,
      algorithm);
}

std::tuple<Tensor, Tensor> weight_bias_grad(const Tensor& input, const Tensor& grad_output,
                                            c10::SymIntArrayRef weight_shape, const Geometry& g,
                                            std::string_view algorithm) {
  return weight_bias_grad_op().call(
      input, grad_output, weight_shape, g.stride, g.padding, g.dilation, g.transposed, g.output_padding, g.groups,
      algorithm);
}

class QConvFunction : public torch::autograd::Function<QConvFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
      c10::SymIntArrayRef stride, c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation, bool transposed,
      c10::SymIntArrayRef output_padding, c10::SymInt groups, std::string_view algorithm,
      std::optional<std::string_view> activation, double negative_slope, std::string_view kind) {
    Tensor y, pre;
    std::tie(y, pre) = call_below_autograd(
        qconv_op(), input, weight, bias, stride, padding, dilation, transposed, output_padding, groups, algorithm,
        activation, negative_slope, kind);
    // An output the loss never reached gets no gradient (not a tensor of zeros): z mostly does not, and
    // adding zeros to dL/dz would cost a pass and keep the bias gradient out of the activation's pass.
    ctx->set_materialize_grads(false);
    // The activation's backward reads y (and the pre-activation, where kept); a plain conv needs neither.
    if (activation) {
      ctx->save_for_backward({input, weight, y, pre});
      ctx->saved_data["activation"] = std::string(*activation);
    } else {
      ctx->save_for_backward({input, weight});
    }
    Geometry{stride.vec(), padding.vec(), dilation.vec(), output_padding.vec(), groups, transposed}.save(ctx);
    ctx->saved_data["algorithm"] = std::string(algorithm);
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return {y, pre};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight = saved[1];
    const Geometry g = Geometry::load(ctx);
    const std::string algorithm = ctx->saved_data["algorithm"].toStringRef();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool pre_reached_loss = grads[1].defined() && grads[1].sym_numel() != 0;
    Tensor grad_z = grads[0], grad_bias;
    if (saved.size() == 4 && grad_z.defined()) {
      const std::string& activation = ctx->saved_data["activation"].toStringRef();
      const double slope = ctx->saved_data["negative_slope"].toDouble();
      // The bias gradient from the activation's pass (one read of dL/dz fewer on CUDA), unless the
      // gradient must be differentiable (create_graph: this op has no derivative) or z itself adds to it.
      if (has_bias && ctx->needs_input_grad(2) && !pre_reached_loss && !at::GradMode::is_enabled()) {
        std::tie(grad_z, grad_bias) = activation_grad_bias_op().call(grad_z, saved[2], saved[3], activation, slope);
      } else {
        grad_z = activation_grad(grad_z, saved[2], saved[3], activation, slope);
      }
    }
    if (pre_reached_loss) grad_z = grad_z.defined() ? grad_z + grads[1] : grads[1];
    variable_list out(13);
    if (!grad_z.defined()) return out;
    if (ctx->needs_input_grad(0)) out[0] = input_grad(grad_z, weight, input.sym_sizes(), g, algorithm);
    out[2] = grad_bias;  // from the activation's pass, or undefined
    const bool wants_bias = !grad_bias.defined() && has_bias && ctx->needs_input_grad(2);
    if (ctx->needs_input_grad(1) && wants_bias && !at::GradMode::is_enabled()) {
      // the bias gradient from the weight gradient's launch where the backend can (no derivative)
      std::tie(out[1], out[2]) = weight_bias_grad(input, grad_z, weight.sym_sizes(), g, algorithm);
    } else {
      if (ctx->needs_input_grad(1)) out[1] = weight_grad(input, grad_z, weight.sym_sizes(), g, algorithm);
      if (wants_bias) out[2] = bias_grad(grad_z);
    }
    return out;
  }
};

class QConvWeightGradFunction : public torch::autograd::Function<QConvWeightGradFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const Tensor& input, const Tensor& grad_output, c10::SymIntArrayRef weight_shape,
      c10::SymIntArrayRef stride, c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation, bool transposed,
      c10::SymIntArrayRef output_padding, c10::SymInt groups, std::string_view algorithm) {
    Tensor gw;
    gw = call_below_autograd(
        weight_grad_op(), input, grad_output, weight_shape, stride, padding, dilation, transposed, output_padding,
        groups, algorithm);
    ctx->save_for_backward({input, grad_output});
    Geometry{stride.vec(), padding.vec(), dilation.vec(), output_padding.vec(), groups, transposed}.save(ctx);
    ctx->saved_data["algorithm"] = std::string(algorithm);
    return {gw};
  }

  // qconv_weight_grad(x, gy) is bilinear: <H, wgrad(x, gy)> = <gy, qconv(x, H)>.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &grad_output = saved[1];
    const Geometry g = Geometry::load(ctx);
    const std::string algorithm = ctx->saved_data["algorithm"].toStringRef();
    variable_list out(10);
    const Tensor& h = grads[0];
    if (!h.defined()) return out;
    if (ctx->needs_input_grad(0)) out[0] = input_grad(grad_output, h, input.sym_sizes(), g, algorithm);
    if (ctx->needs_input_grad(1)) out[1] = conv_via_op(input, h, g, algorithm, "forward");
    return out;
  }
};

std::tuple<Tensor, Tensor> qconv_autograd(
    const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias, c10::SymIntArrayRef stride,
    c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation, bool transposed, c10::SymIntArrayRef output_padding,
    c10::SymInt groups, std::string_view algorithm, std::optional<std::string_view> activation,
    double negative_slope, std::string_view kind) {
  if (!records_graph(input, weight, bias)) {
    return call_below_autograd(
        qconv_op(), input, weight, bias, stride, padding, dilation, transposed, output_padding, std::move(groups),
        algorithm, activation, negative_slope, kind);
  }
  auto out = QConvFunction::apply(
      input, weight, bias, stride, padding, dilation, transposed, output_padding, std::move(groups), algorithm,
      activation, negative_slope, kind);
  return {out[0], out[1]};
}

Tensor qconv_weight_grad_autograd(
    const Tensor& input, const Tensor& grad_output, c10::SymIntArrayRef weight_shape, c10::SymIntArrayRef stride,
    c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation, bool transposed, c10::SymIntArrayRef output_padding,
    c10::SymInt groups, std::string_view algorithm) {
  if (!records_graph(input, grad_output)) {
    return call_below_autograd(
        weight_grad_op(), input, grad_output, weight_shape, stride, padding, dilation, transposed, output_padding,
        std::move(groups), algorithm);
  }
  return QConvWeightGradFunction::apply(
      input, grad_output, weight_shape, stride, padding, dilation, transposed, output_padding, std::move(groups),
      algorithm)[0];
}

// Under autocast: the conv in the autocast dtype (autocast.h), like aten's convolutions.
template <c10::DeviceType device>
std::tuple<Tensor, Tensor> qconv_autocast(
    const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias, c10::SymIntArrayRef stride,
    c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation, bool transposed, c10::SymIntArrayRef output_padding,
    c10::SymInt groups, std::string_view algorithm, std::optional<std::string_view> activation,
    double negative_slope, std::string_view kind) {
  const LowerPrecision<device> cast;
  return qconv_op().call(
      cast(input), cast(weight), cast(bias), stride, padding, dilation, transposed, output_padding, std::move(groups),
      algorithm, activation, negative_slope, kind);
}

}  // namespace

void set_fallbacks(
    QConvFallback conv, QConvWeightGradFallback weight_grad, QConvWeightBiasGradFallback weight_bias_grad) {
  conv_fallback = std::move(conv);
  weight_grad_fallback = std::move(weight_grad);
  weight_bias_grad_fallback = std::move(weight_bias_grad);
}

void remember_choice(
    const std::string& kind, const std::string& algorithm, const at::Tensor& input, const at::Tensor& other,
    at::IntArrayRef weight_shape, const ConvParams& p, bool fast8, Engine engine) {
  choices.remember(signature(kind, algorithm, input, other, weight_shape, p), Choice{fast8, engine});
}

void forget_choices() {
  choices.forget();
}

int64_t remembered_choices() {
  return choices.size();
}

}  // namespace aqcf

// The schemas are those torch.library.custom_op infers from ops/conv.py's Python signatures, which
// define the ops instead when this extension is not built: programs exported with either agree.
TORCH_LIBRARY(aqcf, m) {
  m.def(
      "qconv(Tensor input, Tensor weight, Tensor? bias, SymInt[] stride, SymInt[] padding, SymInt[] dilation, "
      "bool transposed, SymInt[] output_padding, SymInt groups, str algorithm, str? activation=None, "
      "float negative_slope=0.01, str kind=\"forward\") -> (Tensor, Tensor)");
  m.def(
      "qconv_weight_grad(Tensor input, Tensor grad_output, SymInt[] weight_shape, SymInt[] stride, "
      "SymInt[] padding, SymInt[] dilation, bool transposed, SymInt[] output_padding, SymInt groups, "
      "str algorithm) -> Tensor");
  // qconv_weight_grad's result and the bias gradient (grad_output's sum over every dim but the channels),
  // from one launch where a backend can; no derivative.
  m.def(
      "qconv_weight_bias_grad(Tensor input, Tensor grad_output, SymInt[] weight_shape, SymInt[] stride, "
      "SymInt[] padding, SymInt[] dilation, bool transposed, SymInt[] output_padding, SymInt groups, "
      "str algorithm) -> (Tensor, Tensor)");
  // dL/dz of a fused activation's backward and its sum over every dim but the channels (no derivative).
  m.def(
      "activation_grad_bias(Tensor grad, Tensor y, Tensor pre, str activation, float negative_slope) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(aqcf, CPU, m) {
  m.impl("qconv", &aqcf::qconv_native);
  m.impl("qconv_weight_grad", &aqcf::qconv_weight_grad_native);
  m.impl("qconv_weight_bias_grad", &aqcf::qconv_weight_bias_grad_native);
  m.impl("activation_grad_bias", &aqcf::activation_grad_bias_cpu);
}

// On CUDA the same kernels: a signature the `cuda` backend serves (cuDNN through the ATen path) never
// leaves C++ once remembered; the Python path cost ~0.1 ms of host time a call (README), more than the
// device time of a small layer's conv. activation_grad_bias stays Python's there (one Triton pass).
TORCH_LIBRARY_IMPL(aqcf, CUDA, m) {
  m.impl("qconv", &aqcf::qconv_native);
  m.impl("qconv_weight_grad", &aqcf::qconv_weight_grad_native);
  m.impl("qconv_weight_bias_grad", &aqcf::qconv_weight_bias_grad_native);
}

TORCH_LIBRARY_IMPL(aqcf, AutocastCPU, m) {
  m.impl("qconv", &aqcf::qconv_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(aqcf, AutocastCUDA, m) {
  m.impl("qconv", &aqcf::qconv_autocast<c10::DeviceType::CUDA>);
}

TORCH_LIBRARY_IMPL(aqcf, Autograd, m) {
  m.impl("qconv", &aqcf::qconv_autograd);
  m.impl("qconv_weight_grad", &aqcf::qconv_weight_grad_autograd);
}
