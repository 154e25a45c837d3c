// The one registration file of aqcf_kernels._C: thin pybind11 wrappers over conv.h (CPU, and the
// device-agnostic ATen path the cuda backend runs), norm.h, op.h and attention_op.h.
#include <torch/extension.h>

#include "attention_op.h"
#include "choices.h"
#include "conv.h"
#include "real_conv.h"
#include "norm.h"
#include "norm_op.h"
#include "op.h"

namespace {

aqcf::ConvParams params(
    std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
    bool transposed, std::vector<int64_t> output_padding, int64_t groups, bool im2col = false) {
  return {std::move(stride), std::move(padding), std::move(dilation), transposed, std::move(output_padding), groups, im2col};
}

// Python callables called from the CPU and CUDA kernels of aqcf::qconv / aqcf::qconv_weight_grad /
// aqcf::qconv_weight_bias_grad (op.h). They are never destroyed: the dispatcher may outlive the
// interpreter's teardown of module globals.
void set_fallbacks(py::function conv, py::function weight_grad, py::function weight_bias_grad) {
  auto* conv_fn = new py::function(std::move(conv));
  auto* weight_grad_fn = new py::function(std::move(weight_grad));
  auto* weight_bias_grad_fn = new py::function(std::move(weight_bias_grad));
  aqcf::set_fallbacks(
      [conv_fn](const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                const aqcf::ConvParams& p, const std::string& algorithm, const std::optional<std::string>& activation,
                double negative_slope, const std::string& kind) {
        py::gil_scoped_acquire gil;
        return (*conv_fn)(input, weight, bias, p.stride, p.padding, p.dilation, p.transposed, p.output_padding,
                          p.groups, algorithm, activation, negative_slope, kind)
            .cast<std::tuple<at::Tensor, at::Tensor>>();
      },
      [weight_grad_fn](const at::Tensor& input, const at::Tensor& grad_output, const std::vector<int64_t>& shape,
                       const aqcf::ConvParams& p, const std::string& algorithm) {
        py::gil_scoped_acquire gil;
        return (*weight_grad_fn)(input, grad_output, shape, p.stride, p.padding, p.dilation, p.transposed,
                                 p.output_padding, p.groups, algorithm)
            .cast<at::Tensor>();
      },
      [weight_bias_grad_fn](const at::Tensor& input, const at::Tensor& grad_output, const std::vector<int64_t>& shape,
                            const aqcf::ConvParams& p, const std::string& algorithm) {
        py::gil_scoped_acquire gil;
        return (*weight_bias_grad_fn)(input, grad_output, shape, p.stride, p.padding, p.dilation, p.transposed,
                                      p.output_padding, p.groups, algorithm)
            .cast<std::tuple<at::Tensor, at::Tensor>>();
      });
}

// A Python function as a C++ fallback with the same arguments: called with the GIL held, its result cast
// to R. Never destroyed either (see set_fallbacks).
template <typename R>
auto through_python(py::function fn) {
  auto* f = new py::function(std::move(fn));
  return [f](const auto&... args) {
    py::gil_scoped_acquire gil;
    return (*f)(args...).template cast<R>();
  };
}

// The Python implementations of the attention ops (attention_op.h).
void set_attention_fallbacks(
    py::function cross_attention, py::function cross_attention_backward, py::function gated_residual,
    py::function gated_residual_backward, py::function composite_cross_attention_backward,
    py::function composite_gated_residual_backward) {
  aqcf::AttentionFallbacks fns;
  fns.cross_attention = through_python<aqcf::Tensors4>(std::move(cross_attention));
  fns.cross_attention_backward = through_python<aqcf::Tensors6>(std::move(cross_attention_backward));
  fns.gated_residual = through_python<at::Tensor>(std::move(gated_residual));
  fns.gated_residual_backward = through_python<aqcf::Tensors3>(std::move(gated_residual_backward));
  fns.composite_cross_attention_backward =
      through_python<aqcf::Tensors6>(std::move(composite_cross_attention_backward));
  fns.composite_gated_residual_backward = through_python<aqcf::Tensors3>(std::move(composite_gated_residual_backward));
  aqcf::set_attention_fallbacks(std::move(fns));
}

// The Python functions of the norm ops (norm_op.h).
void set_norm_fallbacks(py::function qnorm, py::function qnorm_backward, py::function composite_backward) {
  aqcf::NormFallbacks fns;
  fns.qnorm = through_python<aqcf::NormTensors>(std::move(qnorm));
  fns.qnorm_backward = through_python<aqcf::NormTensors>(std::move(qnorm_backward));
  fns.composite_backward = through_python<aqcf::OptionalNormTensors>(std::move(composite_backward));
  aqcf::set_norm_fallbacks(std::move(fns));
}

// The activation arguments of the Python entry points (None: none).
aqcf::Activation activation_arg(const std::optional<std::string>& name, double negative_slope) {
  return aqcf::parse_activation(name ? std::optional<std::string_view>(*name) : std::nullopt, negative_slope);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "aqcf-kernels compiled CPU backend: quaternion (transposed) conv and its weight gradient";
  m.def(
      "conv",
      [](const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
         std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation, bool transposed,
         std::vector<int64_t> output_padding, int64_t groups, bool fast8, std::optional<std::string> activation,
         double negative_slope, bool im2col) {
        return aqcf::conv(
            input, weight, bias,
            params(std::move(stride), std::move(padding), std::move(dilation), transposed, std::move(output_padding), groups,
                   im2col),
            fast8, activation_arg(activation, negative_slope));
      },
      "y = act(W ⊗ x (+ bias)): quaternion (transposed) conv; fast8 = 8 dense products, else the expanded conv; "
      "the activation (relu, leaky_relu, gelu) in the conv's epilogue; im2col: the real convs keep PyTorch's own "
      "kernel choice (no route to oneDNN)",
      py::arg("input"), py::arg("weight"), py::arg("bias"), py::arg("stride"), py::arg("padding"),
      py::arg("dilation"), py::arg("transposed"), py::arg("output_padding"), py::arg("groups"), py::arg("fast8"),
      py::arg("activation") = py::none(), py::arg("negative_slope") = 0.01, py::arg("im2col") = false,
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "conv_aten",
      [](const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
         std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation, bool transposed,
         std::vector<int64_t> output_padding, int64_t groups, bool fast8) {
        return aqcf::conv_aten(
            input, weight, bias,
            params(std::move(stride), std::move(padding), std::move(dilation), transposed, std::move(output_padding), groups),
            fast8);
      },
      "conv on any device as ATen ops (the cuda backend: cuDNN under at::convolution); fast8's products in sequence",
      py::arg("input"), py::arg("weight"), py::arg("bias"), py::arg("stride"), py::arg("padding"),
      py::arg("dilation"), py::arg("transposed"), py::arg("output_padding"), py::arg("groups"), py::arg("fast8"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "conv_weight_grad_aten",
      [](const at::Tensor& input, const at::Tensor& grad_output, std::vector<int64_t> weight_shape,
         std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation, bool transposed,
         std::vector<int64_t> output_padding, int64_t groups, bool fast8) {
        return aqcf::conv_weight_grad_aten(
            input, grad_output, weight_shape,
            params(std::move(stride), std::move(padding), std::move(dilation), transposed, std::move(output_padding), groups),
            fast8);
      },
      "conv_weight_grad on any device as ATen ops (the cuda backend)",
      py::arg("input"), py::arg("grad_output"), py::arg("weight_shape"), py::arg("stride"), py::arg("padding"),
      py::arg("dilation"), py::arg("transposed"), py::arg("output_padding"), py::arg("groups"), py::arg("fast8"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "conv_weight_grad",
      [](const at::Tensor& input, const at::Tensor& grad_output, std::vector<int64_t> weight_shape,
         std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation, bool transposed,
         std::vector<int64_t> output_padding, int64_t groups, bool fast8, bool im2col) {
        return aqcf::conv_weight_grad(
            input, grad_output, weight_shape,
            params(std::move(stride), std::move(padding), std::move(dilation), transposed, std::move(output_padding), groups,
                   im2col),
            fast8);
      },
      "Gradient of <grad_output, conv(input, W)> w.r.t. W (of weight_shape); im2col as for conv",
      py::arg("input"), py::arg("grad_output"), py::arg("weight_shape"), py::arg("stride"), py::arg("padding"),
      py::arg("dilation"), py::arg("transposed"), py::arg("output_padding"), py::arg("groups"), py::arg("fast8"),
      py::arg("im2col") = false, py::call_guard<py::gil_scoped_release>());
  m.def(
      "qnorm_forward",
      [](const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
         const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
         bool use_input_stats, bool per_sample, double eps, std::optional<std::string> activation,
         double negative_slope) {
        return aqcf::qnorm_forward(
            input, weight, bias, running_mean, running_var,
            {use_input_stats, per_sample, eps, std::move(activation), negative_slope});
      },
      "Quaternion shared-variance norm + affine + activation: (y, mean, var)", py::arg("input"), py::arg("weight"),
      py::arg("bias"), py::arg("running_mean"), py::arg("running_var"), py::arg("use_input_stats"),
      py::arg("per_sample"), py::arg("eps"), py::arg("activation"), py::arg("negative_slope"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "qnorm_backward",
      [](const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
         const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var, bool use_input_stats,
         bool per_sample, double eps, std::optional<std::string> activation, double negative_slope,
         std::vector<bool> needs) {
        TORCH_CHECK(needs.size() == 3, "qnorm_backward: needs has 3 entries");
        auto [gx, gw, gb] = aqcf::qnorm_backward(
            grad_output, input, weight, bias, mean, var,
            {use_input_stats, per_sample, eps, std::move(activation), negative_slope}, {needs[0], needs[1], needs[2]});
        auto maybe = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
        return std::make_tuple(maybe(gx), maybe(gw), maybe(gb));
      },
      "Gradients of qnorm_forward's y w.r.t. input, weight, bias (None where not needed)",
      py::arg("grad_output"), py::arg("input"), py::arg("weight"), py::arg("bias"), py::arg("mean"), py::arg("var"),
      py::arg("use_input_stats"), py::arg("per_sample"), py::arg("eps"), py::arg("activation"),
      py::arg("negative_slope"), py::arg("needs"), py::call_guard<py::gil_scoped_release>());
  // The real convs under both algorithms (real_conv.h), and which way they compute: for the tests.
  m.def(
      "_real_conv",
      [](const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, std::vector<int64_t> stride,
         std::vector<int64_t> padding, std::vector<int64_t> dilation, bool transposed,
         std::vector<int64_t> output_padding, int64_t groups, std::optional<std::string> activation,
         double negative_slope, bool im2col) {
        const auto p = params(
            std::move(stride), std::move(padding), std::move(dilation), transposed, std::move(output_padding), groups, im2col);
        return std::make_tuple(
            aqcf::real_conv(x, w, bias, p, activation_arg(activation, negative_slope)),
            std::string(aqcf::real_conv_route(x, w.sizes(), p)));
      },
      "(act(real conv or transposed conv of x with w), the route it took)", py::arg("input"), py::arg("weight"),
      py::arg("bias"), py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("transposed"),
      py::arg("output_padding"), py::arg("groups"), py::arg("activation") = py::none(),
      py::arg("negative_slope") = 0.01, py::arg("im2col") = false, py::call_guard<py::gil_scoped_release>());
  m.def(
      "_real_conv_route",
      [](const at::Tensor& x, std::vector<int64_t> weight_shape, std::vector<int64_t> stride,
         std::vector<int64_t> padding, std::vector<int64_t> dilation, bool transposed,
         std::vector<int64_t> output_padding, int64_t groups) {
        const auto p = params(std::move(stride), std::move(padding), std::move(dilation), transposed, std::move(output_padding), groups);
        return std::string(aqcf::real_conv_route(x, weight_shape, p));
      },
      "The route _real_conv takes for such an input and weight shape, without computing it ('aten': PyTorch's own "
      "choice)",
      py::arg("input"), py::arg("weight_shape"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
      py::arg("transposed"), py::arg("output_padding"), py::arg("groups"));
  m.def(
      "_real_conv_fuses_activation",
      [](const at::Tensor& x, bool transposed) {
        const std::vector<int64_t> none;
        return aqcf::real_conv_fuses_activation(x, {none, none, none, transposed, none, 1});
      },
      "Whether _real_conv applies an activation as oneDNN's post-op for such an input", py::arg("input"),
      py::arg("transposed"));
  m.def(
      "_real_conv_weight_grad",
      [](const at::Tensor& x, const at::Tensor& gy, std::vector<int64_t> weight_shape, std::vector<int64_t> stride,
         std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups, bool im2col) {
        const std::vector<int64_t> no_output_padding(stride.size(), 0);
        const auto p =
            params(std::move(stride), std::move(padding), std::move(dilation), false, no_output_padding, groups, im2col);
        return std::make_tuple(
            aqcf::real_conv_weight_grad(x, gy, weight_shape, p),
            std::string(aqcf::real_conv_weight_grad_route(x, gy, weight_shape, p)));
      },
      "(weight gradient of the real conv gy = conv(x, w), the route it took)", py::arg("input"),
      py::arg("grad_output"), py::arg("weight_shape"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
      py::arg("groups"), py::arg("im2col") = false, py::call_guard<py::gil_scoped_release>());
  m.def("_set_fallbacks", &set_fallbacks,
        "The Python implementations of aqcf::qconv, aqcf::qconv_weight_grad and aqcf::qconv_weight_bias_grad "
        "the CPU and CUDA kernels ask first",
        py::arg("conv"), py::arg("weight_grad"), py::arg("weight_bias_grad"));
  m.def(
      "_remember_conv_choice",
      [](const std::string& kind, const std::string& algorithm, const at::Tensor& input, const at::Tensor& other,
         std::vector<int64_t> weight_shape, std::vector<int64_t> stride, std::vector<int64_t> padding,
         std::vector<int64_t> dilation, bool transposed, std::vector<int64_t> output_padding, int64_t groups,
         bool fast8, const std::string& engine) {
        TORCH_CHECK(engine == "cpu" || engine == "cpu_im2col" || engine == "aten",
                    "engine must be 'cpu', 'cpu_im2col' or 'aten', got '", engine, "'");
        aqcf::remember_choice(
            kind, algorithm, input, other, weight_shape,
            params(std::move(stride), std::move(padding), std::move(dilation), transposed, std::move(output_padding), groups),
            fast8,
            engine == "cpu" ? aqcf::Engine::Cpu : engine == "cpu_im2col" ? aqcf::Engine::CpuIm2col : aqcf::Engine::Aten);
      },
      "Serve later calls with this signature in C++ (other: the weight, or grad_output for 'weight_grad'); "
      "engine 'cpu' (the compiled CPU conv), 'cpu_im2col' (the same with PyTorch's own real-conv kernels, the "
      "cpp_im2col backend) or 'aten' (conv_aten, the cuda backend's path)",
      py::arg("kind"), py::arg("algorithm"), py::arg("input"), py::arg("other"), py::arg("weight_shape"),
      py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("transposed"), py::arg("output_padding"),
      py::arg("groups"), py::arg("fast8"), py::arg("engine"));
  m.def("_set_attention_fallbacks", &set_attention_fallbacks,
        "The Python implementations of aqcf::cross_attention, aqcf::cross_attention_backward, "
        "aqcf::gated_residual and aqcf::gated_residual_backward the CPU and CUDA kernels ask first, and the "
        "differentiable gradients through the composite attention and gate (create_graph=True)",
        py::arg("cross_attention"), py::arg("cross_attention_backward"), py::arg("gated_residual"),
        py::arg("gated_residual_backward"), py::arg("composite_cross_attention_backward"),
        py::arg("composite_gated_residual_backward"));
  m.def(
      "_remember_attention_choice",
      [](const at::Tensor& q_a, const at::Tensor& k_a, const at::Tensor& v_a, const at::Tensor& q_b,
         const at::Tensor& k_b, const at::Tensor& v_b, const std::string& kernel_a, const std::string& kernel_b) {
        aqcf::remember_attention_choice(
            q_a, k_a, v_a, q_b, k_b, v_b, aqcf::parse_attention_kernel(kernel_a), aqcf::parse_attention_kernel(kernel_b));
      },
      "Serve later cross_attention calls (and their backward) with these inputs' signature in C++, direction a "
      "(q_a against k_b, v_b) with kernel_a and b with kernel_b: 'cpu_flash', 'cpu_flash_float32', 'flash' or "
      "'efficient'",
      py::arg("q_a"), py::arg("k_a"), py::arg("v_a"), py::arg("q_b"), py::arg("k_b"), py::arg("v_b"),
      py::arg("kernel_a"), py::arg("kernel_b"));
  m.def("_remember_gate_choice", &aqcf::remember_gate_choice,
        "Serve later gated_residual calls (f, or grad for its backward, and gate_logits like these) in C++",
        py::arg("f"), py::arg("gate_logits"));
  m.def("_forget_attention_choices", &aqcf::forget_attention_choices,
        "Drop every remembered attention and gate choice (the dispatch state changed)");
  m.def("_remembered_attention_choices", &aqcf::remembered_attention_choices,
        "How many attention and gate call signatures are served in C++");
  m.def(
      "attention_forward",
      [](const std::string& kernel, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
        return aqcf::attention_forward(aqcf::parse_attention_kernel(kernel), q, k, v, scale);
      },
      "(out, lse) of PyTorch's attention kernel 'cpu_flash', 'cpu_flash_float32', 'flash' or 'efficient', as the native "
      "cross_attention calls it",
      py::arg("kernel"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("scale"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "attention_backward",
      [](const std::string& kernel, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
         const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale) {
        return aqcf::attention_backward(aqcf::parse_attention_kernel(kernel), grad_out, q, k, v, out, lse, scale);
      },
      "(dq, dk, dv) of PyTorch's attention kernel, as the native cross_attention_backward calls it",
      py::arg("kernel"), py::arg("grad_out"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
      py::arg("lse"), py::arg("scale"), py::call_guard<py::gil_scoped_release>());
  m.def("_set_norm_fallbacks", &set_norm_fallbacks,
        "The Python functions of aqcf::qnorm and aqcf::qnorm_backward the CPU kernels ask first, and the "
        "composite backward of a differentiable gradient",
        py::arg("qnorm"), py::arg("qnorm_backward"), py::arg("composite_backward"));
  m.def("_remember_norm_choice", &aqcf::remember_norm_choice,
        "Serve later qnorm calls (and their backward) with inputs like this one by the compiled CPU kernels",
        py::arg("input"));
  m.def("_update_running_stats", &aqcf::update_running_stats,
        "torch.nn.BatchNorm's in-place update of running_mean and running_var from one training call's "
        "statistics (mean, biased var; a batch's per-sample statistics are averaged), count values each",
        py::arg("running_mean"), py::arg("running_var"), py::arg("mean"), py::arg("var"), py::arg("count"),
        py::arg("momentum"));
  m.def("_forget_norm_choices", &aqcf::forget_norm_choices, "Drop every remembered norm choice");
  m.def("_remembered_norm_choices", &aqcf::remembered_norm_choices, "How many norm signatures are served in C++");
  m.def("_forget_conv_choices", &aqcf::forget_choices, "Drop every remembered choice (the dispatch state changed)");
  m.def(
      "_set_forced_backend", [](std::string name) { aqcf::forced_backend().set(std::move(name)); },
      "The backend aqcf_kernels.backends.use() forces now ('' for none): a part of every remembered signature",
      py::arg("name"));
  m.def("_remembered_conv_choices", &aqcf::remembered_choices, "How many call signatures are served in C++");
}
