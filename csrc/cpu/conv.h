// Quaternion (transposed) convolution and its weight gradient: on CPU tensors, and on any device as ATen ops.
//
// Same semantics as aqcf_kernels/backends/torch_impl.py: blocked [r|i|j|k] channels, y = W ⊗ x,
// weight (4, out/4, in/4/groups, *k) (transposed: (4, in/4, out/4/groups, *k), the adjoint).
#pragma once

#include <ATen/ATen.h>

#include "activation.h"

#include <optional>
#include <vector>

namespace aqcf {

struct ConvParams {
  std::vector<int64_t> stride, padding, dilation;
  bool transposed;
  std::vector<int64_t> output_padding;
  int64_t groups;
  // CPU float32 real convs keep PyTorch's own kernel choice (its im2col kernels, where its rule prefers
  // them to oneDNN) instead of the extension's route to oneDNN (real_conv.h): the `cpp_im2col` backend.
  // Which is faster at those small sizes depends on the machine, so `auto` times both.
  bool im2col = false;
};

// y = act(W ⊗ x (+ bias)); `fast8` picks Howell & Lafon's 8 dense products over the expanded conv.
// The activation runs in the epilogue: oneDNN's post-op on the expanded conv, fast8's output pass.
at::Tensor conv(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const ConvParams& p,
    bool fast8,
    const Activation& act = {});

// Gradient of <grad_output, conv(input, W)> with respect to W, a tensor of `weight_shape`.
at::Tensor conv_weight_grad(
    const at::Tensor& input,
    const at::Tensor& grad_output,
    at::IntArrayRef weight_shape,
    const ConvParams& p,
    bool fast8);

// The same on any device, as ATen ops only (the `cuda` backend: cuDNN under at::convolution, cuBLAS
// for the weight's expansion and fold): hamilton is the expanded conv (as on CPU); fast8 runs its
// 8 products one after the other on the caller's thread and stream (on CPU the `conv` above runs
// them in parallel items; this path runs on CPU tensors too, so CPU tests prove it).
at::Tensor conv_aten(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const ConvParams& p,
    bool fast8);

at::Tensor conv_weight_grad_aten(
    const at::Tensor& input,
    const at::Tensor& grad_output,
    at::IntArrayRef weight_shape,
    const ConvParams& p,
    bool fast8);

}  // namespace aqcf
