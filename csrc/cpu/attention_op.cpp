#include "attention_op.h"

#include "autocast.h"
#include "below_autograd.h"
#include "choices.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <initializer_list>
#include <optional>
#include <string>
#include <utility>

namespace aqcf {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ------------------------------------------------------------------------------------------------
// Choices remembered from Python
// ------------------------------------------------------------------------------------------------

RememberedChoices<std::pair<AttentionKernel, AttentionKernel>> attention_choices;  // kernels of a, b
RememberedChoices<bool> gate_choices;
AttentionFallbacks fallbacks;

// What Python's choice depends on beyond signature_start's: the tensors' dtypes, sizes and strides
// (PyTorch's kernel eligibility checks read all of them) and the thread count (a half-precision CPU route is
// measured per thread count: backends/torch/attention.py, _half_route_fast_key).
std::string signature(std::string_view kind, std::initializer_list<const Tensor*> tensors) {
  std::string key = signature_start(kind, (*tensors.begin())->device());
  key.append(std::to_string(at::get_num_threads())).push_back('|');
  for (const Tensor* t : tensors) {
    key.append(std::to_string(static_cast<int>(t->scalar_type()))).push_back(':');
    for (int64_t v : t->sizes()) key.append(std::to_string(v)).push_back(',');
    key.push_back(':');
    for (int64_t v : t->strides()) key.append(std::to_string(v)).push_back(',');
    key.push_back(';');
  }
  return key;
}

// And PyTorch's switches of its fused kernels (torch.backends.cuda.enable_flash_sdp / enable_mem_efficient_sdp),
// which its eligibility checks read: a kernel switched off after a choice is not called from here.
std::string attention_signature(
    const Tensor& q_a, const Tensor& k_a, const Tensor& v_a, const Tensor& q_b, const Tensor& k_b, const Tensor& v_b) {
  std::string key = signature("attention", {&q_a, &k_a, &v_a, &q_b, &k_b, &v_b});
  const at::Context& context = at::globalContext();
  key.push_back(context.userEnabledFlashSDP() ? 'F' : '-');
  key.push_back(context.userEnabledMemEfficientSDP() ? 'E' : '-');
  return key;
}

std::string gate_signature(const Tensor& f, const Tensor& gate_logits) {
  return signature("gate", {&f, &gate_logits});
}

// ------------------------------------------------------------------------------------------------
// PyTorch's attention kernels, called as backends/torch/attention.py calls them
// ------------------------------------------------------------------------------------------------

at::ScalarType lse_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// The kernels assume unit stride along the head dim (SDPA checks that before calling them; we call
// them directly, so we must): one quaternion channel per head makes views without it.
Tensor dense_rows(const Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

// How many query chunks the CPU backward runs as extra heads (backends/torch/attention.py's
// query_chunks, where the measurement is): PyTorch's kernel runs one thread per (batch, head); with
// fewer of them than threads the queries are cut into chunks, each a head of its own.
int64_t query_chunks(int64_t batch_heads, int64_t queries) {
  const int64_t threads = at::get_num_threads();
  if (batch_heads >= threads) return 1;
  int64_t chunks = (2 * threads + batch_heads - 1) / batch_heads;
  while (chunks > 1 && queries % chunks) --chunks;
  return chunks;
}

std::tuple<Tensor, Tensor, Tensor> cpu_flash_backward(
    const Tensor& grad_out, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor& out_in,
    const Tensor& lse_in, double scale) {
  const at::ScalarType dtype = q_in.scalar_type();
  Tensor q = dense_rows(q_in), k = dense_rows(k_in), v = dense_rows(v_in), out = dense_rows(out_in), go = grad_out;
  if (dtype == at::kHalf || dtype == at::kBFloat16) {
    // PyTorch's float32 kernel, as backends/torch/attention.py's _cpu_flash_backward says why: its half-precision
    // one adds each block of queries' dK and dV into its output in the dtype.
    q = q.to(at::kFloat), k = k.to(at::kFloat), v = v.to(at::kFloat), out = out.to(at::kFloat);
    go = go.to(at::kFloat);
  }
  // The kernel reads the log-sum-exp in its own dtype (what the forward returns: fp32 for half inputs).
  Tensor lse = lse_in.to(q.scalar_type());
  go = go.contiguous();
  const int64_t b = q.size(0), h = q.size(1), nq = q.size(2), e = q.size(3);
  const int64_t c = query_chunks(b * h, nq);
  if (c > 1) {  // (B, H, Nq, E) -> (B, H*c, Nq/c, E): a view of contiguous rows; K, V repeated per chunk
    q = q.contiguous().view({b, h * c, nq / c, e});
    out = out.contiguous().view({b, h * c, nq / c, e});
    go = go.view({b, h * c, nq / c, e});
    lse = lse.contiguous().view({b, h * c, nq / c});
    const int64_t nk = k.size(2);
    k = k.unsqueeze(2).expand({b, h, c, nk, k.size(3)}).reshape({b, h * c, nk, k.size(3)});
    v = v.unsqueeze(2).expand({b, h, c, nk, v.size(3)}).reshape({b, h * c, nk, v.size(3)});
  }
  auto [dq, dk, dv] =
      at::_scaled_dot_product_flash_attention_for_cpu_backward(go, q, k, v, out, lse, 0.0, false, std::nullopt, scale);
  if (c > 1) {
    dq = dq.reshape({b, h, nq, e});
    auto add_chunks = [&](const Tensor& t) { return t.view({b, h, c, t.size(2), t.size(3)}).sum(2); };
    dk = add_chunks(dk);
    dv = add_chunks(dv);
  }
  return {dq.to(dtype).contiguous(), dk.to(dtype).contiguous(), dv.to(dtype).contiguous()};
}

std::tuple<Tensor, Tensor, Tensor> cuda_fused_backward(
    AttentionKernel kernel, const Tensor& grad_out, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
    const Tensor& out_in, const Tensor& lse_in, double scale) {
  const Tensor q = dense_rows(q_in), k = dense_rows(k_in), v = dense_rows(v_in);
  const Tensor go = grad_out.contiguous(), out = dense_rows(out_in);
  Tensor lse = lse_in.to(at::kFloat);
  // Without dropout neither kernel reads the RNG state its forward returned; these stand in for it.
  const auto long_options = q.options().dtype(at::kLong);
  const Tensor seed = at::zeros({2}, long_options), offset = at::zeros({}, long_options);
  const int64_t nq = q.size(-2), nk = k.size(-2);
  if (kernel == AttentionKernel::CudaFlash) {
    auto grads = at::_scaled_dot_product_flash_attention_backward(
        go, q, k, v, out, lse, Tensor(), Tensor(), nq, nk, 0.0, false, seed, offset, scale);
    return {std::get<0>(grads).contiguous(), std::get<1>(grads).contiguous(), std::get<2>(grads).contiguous()};
  }
  const int64_t padded = (nq + 31) / 32 * 32;  // the kernel pads its log-sum-exp rows to a multiple of 32
  lse = at::constant_pad_nd(lse, {0, padded - nq});
  auto grads = at::_scaled_dot_product_efficient_attention_backward(
      go, q, k, v, Tensor(), out, lse, seed.select(0, 0), offset, 0.0, {true, true, true, false}, false, scale);
  return {std::get<0>(grads).contiguous(), std::get<1>(grads).contiguous(), std::get<2>(grads).contiguous()};
}

}  // namespace

AttentionKernel parse_attention_kernel(std::string_view name) {
  if (name == "cpu_flash") return AttentionKernel::CpuFlash;
  if (name == "cpu_flash_float32") return AttentionKernel::CpuFlashFloat32;
  if (name == "flash") return AttentionKernel::CudaFlash;
  if (name == "efficient") return AttentionKernel::CudaEfficient;
  TORCH_CHECK(false, "attention kernel must be 'cpu_flash', 'cpu_flash_float32', 'flash' or 'efficient', got '", name,
              "'");
}

std::tuple<Tensor, Tensor> attention_forward(
    AttentionKernel kernel, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, double scale) {
  const Tensor q = dense_rows(q_in), k = dense_rows(k_in), v = dense_rows(v_in);
  Tensor out, lse;
  if (kernel == AttentionKernel::CpuFlash) {
    std::tie(out, lse) = at::_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, false, std::nullopt, scale);
  } else if (kernel == AttentionKernel::CpuFlashFloat32) {  // the output rounded once, to the inputs' dtype
    std::tie(out, lse) = at::_scaled_dot_product_flash_attention_for_cpu(
        q.to(at::kFloat), k.to(at::kFloat), v.to(at::kFloat), 0.0, false, std::nullopt, scale);
    out = out.to(q.scalar_type());
  } else if (kernel == AttentionKernel::CudaFlash) {
    auto r = at::_scaled_dot_product_flash_attention(q, k, v, 0.0, false, false, scale);
    out = std::get<0>(r);
    lse = std::get<1>(r);
  } else {
    auto r = at::_scaled_dot_product_efficient_attention(q, k, v, std::nullopt, true, 0.0, false, scale);
    out = std::get<0>(r);
    lse = std::get<1>(r).narrow(-1, 0, q.size(-2));  // the kernel pads its rows to a multiple of 32
  }
  return {out.contiguous(), lse.to(lse_dtype(q.scalar_type())).contiguous()};
}

std::tuple<Tensor, Tensor, Tensor> attention_backward(
    AttentionKernel kernel, const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
    const Tensor& out, const Tensor& lse, double scale) {
  if (kernel == AttentionKernel::CpuFlash || kernel == AttentionKernel::CpuFlashFloat32) {
    return cpu_flash_backward(grad_out, q, k, v, out, lse, scale);  // (float32 for half inputs either way)
  }
  return cuda_fused_backward(kernel, grad_out, q, k, v, out, lse, scale);
}

// One pass fewer than f + alpha * (s * o): addcmul adds alpha * (s * o) to f in one kernel.
Tensor gated_residual(const Tensor& f, const Tensor& o, const Tensor& gate_logits, const Tensor& alpha) {
  return at::addcmul(f, alpha, at::sigmoid(gate_logits) * o);
}

std::tuple<Tensor, Tensor, Tensor> gated_residual_backward(
    const Tensor& grad, const Tensor& o, const Tensor& gate_logits, const Tensor& alpha) {
  const Tensor s = at::sigmoid(gate_logits);
  const Tensor d_alpha = (grad * (s * o)).sum().reshape(alpha.sizes());
  const Tensor go = grad * alpha;
  // d sigmoid(g) / dg = s (1 - s), in one kernel; the gate may broadcast (one value per channel): its
  // gradient sums over what it spans.
  const Tensor d_g = at::sigmoid_backward(go * o, s).sum_to_size(gate_logits.sizes());
  return {go * s, d_g, d_alpha};
}

namespace {

// ------------------------------------------------------------------------------------------------
// CPU and CUDA kernels: a remembered choice runs here; anything else asks Python
// ------------------------------------------------------------------------------------------------

Tensors4 cross_attention_native(
    const Tensor& q_a, const Tensor& k_a, const Tensor& v_a, const Tensor& q_b, const Tensor& k_b, const Tensor& v_b,
    double scale) {
  if (auto kernels = attention_choices.recall(attention_signature(q_a, k_a, v_a, q_b, k_b, v_b))) {
    auto [out_a, lse_a] = attention_forward(kernels->first, q_a, k_b, v_b, scale);
    auto [out_b, lse_b] = attention_forward(kernels->second, q_b, k_a, v_a, scale);
    return {out_a, out_b, lse_a, lse_b};
  }
  TORCH_CHECK(fallbacks.cross_attention, "aqcf::cross_attention: the Python implementation is not registered");
  return fallbacks.cross_attention(q_a, k_a, v_a, q_b, k_b, v_b, scale);
}

Tensors6 cross_attention_backward_native(
    const Tensor& grad_a, const Tensor& grad_b, const Tensor& q_a, const Tensor& k_a, const Tensor& v_a,
    const Tensor& q_b, const Tensor& k_b, const Tensor& v_b, const Tensor& out_a, const Tensor& out_b,
    const Tensor& lse_a, const Tensor& lse_b, double scale) {
  if (auto kernels = attention_choices.recall(attention_signature(q_a, k_a, v_a, q_b, k_b, v_b))) {
    auto [dq_a, dk_b, dv_b] = attention_backward(kernels->first, grad_a, q_a, k_b, v_b, out_a, lse_a, scale);
    auto [dq_b, dk_a, dv_a] = attention_backward(kernels->second, grad_b, q_b, k_a, v_a, out_b, lse_b, scale);
    return {dq_a, dk_a, dv_a, dq_b, dk_b, dv_b};
  }
  TORCH_CHECK(fallbacks.cross_attention_backward,
              "aqcf::cross_attention_backward: the Python implementation is not registered");
  return fallbacks.cross_attention_backward(
      grad_a, grad_b, q_a, k_a, v_a, q_b, k_b, v_b, out_a, out_b, lse_a, lse_b, scale);
}

Tensor gated_residual_native(const Tensor& f, const Tensor& o, const Tensor& gate_logits, const Tensor& alpha) {
  if (gate_choices.recall(gate_signature(f, gate_logits))) return gated_residual(f, o, gate_logits, alpha).contiguous();
  TORCH_CHECK(fallbacks.gated_residual, "aqcf::gated_residual: the Python implementation is not registered");
  return fallbacks.gated_residual(f, o, gate_logits, alpha);
}

Tensors3 gated_residual_backward_native(
    const Tensor& grad, const Tensor& o, const Tensor& gate_logits, const Tensor& alpha) {
  if (gate_choices.recall(gate_signature(grad, gate_logits))) {
    auto [d_o, d_g, d_alpha] = gated_residual_backward(grad, o, gate_logits, alpha);
    return {d_o.contiguous(), d_g.contiguous(), d_alpha.contiguous()};
  }
  TORCH_CHECK(fallbacks.gated_residual_backward,
              "aqcf::gated_residual_backward: the Python implementation is not registered");
  return fallbacks.gated_residual_backward(grad, o, gate_logits, alpha);
}

// ------------------------------------------------------------------------------------------------
// Autograd: the backward is the backward op (torch.compile and opcheck see it); like FlashAttention's,
// the backward ops have no derivative themselves, so a backward under create_graph=True (grad mode on)
// asks Python for the gradients through the composite attention and gate, which have one
// ------------------------------------------------------------------------------------------------

const auto& cross_attention_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("aqcf::cross_attention", "")
                             .typed<Tensors4(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                             const Tensor&, const Tensor&, double)>();
  return op;
}

const auto& cross_attention_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("aqcf::cross_attention_backward", "")
          .typed<Tensors6(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                          const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                          double)>();
  return op;
}

const auto& gated_residual_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("aqcf::gated_residual", "")
                             .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&)>();
  return op;
}

const auto& gated_residual_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("aqcf::gated_residual_backward", "")
                             .typed<Tensors3(const Tensor&, const Tensor&, const Tensor&, const Tensor&)>();
  return op;
}

class CrossAttentionFunction : public torch::autograd::Function<CrossAttentionFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const Tensor& q_a, const Tensor& k_a, const Tensor& v_a, const Tensor& q_b,
      const Tensor& k_b, const Tensor& v_b, double scale) {
    Tensors4 out;
    out = call_below_autograd(cross_attention_op(), q_a, k_a, v_a, q_b, k_b, v_b, scale);
    auto& [out_a, out_b, lse_a, lse_b] = out;
    // The log-sum-exps never reach a loss through the backward (it ignores their gradient): no tensor
    // of zeros is made for them.
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({q_a, k_a, v_a, q_b, k_b, v_b, out_a, out_b, lse_a, lse_b});
    ctx->saved_data["scale"] = scale;
    return {out_a, out_b, lse_a, lse_b};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    // An output that did not reach the loss contributes nothing: its gradient is zero.
    const Tensor grad_a = grads[0].defined() ? grads[0] : at::zeros_like(s[6]);
    const Tensor grad_b = grads[1].defined() ? grads[1] : at::zeros_like(s[7]);
    const double scale = ctx->saved_data["scale"].toDouble();
    Tensors6 g;
    if (at::GradMode::is_enabled()) {  // create_graph=True
      TORCH_CHECK(fallbacks.composite_cross_attention_backward,
                  "aqcf::cross_attention: the Python composite backward is not registered");
      g = fallbacks.composite_cross_attention_backward(grad_a, grad_b, s[0], s[1], s[2], s[3], s[4], s[5], scale);
    } else {
      g = cross_attention_backward_op().call(
          grad_a, grad_b, s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], s[9], scale);
    }
    auto& [dq_a, dk_a, dv_a, dq_b, dk_b, dv_b] = g;
    return {dq_a, dk_a, dv_a, dq_b, dk_b, dv_b, Tensor()};
  }
};

class GatedResidualFunction : public torch::autograd::Function<GatedResidualFunction> {
 public:
  static Tensor forward(
      AutogradContext* ctx, const Tensor& f, const Tensor& o, const Tensor& gate_logits, const Tensor& alpha) {
    Tensor y;
    y = call_below_autograd(gated_residual_op(), f, o, gate_logits, alpha);
    ctx->save_for_backward({o, gate_logits, alpha});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    Tensors3 g;
    if (at::GradMode::is_enabled()) {  // create_graph=True
      TORCH_CHECK(fallbacks.composite_gated_residual_backward,
                  "aqcf::gated_residual: the Python composite backward is not registered");
      g = fallbacks.composite_gated_residual_backward(grads[0], s[0], s[1], s[2]);
    } else {
      g = gated_residual_backward_op().call(grads[0], s[0], s[1], s[2]);
    }
    auto& [d_o, d_g, d_alpha] = g;
    return {grads[0], d_o, d_g, d_alpha};
  }
};

Tensors4 cross_attention_autograd(
    const Tensor& q_a, const Tensor& k_a, const Tensor& v_a, const Tensor& q_b, const Tensor& k_b, const Tensor& v_b,
    double scale) {
  if (!records_graph(q_a, k_a, v_a, q_b, k_b, v_b)) {
    return call_below_autograd(cross_attention_op(), q_a, k_a, v_a, q_b, k_b, v_b, scale);
  }
  auto out = CrossAttentionFunction::apply(q_a, k_a, v_a, q_b, k_b, v_b, scale);
  return {out[0], out[1], out[2], out[3]};
}

Tensor gated_residual_autograd(const Tensor& f, const Tensor& o, const Tensor& gate_logits, const Tensor& alpha) {
  if (!records_graph(f, o, gate_logits, alpha)) {
    return call_below_autograd(gated_residual_op(), f, o, gate_logits, alpha);
  }
  return GatedResidualFunction::apply(f, o, gate_logits, alpha);
}

// Under autocast: the attention and the gate that adds its output in the autocast dtype (autocast.h),
// like aten's scaled_dot_product_attention.
template <c10::DeviceType device>
Tensors4 cross_attention_autocast(
    const Tensor& q_a, const Tensor& k_a, const Tensor& v_a, const Tensor& q_b, const Tensor& k_b, const Tensor& v_b,
    double scale) {
  const LowerPrecision<device> cast;
  return cross_attention_op().call(cast(q_a), cast(k_a), cast(v_a), cast(q_b), cast(k_b), cast(v_b), scale);
}

template <c10::DeviceType device>
Tensor gated_residual_autocast(const Tensor& f, const Tensor& o, const Tensor& gate_logits, const Tensor& alpha) {
  const LowerPrecision<device> cast;
  return gated_residual_op().call(cast(f), cast(o), cast(gate_logits), cast(alpha));
}

}  // namespace

void set_attention_fallbacks(AttentionFallbacks fns) {
  fallbacks = std::move(fns);
}

void remember_attention_choice(
    const Tensor& q_a, const Tensor& k_a, const Tensor& v_a, const Tensor& q_b, const Tensor& k_b, const Tensor& v_b,
    AttentionKernel kernel_a, AttentionKernel kernel_b) {
  attention_choices.remember(attention_signature(q_a, k_a, v_a, q_b, k_b, v_b), {kernel_a, kernel_b});
}

void remember_gate_choice(const Tensor& f, const Tensor& gate_logits) {
  gate_choices.remember(gate_signature(f, gate_logits), true);
}

void forget_attention_choices() {
  attention_choices.forget();
  gate_choices.forget();
}

int64_t remembered_attention_choices() {
  return attention_choices.size() + gate_choices.size();
}

}  // namespace aqcf

// The schemas are those torch.library.custom_op infers from ops/attention.py's Python signatures, which
// define the ops instead when this extension is not built.
TORCH_LIBRARY_FRAGMENT(aqcf, m) {
  m.def(
      "cross_attention(Tensor q_a, Tensor k_a, Tensor v_a, Tensor q_b, Tensor k_b, Tensor v_b, float scale) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cross_attention_backward(Tensor grad_a, Tensor grad_b, Tensor q_a, Tensor k_a, Tensor v_a, Tensor q_b, "
      "Tensor k_b, Tensor v_b, Tensor out_a, Tensor out_b, Tensor lse_a, Tensor lse_b, float scale) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("gated_residual(Tensor f, Tensor o, Tensor gate_logits, Tensor alpha) -> Tensor");
  m.def(
      "gated_residual_backward(Tensor grad, Tensor o, Tensor gate_logits, Tensor alpha) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(aqcf, CPU, m) {
  m.impl("cross_attention", &aqcf::cross_attention_native);
  m.impl("cross_attention_backward", &aqcf::cross_attention_backward_native);
  m.impl("gated_residual", &aqcf::gated_residual_native);
  m.impl("gated_residual_backward", &aqcf::gated_residual_backward_native);
}

TORCH_LIBRARY_IMPL(aqcf, CUDA, m) {
  m.impl("cross_attention", &aqcf::cross_attention_native);
  m.impl("cross_attention_backward", &aqcf::cross_attention_backward_native);
  m.impl("gated_residual", &aqcf::gated_residual_native);
  m.impl("gated_residual_backward", &aqcf::gated_residual_backward_native);
}

TORCH_LIBRARY_IMPL(aqcf, AutocastCPU, m) {
  m.impl("cross_attention", &aqcf::cross_attention_autocast<c10::DeviceType::CPU>);
  m.impl("gated_residual", &aqcf::gated_residual_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(aqcf, AutocastCUDA, m) {
  m.impl("cross_attention", &aqcf::cross_attention_autocast<c10::DeviceType::CUDA>);
  m.impl("gated_residual", &aqcf::gated_residual_autocast<c10::DeviceType::CUDA>);
}

TORCH_LIBRARY_IMPL(aqcf, Autograd, m) {
  m.impl("cross_attention", &aqcf::cross_attention_autograd);
  m.impl("gated_residual", &aqcf::gated_residual_autograd);
  // no derivative: backpropagating through them raises (as the Python custom ops do)
  m.impl("cross_attention_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("gated_residual_backward", torch::autograd::autogradNotImplementedFallback());
}
