// Host API of the CUDA quaternion convolution (qconv_cuda.cpp). Plain C++: the binding file, compiled
// by the host compiler, includes it under `#ifdef AQCF_WITH_CUDA` and calls aqcf_register_cuda(m).
//
// Same arguments and semantics as the CPU extension's conv / conv_weight_grad (csrc/cpu/conv.h).
#pragma once

#include <torch/extension.h>

#include <optional>
#include <vector>

namespace aqcf {

// y = W ⊗ x (+ bias), or for `transposed` the adjoint conj(W) ⊗ x; `fast8` picks Howell & Lafon's
// 8-product kernel over the 16-product Hamilton kernel. The output has the input's memory format.
at::Tensor cuda_conv(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                     bool transposed, std::vector<int64_t> output_padding, int64_t groups, bool fast8);

// Gradient of <grad_output, conv(input, W)> with respect to W, a tensor of `weight_shape`.
at::Tensor cuda_conv_weight_grad(const at::Tensor& input, const at::Tensor& grad_output,
                                 std::vector<int64_t> weight_shape, std::vector<int64_t> stride,
                                 std::vector<int64_t> padding, std::vector<int64_t> dilation, bool transposed,
                                 std::vector<int64_t> output_padding, int64_t groups, bool fast8);

}  // namespace aqcf

// Adds `cuda_conv` and `cuda_conv_weight_grad` to the extension module.
void aqcf_register_cuda(pybind11::module_& m);
