// The real convolutions every quaternion algorithm runs (the expanded conv, fast8's 8 products) and
// their weight gradients: at::convolution / at::convolution_backward, except on CPU float32 inputs
// that PyTorch would hand to its own im2col kernels instead of oneDNN (see real_conv.cpp).
#pragma once

#include "conv.h"

#include <ATen/ATen.h>

#include <optional>

namespace aqcf {

// The memory format a conv's weight is best made in for the input x: channels_last(_3d) when x is,
// else contiguous. PyTorch's CPU (oneDNN) and cuDNN convs convert the weight to the input's format on
// every call: a weight made in that format is read as it is, where a contiguous one costs a copy.
at::MemoryFormat weight_format_for(const at::Tensor& x);

// act(conv(x, w)) or, with p.transposed, the transposed conv; any device. On CPU float32 2d/3d forward
// convs the activation is oneDNN's post-op (mkldnn::_convolution_pointwise, what Inductor fuses to);
// elsewhere it runs in place after the conv.
at::Tensor real_conv(
    const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, const ConvParams& p,
    const Activation& act = {});

// Whether real_conv runs this transposed conv as the forward conv with the flipped weight (the route
// "flipped" below), which swaps the weight's channel dims in a copy.
bool real_conv_flips(const at::Tensor& x, at::IntArrayRef weight_shape, const ConvParams& p);

// Whether real_conv applies `act` as a oneDNN post-op for these arguments (for tests).
bool real_conv_fuses_activation(const at::Tensor& x, const ConvParams& p);

// Gradient w.r.t. the weight (of `shape`) of the NON-transposed real conv gy = conv(x, w); any device.
at::Tensor real_conv_weight_grad(const at::Tensor& x, const at::Tensor& gy, at::IntArrayRef shape, const ConvParams& p);

// Which way real_conv / real_conv_weight_grad would compute these arguments: "aten" (PyTorch's own
// choice), "onednn" (the forward straight to oneDNN), "flipped" (a stride-1 transposed conv as the
// forward conv with the flipped weight), "two_groups" (a strided transposed conv as a 2-group conv
// on the input twice), "two_slabs" (a one-sample weight gradient as two samples). For tests.
const char* real_conv_route(const at::Tensor& x, at::IntArrayRef weight_shape, const ConvParams& p);
const char* real_conv_weight_grad_route(const at::Tensor& x, const at::Tensor& gy, at::IntArrayRef shape, const ConvParams& p);

}  // namespace aqcf
