// Quaternion normalisation with one shared variance per quaternion channel, fused with the affine
// map and an activation (CPU; float32 and float64; NCHW-like and channels_last layouts).
//
//   y = act(γ_q · (x − μ_c) · r_q + β_c),   r_q = 1 / sqrt(σ²_q + eps),   σ²_q = Σ_{a∈r,i,j,k} Var(x_{a,q})
//
// c is a real channel of the blocked [r|i|j|k] layout (component a = c / Cq, quaternion channel
// q = c % Cq). Batch norm takes the statistics over batch and space, instance norm (per_sample)
// over space; the composite PyTorch implementation (aqcf_kernels/nn/norm.py) is the reference.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

namespace aqcf {

struct NormOptions {
  bool use_input_stats;  // training (or no running statistics): the input's own statistics
  bool per_sample;       // instance norm
  double eps;
  std::optional<std::string> activation;  // relu | leaky_relu | gelu
  double negative_slope;
};

// (y, mean, var): mean (G, 4Cq) per real channel and the biased shared variance (G, Cq), G = N for
// instance norm and 1 for batch norm; with !use_input_stats they are the running statistics given.
std::tuple<at::Tensor, at::Tensor, at::Tensor> qnorm_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const NormOptions& o);

// (grad_input, grad_weight, grad_bias) of qnorm_forward's y, from the mean and var it returned. In
// training the statistics' dependence on the input is included. Undefined where not asked (mask).
std::tuple<at::Tensor, at::Tensor, at::Tensor> qnorm_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var, const NormOptions& o,
    std::array<bool, 3> mask);

}  // namespace aqcf
