#include "conv.h"

#include "fast8.h"
#include "real_conv.h"

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>

namespace aqcf {
namespace {

// HAMILTON[c][a] = (p, sign) of aqcf_kernels/reference.py: output component c receives
// sign * (W_p * x_a).
constexpr int kHamiltonComponent[4][4] = {{0, 1, 2, 3}, {1, 0, 3, 2}, {2, 3, 0, 1}, {3, 2, 1, 0}};
constexpr int kHamiltonSign[4][4] = {{+1, -1, -1, -1}, {+1, +1, -1, +1}, {+1, +1, +1, -1}, {+1, -1, +1, +1}};

// S[4c + a, p] = sign iff W_p feeds block (c, a) of the expanded weight. Expansion is S @ W and
// the weight-gradient fold is its adjoint S^T @ gE: one table, adjoint by construction. Made once per
// device and dtype (read-only): on a GPU a fresh one would be a host-to-device copy in every call.
at::Tensor hamilton_matrix(const at::TensorOptions& options) {
  static std::mutex mutex;
  // never destroyed: tensors of a device must not be freed after its runtime has shut down
  static auto* made = new std::map<std::tuple<int, int, int>, at::Tensor>();
  const std::tuple<int, int, int> key{
      static_cast<int>(options.device().type()), options.device().index(),
      static_cast<int>(c10::typeMetaToScalarType(options.dtype()))};
  std::lock_guard<std::mutex> lock(mutex);
  auto it = made->find(key);
  if (it != made->end()) return it->second;
  c10::InferenceMode normal_tensor(false);  // not an inference tensor, whatever mode the first call ran in
  at::Tensor s = at::zeros({16, 4}, at::kDouble);
  auto acc = s.accessor<double, 2>();
  for (int c = 0; c < 4; ++c)
    for (int a = 0; a < 4; ++a) acc[4 * c + a][kHamiltonComponent[c][a]] = kHamiltonSign[c][a];
  return made->emplace(key, s.to(options)).first->second;
}

// The shape expand_weight makes of a (4, A, B, *k) weight: (4*A, 4*B, *k).
std::vector<int64_t> expanded_shape(at::IntArrayRef weight_shape) {
  std::vector<int64_t> shape{4 * weight_shape[1], 4 * weight_shape[2]};
  shape.insert(shape.end(), weight_shape.begin() + 3, weight_shape.end());
  return shape;
}

// (4, G*Ag, B, *k) -> (G*4*Ag, 4*B, *k): each group's expanded weight, stacked group-major, i.e.
// the weight of one real conv with `groups=G` on a group-major tensor (expand_weight_grouped).
// Written once, in `format`. Channels_last is (out, *k, in) in memory: the small quaternion weight
// is put in (4, A, *k, B) order first, so the expansion's one big copy moves whole rows of B.
at::Tensor expand_weight(const at::Tensor& w, int64_t groups, at::MemoryFormat format = at::MemoryFormat::Contiguous) {
  const int64_t a = w.size(1), b = w.size(2), taps = w.numel() / (4 * a * b);
  const auto kernel = w.sizes().slice(3);
  const at::Tensor s = hamilton_matrix(w.options());
  if (format == at::MemoryFormat::Contiguous) {
    return at::mm(s, w.reshape({4, -1}))  // (c, a, G, Ag, B, taps)
        .view({4, 4, groups, a / groups, b, taps})
        .permute({2, 0, 3, 1, 4, 5})
        .reshape(expanded_shape(w.sizes()));
  }
  const at::Tensor w_last = w.reshape({4, a, b, taps}).transpose(2, 3).reshape({4, -1});  // (4, A, taps, B)
  std::vector<int64_t> shape{4 * a}, order{0, w.dim() - 2};  // (out, *k, in) -> dims (out, in, *k)
  shape.insert(shape.end(), kernel.begin(), kernel.end());
  shape.push_back(4 * b);
  for (int64_t d = 1; d <= static_cast<int64_t>(kernel.size()); ++d) order.push_back(d);
  return at::mm(s, w_last)  // (c, a, G, Ag, taps, B)
      .view({4, 4, groups, a / groups, taps, b})
      .permute({2, 0, 3, 4, 1, 5})
      .reshape(shape)
      .permute(order);
}

// Adjoint of expand_weight: (G*4*Ag, 4*B, *k) -> weight_shape (fold_weight_grad_grouped).
at::Tensor fold_weight_grad(const at::Tensor& grad_expanded, at::IntArrayRef weight_shape, int64_t groups) {
  const int64_t a = weight_shape[1], b = weight_shape[2], taps = grad_expanded.numel() / (16 * a * b);
  at::Tensor e = grad_expanded.reshape({groups, 4, a / groups, 4, b, taps}).permute({1, 3, 0, 2, 4, 5}).reshape({16, -1});
  return at::mm(hamilton_matrix(e.options()).t(), e).view(weight_shape);
}

// The memory format a conv's weight is made in: its input's channels_last (weight_format_for), except for
// a transposed conv that real_conv flips: that swap of the weight's channel dims gathers with a stride of
// (taps x channels) elements from a channels_last weight (3d 64q: 3.9 ms, against 1.4 ms for each of
// the two copies from a contiguous one).
at::MemoryFormat weight_layout(const at::Tensor& x, at::IntArrayRef weight_shape, const ConvParams& p) {
  return real_conv_flips(x, weight_shape, p) ? at::MemoryFormat::Contiguous : weight_format_for(x);
}

// Reorders dim 1 from [a][b][rest] to [b][a][rest], keeping the memory format (channels_last in,
// channels_last out). (a, b) = (4, G) turns blocked [r|i|j|k] (each block split in G groups) into
// group-major [g0: r i j k | g1: ...], so torch's `groups` sees whole quaternions; (G, 4) undoes it.
at::Tensor swap_channel_factors(const at::Tensor& x, int64_t a, int64_t b) {
  if (a == 1 || b == 1) return x;
  auto split = [&](int64_t outer, int64_t inner) {
    std::vector<int64_t> sizes = x.sizes().vec();
    sizes[1] /= outer * inner;
    sizes.insert(sizes.begin() + 1, {outer, inner});
    return sizes;
  };
  at::Tensor out = at::empty_like(x, x.options(), x.suggest_memory_format());
  out.view(split(b, a)).copy_(x.reshape(split(a, b)).transpose(1, 2));
  return out;
}

// Blocked [r|i|j|k] components along dim 1 (views).
std::array<at::Tensor, 4> blocks(const at::Tensor& t) {
  auto c = t.chunk(4, 1);
  return {c[0], c[1], c[2], c[3]};
}

// Components of a (4, ...) weight-shaped tensor (views).
std::array<at::Tensor, 4> components(const at::Tensor& t) {
  return {t.select(0, 0), t.select(0, 1), t.select(0, 2), t.select(0, 3)};
}

std::vector<int64_t> output_shape(const at::Tensor& x, const at::Tensor& w, const ConvParams& p) {
  std::vector<int64_t> shape{x.size(0), 4 * (p.transposed ? w.size(2) * p.groups : w.size(1))};
  for (size_t d = 0; d < p.stride.size(); ++d) {
    const int64_t in = x.size(2 + d), span = p.dilation[d] * (w.size(3 + d) - 1);
    shape.push_back(
        p.transposed ? (in - 1) * p.stride[d] - 2 * p.padding[d] + span + p.output_padding[d] + 1
                     : (in + 2 * p.padding[d] - span - 1) / p.stride[d] + 1);
  }
  return shape;
}

// fast8 runs its 8 products on batch slices: every transformed operand is read by the product
// right after it is written, and every product by the combine pass right after, so slices whose
// components are ~kSliceBytes keep that traffic in cache rather than DRAM (and bound the extra
// memory to a few slices). Samples are independent in a conv; weight gradients sum over them.
// 1 MiB beat 2 MiB in one-process A/B runs (2 threads, fwd+bwd): 2d 64q N8 64² 1.3x, 1d 64q 1.07x,
// 2d and 3d 32q within 3%; slices never go below one sample.
constexpr int64_t kSliceBytes = 1 << 20;

int64_t batch_slice(const at::Tensor& a, const at::Tensor& b) {
  auto component_bytes = [](const at::Tensor& t) {
    return t.numel() / std::max<int64_t>(1, 4 * t.size(0)) * t.element_size();
  };
  return std::max<int64_t>(1, kSliceBytes / std::max<int64_t>(1, std::max(component_bytes(a), component_bytes(b))));
}

// A 1x1 conv (or transposed conv) with unit stride, no padding and one group: a GEMM over tokens.
bool is_pointwise(at::IntArrayRef weight_shape, const ConvParams& p) {
  auto all_equal = [](at::IntArrayRef v, int64_t value) {
    return std::all_of(v.begin(), v.end(), [value](int64_t e) { return e == value; });
  };
  return all_equal(weight_shape.slice(3), 1) && all_equal(p.stride, 1) && all_equal(p.padding, 0) &&
      all_equal(p.output_padding, 0) && p.groups == 1;
}

// A pointwise quaternion conv as ONE batched GEMM on the expanded weight: oneDNN ran a 1x1 conv well
// below its GEMM speed on these shapes (64q, 1k-4k tokens: ~4x the time of a matmul with the same
// weight), and the A-QCF block's projections and quaternion_linear are all pointwise. A transposed
// pointwise conv is the transposed matrix. (backends/torch/conv.py: pointwise_conv)
at::Tensor conv_pointwise(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, const ConvParams& p) {
  at::Tensor e = expand_weight(w, 1).flatten(1);
  if (p.transposed) e = e.t();
  at::Tensor y;
  if (x.size(0) == 1) {
    // One sample (the A-QCF block's projections on a batch-1 volume): one GEMM with the bias as its
    // addend, no batch dim to broadcast the weight over (at::matmul's bmm path and a separate bias add
    // cost ~5 µs of host time a call on CPU).
    const at::Tensor tokens = x.reshape({x.size(1), -1});
    y = bias ? at::addmm(bias->unsqueeze(1), e, tokens) : at::mm(e, tokens);
  } else {
    y = at::matmul(e, x.reshape({x.size(0), x.size(1), -1}));
    if (bias) y = y.add(bias->unsqueeze(1));
  }
  std::vector<int64_t> shape{x.size(0), e.size(0)};
  shape.insert(shape.end(), x.sizes().begin() + 2, x.sizes().end());
  return y.view(shape);
}

// Weight gradient of the non-transposed pointwise conv: sum over the batch of gy_b x_b^T, folded. One
// matmul over (sample, token) pairs: at::einsum did the same, after ~10 us of host time parsing its
// equation (a views-only reshape with batch 1; else one copy of each operand, as einsum's).
at::Tensor conv_pointwise_weight_grad(const at::Tensor& x, const at::Tensor& gy, at::IntArrayRef weight_shape) {
  auto samples_tokens = [](const at::Tensor& t) {  // (C, B*N)
    return t.reshape({t.size(0), t.size(1), -1}).transpose(0, 1).reshape({t.size(1), -1});
  };
  const at::Tensor ge = at::mm(samples_tokens(gy), samples_tokens(x).t());
  std::vector<int64_t> expanded{ge.size(0), ge.size(1)};
  expanded.insert(expanded.end(), weight_shape.begin() + 3, weight_shape.end());
  return fold_weight_grad(ge.reshape(expanded), weight_shape, 1);
}

at::Tensor conv_hamilton(
    const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, const ConvParams& p,
    const Activation& act) {
  if (is_pointwise(w.sizes(), p)) {
    at::Tensor y = conv_pointwise(x, w, bias, p);
    activate_(y, act);
    return y;
  }
  const int64_t g = p.groups;
  std::optional<at::Tensor> b;  // the conv adds it, in the conv's (group-major) channel order
  if (bias) b = swap_channel_factors(bias->view({1, -1}), 4, g).view(-1);
  // (an elementwise activation commutes with the channel reordering)
  const at::Tensor xg = swap_channel_factors(x, 4, g);
  const at::Tensor y = real_conv(xg, expand_weight(w, g, weight_layout(xg, expanded_shape(w.sizes()), p)), b, p, act);
  return swap_channel_factors(y, g, 4);
}

// `in_sequence`: the products one after the other on the caller's thread (any device); else in parallel
// items on batch slices (CPU).
at::Tensor conv_fast8(
    const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, const ConvParams& p,
    bool in_sequence, const Activation& act) {
  // The output pass writes straight into y, so y is born in the layout the op layer returns.
  at::Tensor y = at::empty(output_shape(x, w, p), x.options().memory_format(x.suggest_memory_format()));
  std::array<at::Tensor, 4> b;
  if (bias) {
    std::vector<int64_t> shape(y.dim(), 1);
    shape[1] = -1;
    for (int c = 0; c < 4; ++c) b[c] = bias->chunk(4)[c].view(shape);
  }
  // Groups partition the quaternion channels inside each component block, which is exactly
  // torch's `groups` on one component: every product is a plain (grouped) real conv. A transposed
  // conv is the adjoint, conj(W) ⊗ x with transposed products.
  const std::array<at::Tensor, 4> x_blocks = blocks(x);
  const int64_t slice = in_sequence ? x.size(0) : batch_slice(x, y);
  // (the weight's layout as the first slice's products read it)
  const at::Tensor x_product = x_blocks[0].narrow(0, 0, std::min(x.size(0), slice));
  const QuaternionOperand weight{
      components(w), p.transposed, /*batched=*/false, weight_layout(x_product, w.sizes().slice(1), p)};
  auto product = [&](const at::Tensor& wm, const at::Tensor& xm) { return real_conv(xm, wm, std::nullopt, p); };
  if (in_sequence) {
    fast8_hamilton_product_in_sequence(weight, {x_blocks}, product, blocks(y), b, act);
    return y;
  }
  // relu and leaky_relu ride in the output pass for free; GELU's erf does not vectorise there, and
  // ATen's own gelu after the pass is faster (2d 32q B4 64², Intel Xeon, 2 threads: 30 vs 12 ms).
  const bool after = act.kind == Act::Gelu;
  fast8_hamilton_product(
      weight, {x_blocks}, product, blocks(y),
      /*out_batched=*/true, b, {x.size(0), slice}, after ? Activation{} : act);
  if (after) activate_(y, act);
  return y;
}

void check_args(const at::Tensor& input, int64_t weight_dim, const ConvParams& p, const char* fn, bool cpu = true) {
  const size_t n = input.dim() - 2;
  TORCH_CHECK(!cpu || input.device().is_cpu(), "aqcf_kernels._C.", fn, ": expects CPU tensors, got ", input.device());
  TORCH_CHECK(input.dim() >= 3 && weight_dim == input.dim() + 1,
      "aqcf_kernels._C.", fn, ": input must be (N, C, *spatial) and weight (4, A, B, *kernel), got dims ",
      input.dim(), " and ", weight_dim);
  TORCH_CHECK(p.stride.size() == n && p.padding.size() == n && p.dilation.size() == n && p.output_padding.size() == n,
      "aqcf_kernels._C.", fn, ": stride, padding, dilation and output_padding need ", n, " entries each");
  TORCH_CHECK(p.groups >= 1 && input.size(1) % (4 * p.groups) == 0,
      "aqcf_kernels._C.", fn, ": ", input.size(1), " channels are not a multiple of 4 * groups = ", 4 * p.groups);
}

void check_same_device(
    const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& c, const char* fn) {
  TORCH_CHECK(a.device() == b.device() && (!c || c->device() == a.device()),
      "aqcf_kernels._C.", fn, ": every tensor must be on one device, got ", a.device(), " and ",
      (a.device() != b.device() ? b.device() : c->device()));
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && (!c || c->scalar_type() == a.scalar_type()),
      "aqcf_kernels._C.", fn, ": every tensor must have one dtype, got ", a.scalar_type(), " and ",
      (a.scalar_type() != b.scalar_type() ? b.scalar_type() : c->scalar_type()));
}

}  // namespace

at::Tensor conv(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const ConvParams& p,
    bool fast8,
    const Activation& act) {
  check_args(input, weight.dim(), p, "conv");
  return fast8 ? conv_fast8(input, weight, bias, p, /*in_sequence=*/false, act)
               : conv_hamilton(input, weight, bias, p, act);
}

namespace {

// The weight gradient; `in_sequence`: fast8's products one after the other (any device).
at::Tensor weight_grad(
    const at::Tensor& input,
    const at::Tensor& grad_output,
    at::IntArrayRef weight_shape,
    const ConvParams& p,
    bool fast8,
    bool in_sequence) {
  // For y = convT(x, W), <gy, convT(x, W)> = <conv(gy, W), x>: the weight gradient of the
  // non-transposed conv with the roles of input and grad_output swapped.
  const at::Tensor& x = p.transposed ? grad_output : input;
  const at::Tensor& gy = p.transposed ? input : grad_output;
  ConvParams q = p;
  q.transposed = false;
  std::fill(q.output_padding.begin(), q.output_padding.end(), 0);

  if (!fast8 && is_pointwise(weight_shape, q)) return conv_pointwise_weight_grad(x, gy, weight_shape);
  if (!fast8) {
    const int64_t g = q.groups;
    const at::Tensor ge = real_conv_weight_grad(
        swap_channel_factors(x, 4, g), swap_channel_factors(gy, 4, g), expanded_shape(weight_shape), q);
    return fold_weight_grad(ge, weight_shape, g);
  }
  at::Tensor gw = at::empty(weight_shape, input.options());
  // gW = gy ⊗ conj(x), each product a weight-gradient correlation; the sum over batch slices.
  const std::vector<int64_t> component_shape(weight_shape.begin() + 1, weight_shape.end());
  auto product = [&](const at::Tensor& gm, const at::Tensor& xm) {
    return real_conv_weight_grad(xm, gm, component_shape, q);
  };
  if (in_sequence) {
    fast8_hamilton_product_in_sequence({blocks(gy)}, {blocks(x), /*conjugate=*/true}, product, components(gw), {});
  } else {
    fast8_hamilton_product(
        {blocks(gy)}, {blocks(x), /*conjugate=*/true}, product, components(gw), /*out_batched=*/false, {},
        {x.size(0), batch_slice(x, gy)});
  }
  return gw;
}

}  // namespace

at::Tensor conv_weight_grad(
    const at::Tensor& input,
    const at::Tensor& grad_output,
    at::IntArrayRef weight_shape,
    const ConvParams& p,
    bool fast8) {
  check_args(input, weight_shape.size(), p, "conv_weight_grad");
  return weight_grad(input, grad_output, weight_shape, p, fast8, /*in_sequence=*/false);
}

at::Tensor conv_aten(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const ConvParams& p,
    bool fast8) {
  check_args(input, weight.dim(), p, "conv_aten", /*cpu=*/false);
  check_same_device(input, weight, bias, "conv_aten");
  return fast8 ? conv_fast8(input, weight, bias, p, /*in_sequence=*/true, {}) : conv_hamilton(input, weight, bias, p, {});
}

at::Tensor conv_weight_grad_aten(
    const at::Tensor& input,
    const at::Tensor& grad_output,
    at::IntArrayRef weight_shape,
    const ConvParams& p,
    bool fast8) {
  check_args(input, weight_shape.size(), p, "conv_weight_grad_aten", /*cpu=*/false);
  check_same_device(input, grad_output, std::nullopt, "conv_weight_grad_aten");
  return weight_grad(input, grad_output, weight_shape, p, fast8, /*in_sequence=*/true);
}

}  // namespace aqcf
