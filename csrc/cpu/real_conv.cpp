#include "real_conv.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <vector>

namespace aqcf {
namespace {

// PyTorch's CPU conv sends float32 inputs of ONE sample with few channels to its own im2col kernels
// (slow_conv2d / slow_conv3d / slow_conv_transpose*) instead of oneDNN: its rule (ConvParams::use_mkldnn
// in aten/src/ATen/native/Convolution.cpp) keeps those "for some case, native is faster". On the 3D
// model (batch 1) nearly every fast8 product and the small expanded convs matched it, and oneDNN was
// 2-16x faster there (Intel Xeon, 2 threads, 1x16x32³ 16->16 3x3x3: forward 26.3 ms vs 1.8 ms; the
// stride-1 transposed conv of 1x4x64³ 4->4: 54.6 ms vs 3.4 ms; weight gradient of 1x16x32³: 25.0 vs
// 3.6 ms). Whether PyTorch's own choice stands: it is oneDNN already, or not a case of that rule. The
// rule, after PyTorch views a 1-d conv as 2-d (N, C, 1, L):
bool all_of(const std::vector<int64_t>& v, int64_t value) {
  return std::all_of(v.begin(), v.end(), [value](int64_t e) { return e == value; });
}

bool pytorch_choice_stands(const at::Tensor& x, at::IntArrayRef weight_shape, const ConvParams& p) {
  if (!x.device().is_cpu() || x.scalar_type() != at::kFloat) return true;  // not a case of the rule
  if (!at::hasMKLDNN() || !at::globalContext().userEnabledMkldnn()) return true;  // nothing to route to
  if (p.transposed) {
    for (size_t d = 0; d < p.stride.size(); ++d)
      if (p.output_padding[d] >= p.stride[d]) return true;  // oneDNN can't take it either
  }
  const auto kernel = weight_shape.slice(2);
  const int64_t k_last = kernel.back(), k_before = kernel.size() > 1 ? kernel[kernel.size() - 2] : 1;
  const bool not_single_thread_1x1 = !all_of(p.stride, 1) || !all_of(p.dilation, 1) || x.size(0) >= 16 ||
      k_last != 1 || k_before != 1 || at::get_num_threads() > 1;
  const int64_t leading = x.size(0) * x.size(1) * x.size(2) * (x.dim() > 3 ? x.size(3) : 1);
  return not_single_thread_1x1 &&
      (p.groups > 1 || (k_last > 3 && k_before > 3) || x.size(0) > 1 || leading > 20480);
}

std::vector<int64_t> spatial_dims(int64_t dim) {
  std::vector<int64_t> dims;
  for (int64_t d = 2; d < dim; ++d) dims.push_back(d);
  return dims;
}

// The weight argument of a weight-gradient call, which reads only its shape. PyTorch's backward still
// makes it contiguous in the input's memory format: an uninitialised one in that format costs nothing,
// where a broadcast scalar was copied out in full on every call.
at::Tensor shape_only_weight(const at::Tensor& x, at::IntArrayRef shape) {
  return at::empty(shape, x.options().memory_format(weight_format_for(x)));
}

// A stride-1 transposed conv is the forward conv with the weight flipped and its two channel dims
// swapped, padded by the kernel's extent minus the transposed conv's padding.
bool flippable(at::IntArrayRef weight_shape, const ConvParams& p) {
  if (!all_of(p.stride, 1) || !all_of(p.output_padding, 0)) return false;
  for (size_t d = 0; d < p.padding.size(); ++d)
    if (p.padding[d] > p.dilation[d] * (weight_shape[2 + d] - 1)) return false;
  return true;
}

at::Tensor flipped_transposed_conv(
    const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, const ConvParams& p) {
  const at::Tensor wf = w.transpose(0, 1).flip(spatial_dims(w.dim())).contiguous();
  std::vector<int64_t> padding(p.padding.size());
  for (size_t d = 0; d < padding.size(); ++d) padding[d] = p.dilation[d] * (w.size(2 + d) - 1) - p.padding[d];
  const std::vector<int64_t> ones(p.stride.size(), 1);
  return at::mkldnn_convolution(x.contiguous(x.suggest_memory_format()), wf, bias, padding, ones, p.dilation, 1);
}

// A one-group transposed conv as a 2-group one on the input twice: group g computes output channels
// [g*h, (g+1)*h) from its copy (weight (in, out, *k) -> (2*in, out/2, *k)). Same multiplications;
// PyTorch sends grouped convs to oneDNN. The copy of x is small next to the conv.
at::Tensor two_group_transposed_conv(
    const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, const ConvParams& p) {
  const int64_t h = w.size(1) / 2;
  const at::Tensor w2 = at::cat({w.narrow(1, 0, h), w.narrow(1, h, h)}, 0);
  return at::convolution(at::cat({x, x}, 1), w2, bias, p.stride, p.padding, p.dilation, true, p.output_padding, 2);
}

// Whether this call runs PyTorch's own non-oneDNN kernels: the caller asked for PyTorch's choice
// (p.im2col) where it differs from the extension's routes.
bool kept_off_onednn(const at::Tensor& x, at::IntArrayRef weight_shape, const ConvParams& p) {
  return p.im2col && !pytorch_choice_stands(x, weight_shape, p);
}

enum class Route { Aten, OneDnn, Flipped, TwoGroups };

Route conv_route(const at::Tensor& x, at::IntArrayRef weight_shape, const ConvParams& p) {
  if (p.im2col || pytorch_choice_stands(x, weight_shape, p)) return Route::Aten;
  if (!p.transposed) return Route::OneDnn;
  // The transposed routes rewrite a one-group conv. PyTorch's choice does not stand for a grouped one either
  // where it is a single-threaded 1x1 conv (as every fast8 product is: each runs on one thread), and the
  // flipped route once ran it as one group (a grouped 1x1 quaternion conv's input gradient had half its
  // channels).
  if (p.groups != 1) return Route::Aten;
  if (flippable(weight_shape, p)) return Route::Flipped;
  return weight_shape[1] % 2 == 0 ? Route::TwoGroups : Route::Aten;
}

// The weight gradient of a one-sample conv as the gradient over TWO samples: the output rows (first
// spatial dim) split in halves, each sample the input rows its half reads (zero rows where the
// conv pads, or past an odd last half). The same sum of products, so the same gradient; two samples
// go to oneDNN. Copies x and gy once (small next to the correlation). One sample only: PyTorch's
// choice does not stand for a few samples of a single-threaded 1x1 conv either (pytorch_choice_stands),
// and the slabs of sample 0 alone were once taken for the gradient of all of them (a fast8 1x1 weight
// gradient, whose products run one thread each, was 35-100% off from batch 2 on).
bool two_slabs_fit(const at::Tensor& x, const at::Tensor& gy, at::IntArrayRef shape, const ConvParams& p) {
  return x.size(0) == 1 && !p.transposed && !p.im2col && gy.size(2) >= 2 && !pytorch_choice_stands(x, shape, p);
}

at::Tensor two_slab_weight_grad(const at::Tensor& x, const at::Tensor& gy, at::IntArrayRef shape, const ConvParams& p) {
  const int64_t rows_out = gy.size(2), half = (rows_out + 1) / 2;
  const int64_t s = p.stride[0], pad = p.padding[0], extent = p.dilation[0] * (shape[2] - 1);
  const int64_t slab = (half - 1) * s + extent + 1;  // input rows one half reads
  // Each sample written once into zeros (no padded copy of x or gy first: the peak stays two copies).
  std::vector<int64_t> shape_x = x.sizes().vec(), shape_gy = gy.sizes().vec();
  shape_x[0] = shape_gy[0] = 2;
  shape_x[2] = slab;
  shape_gy[2] = half;
  const at::Tensor x2 = at::zeros(shape_x, x.options().memory_format(x.suggest_memory_format()));
  const at::Tensor gy2 = at::zeros(shape_gy, gy.options().memory_format(gy.suggest_memory_format()));
  for (int64_t i = 0; i < 2; ++i) {
    const int64_t first = i * half * s - pad;  // the input row of the sample's row 0
    const int64_t lo = std::max<int64_t>(0, first), hi = std::min<int64_t>(x.size(2), first + slab);
    if (hi > lo) x2[i].narrow(1, lo - first, hi - lo).copy_(x[0].narrow(1, lo, hi - lo));
    const int64_t rows = std::min(half, rows_out - i * half);
    gy2[i].narrow(1, 0, rows).copy_(gy[0].narrow(1, i * half, rows));
  }
  std::vector<int64_t> padding = p.padding;
  padding[0] = 0;  // the rows carry their padding
  const at::Tensor w = shape_only_weight(x, shape);
  const std::vector<int64_t> no_output_padding(p.stride.size(), 0);
  return std::get<1>(at::convolution_backward(
      gy2, x2, w, std::nullopt, p.stride, padding, p.dilation, false, no_output_padding, p.groups, {false, true, false}));
}

// PyTorch's CPU bf16 conv weight gradient (oneDNN's kernel; torch 2.13 on an AMD EPYC with avx512_bf16) is garbage,
// 1 to 1e35 off, inf or NaN, where the kernel (its dilated extent) is larger than its input along some spatial dim:
// a depth-2 map under a 3-deep kernel (a 3d U-Net's bottleneck), a width-1 map under a 3-wide one, in 1d, 2d and 3d,
// transposed convs (whose weight gradient correlates the output gradient with the input) included. Measured over
// random geometries of maps 1-5 wide: 14 of 101 such bf16 weight gradients wrong, none of the 571 others (230 bf16, 341
// fp16), none of ~150 with maps 6-12 wide. Its forward and input gradient are right, and so is the float32
// weight gradient, which these take instead (the upcast copies are small: such a map is at most a few wide).
// The torch backend's twin: backends/torch/conv.py, bf16_kernel_larger_than_input.
bool bf16_kernel_larger_than_input(const at::Tensor& x, at::IntArrayRef shape, at::IntArrayRef dilation) {
  if (x.scalar_type() != at::kBFloat16 || !x.device().is_cpu()) return false;
  for (int64_t d = 0; d + 2 < x.dim(); ++d) {
    if (dilation[d] * (shape[d + 2] - 1) + 1 > x.size(d + 2)) return true;
  }
  return false;
}

// PyTorch's float32 CPU conv (oneDNN's kernel; torch 2.13, AMD EPYC) computes garbage, ~100% off, for a
// one-channel input whose channel stride is 1 (a channel sliced out of a channels_last map: fast8's component
// slices of a one-quaternion-channel input), which PyTorch takes for channels_last, where the output's last dim is 1
// and strided over, in 2d and 3d. Given the channel stride of a channels-first map instead (the same memory: a dim
// of size 1 has no stride of its own), it is right. The torch backend's twin: backends/torch/conv.py. (A weight of
// one input channel per group is given the same.)
at::Tensor one_channel_as_channels_first(const at::Tensor& x) {
  if (x.dim() < 3 || x.size(1) != 1 || x.stride(1) == x.size(2) * x.stride(2)) return x;
  std::vector<int64_t> strides = x.strides().vec();
  strides[1] = x.size(2) * x.stride(2);
  return x.as_strided(x.sizes(), strides);
}

// Without activation: the route conv_route names.
at::Tensor routed_conv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, const ConvParams& p) {
  switch (conv_route(x, w.sizes(), p)) {
    case Route::OneDnn:
      return at::mkldnn_convolution(
          x.contiguous(x.suggest_memory_format()), w.contiguous(weight_format_for(x)), bias, p.padding, p.stride,
          p.dilation, p.groups);
    case Route::Flipped:
      return flipped_transposed_conv(x, w, bias, p);
    case Route::TwoGroups:
      return two_group_transposed_conv(x, w, bias, p);
    case Route::Aten:
      break;
  }
  return at::convolution(x, w, bias, p.stride, p.padding, p.dilation, p.transposed, p.output_padding, p.groups);
}

// oneDNN's conv with an eltwise post-op, as PyTorch registers it for Inductor's CPU fusions
// (mkldnn::_convolution_pointwise); absent from a build without oneDNN.
using PointwiseConv = at::Tensor(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef,
    at::IntArrayRef, int64_t, c10::string_view, c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>);

const c10::TypedOperatorHandle<PointwiseConv>* pointwise_conv_op() {
  static const c10::TypedOperatorHandle<PointwiseConv>* op = []() -> const c10::TypedOperatorHandle<PointwiseConv>* {
    auto handle = c10::Dispatcher::singleton().findSchema({"mkldnn::_convolution_pointwise", ""});
    if (!handle) return nullptr;
    return new c10::TypedOperatorHandle<PointwiseConv>(handle->typed<PointwiseConv>());
  }();
  return op;
}

at::Tensor pointwise_conv(
    const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, const ConvParams& p,
    const Activation& act) {
  c10::List<std::optional<at::Scalar>> scalars;
  std::string_view attr = "relu";
  std::optional<c10::string_view> algorithm;
  if (act.kind == Act::Leaky) {
    attr = "leaky_relu";
    scalars.push_back(at::Scalar(act.negative_slope));
  } else if (act.kind == Act::Gelu) {
    attr = "gelu";
    algorithm = "none";  // the erf form, as at::gelu's default
  }
  return pointwise_conv_op()->call(
      x.contiguous(x.suggest_memory_format()), w.contiguous(weight_format_for(x)), bias, p.padding, p.stride,
      p.dilation, p.groups, attr, scalars, algorithm);
}

}  // namespace

at::MemoryFormat weight_format_for(const at::Tensor& x) {
  const at::MemoryFormat f = x.suggest_memory_format();
  return f == at::MemoryFormat::ChannelsLast || f == at::MemoryFormat::ChannelsLast3d ? f : at::MemoryFormat::Contiguous;
}

bool real_conv_flips(const at::Tensor& x, at::IntArrayRef weight_shape, const ConvParams& p) {
  return p.transposed && conv_route(x, weight_shape, p) == Route::Flipped;
}

bool real_conv_fuses_activation(const at::Tensor& x, const ConvParams& p) {
  // Forward 2d/3d float32 CPU convs: oneDNN serves them anyway (PyTorch's rule or our OneDnn route),
  // so the post-op changes nothing but the extra pass over the output it saves.
  return !p.transposed && x.device().is_cpu() && x.scalar_type() == at::kFloat && (x.dim() == 4 || x.dim() == 5) &&
      at::hasMKLDNN() && at::globalContext().userEnabledMkldnn() && pointwise_conv_op() != nullptr;
}

// A kernel one tap wide in a dim reads the same input whatever its dilation there, and the output's size does not
// depend on it either; yet oneDNN's conv (torch 2.13, AMD EPYC) segfaults on a dilated one-wide kernel with a bias
// where every output position of that dim reads only padding (a width-1 channels_last float32 map under padding 1,
// stride 2, dilation 2; tests/nn/test_unit_grid.py found it, PyTorch's own routing keeps such a conv off oneDNN).
// Such a dilation is 1 on every route.
ConvParams undilated_single_taps(at::IntArrayRef weight_shape, const ConvParams& p) {
  ConvParams q = p;
  for (size_t d = 0; d < q.dilation.size(); ++d)
    if (weight_shape[2 + d] == 1) q.dilation[d] = 1;
  return q;
}

at::Tensor real_conv(
    const at::Tensor& x_in, const at::Tensor& w_in, const std::optional<at::Tensor>& bias_in, const ConvParams& p_in,
    const Activation& act) {
  // (the weight too: PyTorch runs channels_last where either is, and a channels_last weight would take x back there)
  const at::Tensor x = one_channel_as_channels_first(x_in), w = one_channel_as_channels_first(w_in);
  // oneDNN reads the bias as dense memory whatever its strides: a strided view's gaps were added as bias values
  // (PyTorch's own conv hands it a contiguous bias; at::convolution does that itself).
  const std::optional<at::Tensor> bias = bias_in ? std::optional<at::Tensor>(bias_in->contiguous()) : std::nullopt;
  const ConvParams p = undilated_single_taps(w.sizes(), p_in);
  if (!act.any()) return routed_conv(x, w, bias, p);
  if (real_conv_fuses_activation(x, p) && !kept_off_onednn(x, w.sizes(), p)) return pointwise_conv(x, w, bias, p, act);
  at::Tensor y = routed_conv(x, w, bias, p);
  activate_(y, act);
  return y;
}

at::Tensor real_conv_weight_grad(
    const at::Tensor& x, const at::Tensor& gy, at::IntArrayRef shape, const ConvParams& p_in) {
  const ConvParams p = undilated_single_taps(shape, p_in);
  if (bf16_kernel_larger_than_input(x, shape, p.dilation)) {
    return real_conv_weight_grad(x.to(at::kFloat), gy.to(at::kFloat), shape, p).to(at::kBFloat16);
  }
  if (two_slabs_fit(x, gy, shape, p)) return two_slab_weight_grad(x, gy, shape, p);
  const at::Tensor w = shape_only_weight(x, shape);
  const std::vector<int64_t> no_output_padding(p.stride.size(), 0);
  return std::get<1>(at::convolution_backward(
      gy, x, w, std::nullopt, p.stride, p.padding, p.dilation, false, no_output_padding, p.groups,
      {false, true, false}));
}

const char* real_conv_route(const at::Tensor& x, at::IntArrayRef weight_shape, const ConvParams& p) {
  switch (conv_route(x, weight_shape, undilated_single_taps(weight_shape, p))) {
    case Route::OneDnn:
      return "onednn";
    case Route::Flipped:
      return "flipped";
    case Route::TwoGroups:
      return "two_groups";
    case Route::Aten:
      break;
  }
  return "aten";
}

const char* real_conv_weight_grad_route(const at::Tensor& x, const at::Tensor& gy, at::IntArrayRef shape, const ConvParams& p) {
  if (bf16_kernel_larger_than_input(x, shape, p.dilation)) return "float32";
  return two_slabs_fit(x, gy, shape, undilated_single_taps(shape, p)) ? "two_slabs" : "aten";
}

}  // namespace aqcf
