// One direction of a quaternion recurrent layer over a whole sequence, on CPU (float32 and float64):
// the recurrent GEMM of every step (one GEMM on the quaternion weight's components) and a fused element-wise
// cell, forward and backward through time, in one call each.
//
//   gates_t = proj_t + W ⊗ h_{t−1}           proj (T, B, G·H): the input projection of every step
//   rnn:   h_t = act(gates_t)                act tanh | relu
//   lstm:  [i|f|o|g] = gates_t,  c_t = σ(f) c_{t−1} + σ(i) tanh(g),  h_t = σ(o) tanh(c_t)
//   ligru: [a|z] = gates_t,  h_t = σ(z) h_{t−1} + (1 − σ(z)) act(a)   act relu | leaky_relu | tanh
//
// Blocked quaternion layout throughout: W is the quaternion recurrent weight (4, G·H/4, H/4) (index 0..3 =
// r, i, j, k), gate k is columns [k·H, (k+1)·H) of the G·H reals (speechbrain's gate order). The composite PyTorch
// cells of aqcf_kernels/nn/recurrent.py are the reference (aqcf_kernels/ops/rnn_cell.py).
//
// Why one call per sequence: per step the GEMM is small (batch rows only), so the per-step dispatch
// and autograd bookkeeping of a composite cell cost as much as the arithmetic, and autograd's backward
// computes and sums one full (G·H, H) weight gradient per step. Here the backward keeps every step's
// gate gradients (they are the gradient of proj) and forms the weight gradient in one GEMM at the end.
// Each step's product reads the quaternion weight, not the 4x larger expanded one (see rnn_cell.cpp).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

namespace aqcf {

struct RnnOptions {
  std::string mode;          // rnn | lstm | ligru
  std::string nonlinearity;  // rnn: tanh | relu; ligru: relu | leaky_relu | tanh; lstm: ignored
  double negative_slope;
  bool reverse;  // run from the last step to the first
};

// (output (T, B, H), cells (T, B, H) for the LSTM (c_t of every step; else empty), saved (T, B, S):
// what the backward needs besides the outputs — the LSTM's σ(i), σ(f), σ(o), tanh(g); the LiGRU's a and
// σ(z); empty for the RNN).
std::tuple<at::Tensor, at::Tensor, at::Tensor> rnn_sequence_forward(
    const at::Tensor& proj, const at::Tensor& h0, const std::optional<at::Tensor>& c0, const at::Tensor& weight,
    const RnnOptions& o);

// (grad_proj, grad_h0, grad_c0, grad_weight) from the gradients of output and cells (either may be
// undefined: zero) and the forward's results. Undefined where not asked (mask: proj, h0, c0, weight).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_sequence_backward(
    const std::optional<at::Tensor>& grad_output, const std::optional<at::Tensor>& grad_cells,
    const at::Tensor& output, const at::Tensor& cells, const at::Tensor& saved, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& weight, const RnnOptions& o, std::array<bool, 4> mask);

}  // namespace aqcf
