// The one registration file of aqcf_kernels._C: thin pybind11 wrappers over conv.h (CPU, and the
// device-agnostic ATen path the cuda backend runs), norm.h and op.h.
#include <torch/extension.h>

#include "conv.h"
#include "real_conv.h"
#include "norm.h"
#include "op.h"

namespace {

aqcf::ConvParams params(
    std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
    bool transposed, std::vector<int64_t> output_padding, int64_t groups) {
  return {std::move(stride), std::move(padding), std::move(dilation), transposed, std::move(output_padding), groups};
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
         double negative_slope) {
        return aqcf::conv(
            input, weight, bias,
            params(std::move(stride), std::move(padding), std::move(dilation), transposed, std::move(output_padding), groups),
            fast8, activation_arg(activation, negative_slope));
      },
      "y = act(W ⊗ x (+ bias)): quaternion (transposed) conv; fast8 = 8 dense products, else the expanded conv; "
      "the activation (relu, leaky_relu, gelu) in the conv's epilogue",
      py::arg("input"), py::arg("weight"), py::arg("bias"), py::arg("stride"), py::arg("padding"),
      py::arg("dilation"), py::arg("transposed"), py::arg("output_padding"), py::arg("groups"), py::arg("fast8"),
      py::arg("activation") = py::none(), py::arg("negative_slope") = 0.01, py::call_guard<py::gil_scoped_release>());
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
         std::vector<int64_t> output_padding, int64_t groups, bool fast8) {
        return aqcf::conv_weight_grad(
            input, grad_output, weight_shape,
            params(std::move(stride), std::move(padding), std::move(dilation), transposed, std::move(output_padding), groups),
            fast8);
      },
      "Gradient of <grad_output, conv(input, W)> w.r.t. W (of weight_shape)",
      py::arg("input"), py::arg("grad_output"), py::arg("weight_shape"), py::arg("stride"), py::arg("padding"),
      py::arg("dilation"), py::arg("transposed"), py::arg("output_padding"), py::arg("groups"), py::arg("fast8"),
      py::call_guard<py::gil_scoped_release>());
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
         double negative_slope) {
        const auto p = params(std::move(stride), std::move(padding), std::move(dilation), transposed, std::move(output_padding), groups);
        return std::make_tuple(
            aqcf::real_conv(x, w, bias, p, activation_arg(activation, negative_slope)),
            std::string(aqcf::real_conv_route(x, w.sizes(), p)));
      },
      "(act(real conv or transposed conv of x with w), the route it took)", py::arg("input"), py::arg("weight"),
      py::arg("bias"), py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("transposed"),
      py::arg("output_padding"), py::arg("groups"), py::arg("activation") = py::none(),
      py::arg("negative_slope") = 0.01, py::call_guard<py::gil_scoped_release>());
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
         std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups) {
        const std::vector<int64_t> no_output_padding(stride.size(), 0);
        const auto p = params(std::move(stride), std::move(padding), std::move(dilation), false, no_output_padding, groups);
        return std::make_tuple(
            aqcf::real_conv_weight_grad(x, gy, weight_shape, p),
            std::string(aqcf::real_conv_weight_grad_route(x, gy, weight_shape, p)));
      },
      "(weight gradient of the real conv gy = conv(x, w), the route it took)", py::arg("input"),
      py::arg("grad_output"), py::arg("weight_shape"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
      py::arg("groups"), py::call_guard<py::gil_scoped_release>());
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
        TORCH_CHECK(engine == "cpu" || engine == "aten", "engine must be 'cpu' or 'aten', got '", engine, "'");
        aqcf::remember_choice(
            kind, algorithm, input, other, weight_shape,
            params(std::move(stride), std::move(padding), std::move(dilation), transposed, std::move(output_padding), groups),
            fast8, engine == "cpu" ? aqcf::Engine::Cpu : aqcf::Engine::Aten);
      },
      "Serve later calls with this signature in C++ (other: the weight, or grad_output for 'weight_grad'); "
      "engine 'cpu' (the compiled CPU conv) or 'aten' (conv_aten, the cuda backend's path)",
      py::arg("kind"), py::arg("algorithm"), py::arg("input"), py::arg("other"), py::arg("weight_shape"),
      py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("transposed"), py::arg("output_padding"),
      py::arg("groups"), py::arg("fast8"), py::arg("engine"));
  m.def("_forget_conv_choices", &aqcf::forget_choices, "Drop every remembered choice (the dispatch state changed)");
  m.def("_remembered_conv_choices", &aqcf::remembered_choices, "How many call signatures are served in C++");
}
