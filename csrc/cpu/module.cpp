// The one registration file of aqcf_kernels._C: thin pybind11 wrappers over conv.h (CPU) and, in a
// CUDA build (-DAQCF_WITH_CUDA, see setup.py), the CUDA entry points of csrc/cuda.
#include <torch/extension.h>

#include "conv.h"
#ifdef AQCF_WITH_CUDA
#include "../cuda/qconv_cuda.h"
#endif

namespace {

aqcf::ConvParams params(
    std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
    bool transposed, std::vector<int64_t> output_padding, int64_t groups) {
  return {std::move(stride), std::move(padding), std::move(dilation), transposed, std::move(output_padding), groups};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "aqcf-kernels compiled CPU backend: quaternion (transposed) conv and its weight gradient";
  m.def(
      "conv",
      [](const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
         std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation, bool transposed,
         std::vector<int64_t> output_padding, int64_t groups, bool fast8) {
        return aqcf::conv(
            input, weight, bias,
            params(std::move(stride), std::move(padding), std::move(dilation), transposed, std::move(output_padding), groups),
            fast8);
      },
      "y = W ⊗ x (+ bias): quaternion (transposed) conv; fast8 = 8 dense products, else the expanded conv",
      py::arg("input"), py::arg("weight"), py::arg("bias"), py::arg("stride"), py::arg("padding"),
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
#ifdef AQCF_WITH_CUDA
  aqcf_register_cuda(m);
#endif
}
