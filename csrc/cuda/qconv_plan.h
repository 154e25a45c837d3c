// Host-side planning of the CUDA quaternion convolution launches: argument checks, output allocation,
// the weight in GEMM order and the kernels' Geometry. Device-independent ATen code (it runs on CPU
// tensors too), so it is compiled with the C++ compiler (qconv_cuda.cpp) and nvcc sees only launches, and the same planning
// can drive a host emulation of the kernels in tests.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "qconv_geometry.h"

namespace aqcf {
namespace cuda {

// (N, C, *S) with 1-3 spatial dims -> (N, C, D, H, W) by inserting size-1 dims (a view).
inline at::Tensor as_5d(at::Tensor t) {
  while (t.dim() < 5) t = t.unsqueeze(2);
  return t;
}

inline int checked_int(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(), "aqcf cuda: ", what, " = ", v,
              " is negative or does not fit the kernels' 32-bit index");
  return static_cast<int>(v);
}

// A per-dim value (stride, padding, kernel size, ...) of an n-d conv as 3 values, the leading
// (size-1) dims filled with `fill`.
inline void spatial3(at::IntArrayRef v, int64_t n, int fill, int out[3], const char* name) {
  TORCH_CHECK(static_cast<int64_t>(v.size()) == n, "aqcf cuda: ", name, " must have ", n, " elements for a ", n,
              "d conv, got ", at::IntArrayRef(v));
  for (int d = 0; d < 3; ++d) out[d] = d < 3 - n ? fill : checked_int(v[d - (3 - n)], name);
}

// Geometry of a conv from x (N, 4*cq_in, *in) to y (N, 4*cq_out, *out) with a (4, ., ., *kernel) weight.
inline Geometry make_geometry(const at::Tensor& x, const at::Tensor& y, at::IntArrayRef kernel, int64_t groups,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const int64_t n = x.dim() - 2;
  Geometry g{};
  g.groups = checked_int(groups, "groups");
  g.cq_in = checked_int(x.size(1) / 4, "input quaternion channels");
  g.cq_out = checked_int(y.size(1) / 4, "output quaternion channels");
  g.cg_in = g.cq_in / g.groups;
  g.cg_out = g.cq_out / g.groups;
  spatial3(kernel, n, 1, g.kernel, "kernel size");
  spatial3(stride, n, 1, g.stride, "stride");
  spatial3(padding, n, 0, g.pad, "padding");
  spatial3(dilation, n, 1, g.dil, "dilation");
  const at::Tensor x5 = as_5d(x), y5 = as_5d(y);
  for (int d = 0; d < 3; ++d) {
    g.in[d] = checked_int(x5.size(2 + d), "input spatial size");
    g.out[d] = checked_int(y5.size(2 + d), "output spatial size");
    TORCH_CHECK(g.kernel[d] >= 1 && g.stride[d] >= 1 && g.dil[d] >= 1, "aqcf cuda: kernel size ",
                at::IntArrayRef(kernel), ", stride ", at::IntArrayRef(stride), " and dilation ", at::IntArrayRef(dilation),
                " must be positive");
  }
  for (int d = 0; d < 5; ++d) {
    g.sx[d] = x5.stride(d);
    g.sy[d] = y5.stride(d);
  }
  return g;
}

inline void check_same(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.device() == like.device(), "aqcf cuda: ", name, " is on ", t.device(), " but input is on ",
              like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "aqcf cuda: ", name, " dtype ", t.scalar_type(),
              " does not match input dtype ", like.scalar_type());
}

// Elements of a staged K x N operand slice are assigned to threads channel-fastest when channels are
// the densest dim (channels_last), pixel-fastest otherwise: coalescing only, never the result.
inline bool channels_fast(const at::Tensor& t) {
  const at::Tensor t5 = as_5d(t);
  return t5.stride(1) < t5.stride(4);
}

struct ConvPlan {
  at::Tensor y;                 // the output (the input's memory format)
  at::Tensor w;                 // the weight in GEMM order [4][groups][taps][cg_in][cg_out], contiguous
  std::optional<at::Tensor> b;  // contiguous bias
  Geometry g;
  int64_t M = 0;  // output pixels, N * OD * OH * OW
};

inline ConvPlan plan_conv(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed,
                          at::IntArrayRef output_padding, int64_t groups) {
  check_same(weight, input, "weight");
  TORCH_CHECK(input.is_floating_point(), "aqcf cuda_conv: input must be floating point, got ", input.scalar_type());
  const int64_t n = input.dim() - 2;
  TORCH_CHECK(n >= 1 && n <= 3, "aqcf cuda_conv: input must be 3-D, 4-D or 5-D (N, C, *spatial), got shape ",
              at::IntArrayRef(input.sizes()));
  TORCH_CHECK(weight.dim() == n + 3 && weight.size(0) == 4, "aqcf cuda_conv: weight must have shape (4, A, B, *k) with ",
              n, " kernel dims, got ", at::IntArrayRef(weight.sizes()));
  TORCH_CHECK(groups >= 1, "aqcf cuda_conv: groups must be positive, got ", groups);
  TORCH_CHECK(input.size(1) % (4 * groups) == 0, "aqcf cuda_conv: input has ", input.size(1),
              " channels, not a multiple of 4 * groups = ", 4 * groups);
  const int64_t cq_in = input.size(1) / 4, a = weight.size(1), b = weight.size(2);
  int64_t cq_out;
  if (transposed) {  // weight (4, Cq_in, Cq_out / G, *k)
    TORCH_CHECK(a == cq_in, "aqcf cuda_conv: transposed weight ", at::IntArrayRef(weight.sizes()), " must have size ", cq_in,
                " (input quaternion channels) at dim 1");
    cq_out = b * groups;
  } else {  // weight (4, Cq_out, Cq_in / G, *k)
    TORCH_CHECK(b * groups == cq_in && a % groups == 0, "aqcf cuda_conv: weight ", at::IntArrayRef(weight.sizes()),
                " does not fit ", input.size(1), " input channels with groups=", groups,
                "; expected (4, out/4 (a multiple of groups), ", cq_in / groups, ", *k)");
    cq_out = a;
  }
  TORCH_CHECK(static_cast<int64_t>(stride.size()) == n && static_cast<int64_t>(padding.size()) == n &&
                  static_cast<int64_t>(dilation.size()) == n && (!transposed || static_cast<int64_t>(output_padding.size()) == n),
              "aqcf cuda_conv: stride, padding, dilation (and output_padding) must have ", n, " elements each");
  std::vector<int64_t> out_shape{input.size(0), 4 * cq_out};
  for (int64_t d = 0; d < n; ++d) {
    const int64_t i = input.size(2 + d), k = weight.size(3 + d);
    const int64_t s = stride[d], p = padding[d], dl = dilation[d];
    TORCH_CHECK(k >= 1 && s >= 1 && dl >= 1 && p >= 0, "aqcf cuda_conv: invalid kernel ", at::IntArrayRef(weight.sizes().slice(3)),
                ", stride ", at::IntArrayRef(stride), ", padding ", at::IntArrayRef(padding), " or dilation ", at::IntArrayRef(dilation));
    const int64_t o = transposed ? (i - 1) * s - 2 * p + dl * (k - 1) + output_padding[d] + 1
                                 : (i + 2 * p - dl * (k - 1) - 1) / s + 1;
    TORCH_CHECK(o >= 1, "aqcf cuda_conv: input spatial size ", at::IntArrayRef(input.sizes().slice(2)),
                " is too small for kernel ", at::IntArrayRef(weight.sizes().slice(3)));
    out_shape.push_back(o);
  }

  ConvPlan plan;
  if (bias.has_value() && bias->defined()) {
    check_same(*bias, input, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == 4 * cq_out, "aqcf cuda_conv: bias must have shape (", 4 * cq_out,
                ",), got ", at::IntArrayRef(bias->sizes()));
    plan.b = bias->contiguous();
  }
  // Outputs follow the input's memory format (channels_last in, channels_last out), like torch.
  plan.y = at::empty(out_shape, input.options().memory_format(input.suggest_memory_format()));
  const int64_t taps = c10::multiply_integers(weight.sizes().slice(3));
  const int64_t cg_in = cq_in / groups, cg_out = cq_out / groups;
  // GEMM order, out-channels fastest for coalesced staging (the weight is small: one copy per call).
  plan.w = transposed ? weight.reshape({4, groups, cg_in, cg_out, taps}).permute({0, 1, 4, 2, 3}).contiguous()
                      : weight.reshape({4, groups, cg_out, cg_in, taps}).permute({0, 1, 4, 3, 2}).contiguous();
  plan.g = make_geometry(input, plan.y, weight.sizes().slice(3), groups, stride, padding, dilation);
  plan.M = plan.y.size(0) * c10::multiply_integers(plan.y.sizes().slice(2));
  return plan;
}

struct WgradPlan {
  at::Tensor x, gy;  // gy = conv(x, W): input and grad_output, swapped for a transposed conv
  at::Tensor gw;     // (4, cq_out, cg_in, taps), zeros, float (double for double inputs)
  Geometry g;
  int64_t P = 0;  // pixels of gy, N * OD * OH * OW: the reduction
};

inline WgradPlan plan_wgrad(const at::Tensor& input, const at::Tensor& grad_output, at::IntArrayRef weight_shape,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed,
                            int64_t groups) {
  check_same(grad_output, input, "grad_output");
  TORCH_CHECK(input.is_floating_point(), "aqcf cuda_conv_weight_grad: input must be floating point, got ",
              input.scalar_type());
  const int64_t n = input.dim() - 2;
  TORCH_CHECK(n >= 1 && n <= 3 && grad_output.dim() == input.dim(),
              "aqcf cuda_conv_weight_grad: input and grad_output must both be 3-D, 4-D or 5-D, got ",
              at::IntArrayRef(input.sizes()), " and ", at::IntArrayRef(grad_output.sizes()));
  TORCH_CHECK(static_cast<int64_t>(weight_shape.size()) == n + 3 && weight_shape[0] == 4,
              "aqcf cuda_conv_weight_grad: weight_shape must be (4, A, B, *k) with ", n, " kernel dims, got ",
              at::IntArrayRef(weight_shape));
  TORCH_CHECK(groups >= 1, "aqcf cuda_conv_weight_grad: groups must be positive, got ", groups);
  TORCH_CHECK(input.size(0) == grad_output.size(0), "aqcf cuda_conv_weight_grad: batch sizes differ: ",
              at::IntArrayRef(input.sizes()), " vs ", at::IntArrayRef(grad_output.sizes()));

  WgradPlan plan;
  // The transposed conv's weight gradient is the conv's with input and grad_output swapped
  // (<gy, convT(x, W)> = <conv(gy, W), x>).
  plan.x = transposed ? grad_output : input;
  plan.gy = transposed ? input : grad_output;
  TORCH_CHECK(plan.x.size(1) % (4 * groups) == 0 && plan.gy.size(1) % (4 * groups) == 0,
              "aqcf cuda_conv_weight_grad: channels of input ", at::IntArrayRef(input.sizes()), " and grad_output ",
              at::IntArrayRef(grad_output.sizes()), " must be multiples of 4 * groups = ", 4 * groups);
  const int64_t cq_in = plan.x.size(1) / 4, cq_out = plan.gy.size(1) / 4;
  TORCH_CHECK(weight_shape[1] == cq_out && weight_shape[2] * groups == cq_in, "aqcf cuda_conv_weight_grad: weight_shape ",
              at::IntArrayRef(weight_shape), " does not fit input ", at::IntArrayRef(input.sizes()), " and grad_output ",
              at::IntArrayRef(grad_output.sizes()), " with groups=", groups, " (transposed=", transposed, ")");
  const at::ScalarType acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t taps = c10::multiply_integers(weight_shape.slice(3));
  plan.gw = at::zeros({4, cq_out, cq_in / groups, taps}, input.options().dtype(acc));
  plan.g = make_geometry(plan.x, plan.gy, weight_shape.slice(3), groups, stride, padding, dilation);
  plan.P = plan.gy.size(0) * c10::multiply_integers(plan.gy.sizes().slice(2));
  return plan;
}

// How to split the weight gradient's pixel reduction: enough blocks for `target_blocks` (a few per
// SM; atomics combine the splits), each split a whole number of BK-pixel slices.
struct PixelSplit {
  int64_t splits, per_split;
};

inline PixelSplit split_pixels(int64_t P, int64_t other_blocks, int64_t target_blocks, int64_t max_splits, int bk) {
  const int64_t slices = std::max<int64_t>(1, (P + bk - 1) / bk);
  int64_t splits = std::max<int64_t>(1, target_blocks / std::max<int64_t>(1, other_blocks));
  splits = std::max<int64_t>(1, std::min({splits, slices, max_splits}));
  const int64_t per_split = ((slices + splits - 1) / splits) * bk;
  return {std::max<int64_t>(1, (P + per_split - 1) / per_split), per_split};
}

}  // namespace cuda
}  // namespace aqcf
