// The aqcf::qconv and aqcf::qconv_weight_grad operators, registered natively (TORCH_LIBRARY).
//
// Why native: the Python custom op cost ~0.2 ms per call on CPU (dispatch wrappers, argument parsing,
// backend resolution, the autograd Function), 4-5x the compiled conv itself on small layers, three
// times per training step (forward, input gradient, weight gradient). Here the schema, the CPU kernel
// and the autograd formula are C++; Python keeps what only Python knows:
//
//  * which backend and algorithm serve a call (aqcf_kernels.backends: priorities, AQCF_BACKEND,
//    `auto` measured by aqcf_kernels.tuning). The CPU and CUDA kernels ask Python (the fallbacks below)
//    the first time they see a call signature; when the answer is this extension (the `cpp` backend's
//    CPU engine, or the `cuda` backend's ATen path), Python remembers it here (`remember_choice`) and
//    later calls with that signature never leave C++. Python forgets
//    every remembered choice whenever something that decides them changes (`forget_choices`).
//  * the fake (meta) implementations and the kernels of other devices (Python registrations on the
//    same schema).
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "conv.h"

namespace aqcf {

// The Python implementation of qconv's CPU kernel, with plain ints (what aqcf_kernels.ops.conv
// registers): resolves the backend and algorithm, may measure, returns (y, pre).
using QConvFallback = std::function<std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const ConvParams& p,
    const std::string& algorithm, const std::optional<std::string>& activation, double negative_slope,
    const std::string& kind)>;
using QConvWeightGradFallback = std::function<at::Tensor(
    const at::Tensor& input, const at::Tensor& grad_output, const std::vector<int64_t>& weight_shape,
    const ConvParams& p, const std::string& algorithm)>;
// qconv_weight_bias_grad's: (weight gradient, bias gradient) from one launch where the backend can.
using QConvWeightBiasGradFallback = std::function<std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor& input, const at::Tensor& grad_output, const std::vector<int64_t>& weight_shape,
    const ConvParams& p, const std::string& algorithm)>;

void set_fallbacks(
    QConvFallback conv, QConvWeightGradFallback weight_grad, QConvWeightBiasGradFallback weight_bias_grad);

// Which compiled code serves a remembered choice: the CPU engine (conv.h's conv / conv_weight_grad, the
// `cpp` backend; CpuIm2col: the same with ConvParams::im2col, the `cpp_im2col` backend) or the ATen path
// (conv_aten / conv_weight_grad_aten, the `cuda` backend, cuDNN on CUDA).
enum class Engine { Cpu, CpuIm2col, Aten };

// `kind`: 'forward' | 'input_grad' (a qconv call) or 'weight_grad'; `other` is the weight for the
// first two and grad_output for the last. `algorithm` is the caller's ('auto' included); `fast8`
// what served it, with `engine`. Only choices this extension serves are remembered. A signature
// includes the device (the CPU and CUDA kernels share the remembered choices).
void remember_choice(
    const std::string& kind, const std::string& algorithm, const at::Tensor& input, const at::Tensor& other,
    at::IntArrayRef weight_shape, const ConvParams& p, bool fast8, Engine engine);
void forget_choices();
int64_t remembered_choices();

}  // namespace aqcf
