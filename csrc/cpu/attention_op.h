// The A-QCF attention operators (aqcf::cross_attention, aqcf::gated_residual and their backward ops),
// registered natively, as op.h registers the conv ops.
//
// Why native: at the low end of the block's token counts (1k tokens on a GPU, any small block on a CPU)
// the block is host-bound, and the Python custom ops cost ~30 us (cross_attention) and ~10 us
// (gated_residual) a call over the kernels they launch (README, "A-QCF block"). Here the schemas, the
// CPU and CUDA kernels and the autograd formulas are C++; Python keeps the choice of backend
// (aqcf_kernels.backends). The kernels ask Python (the fallbacks below) the first time they see a call
// signature; when what served it is the `torch` backend's own code (PyTorch's fused attention kernels,
// the gate's elementwise ops), Python remembers that here and later calls with that signature never
// leave C++. Python forgets every remembered choice whenever something that decides them changes.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <string_view>
#include <tuple>

namespace aqcf {

// The PyTorch kernel that serves a remembered direction of the attention: the CPU flash kernel (for
// fp16/bf16 inputs in their dtype, or its float32 kernel on float32 copies: what `auto` measured faster),
// or on CUDA FlashAttention-2 or the memory-efficient kernel (backends/torch/attention.py calls the same
// aten ops with the same arguments).
enum class AttentionKernel { CpuFlash, CpuFlashFloat32, CudaFlash, CudaEfficient };

// 'cpu_flash' | 'cpu_flash_float32' | 'flash' | 'efficient' (the names backends/torch/attention.py gives them).
AttentionKernel parse_attention_kernel(std::string_view name);

// softmax(q k^T * scale) v and its log-sum-exp (fp32, fp64 for fp64 inputs), both contiguous.
std::tuple<at::Tensor, at::Tensor> attention_forward(
    AttentionKernel kernel, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale);
// (dq, dk, dv), contiguous, from the saved output and log-sum-exp.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    AttentionKernel kernel, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale);

// f + alpha * sigmoid(gate_logits) * o, and its backward (d_o, d_gate_logits, d_alpha): the `torch`
// backend's gate, op for op.
at::Tensor gated_residual(const at::Tensor& f, const at::Tensor& o, const at::Tensor& gate_logits, const at::Tensor& alpha);
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_residual_backward(
    const at::Tensor& grad, const at::Tensor& o, const at::Tensor& gate_logits, const at::Tensor& alpha);

// The Python implementations of the four ops (aqcf_kernels.ops.attention): they select the backend,
// run it and remember what the extension can serve itself. And the gradients through the composite
// attention and gate (create_graph=True: the backward ops have no derivative, these are differentiable).
using Tensors4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Tensors6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Tensors3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
struct AttentionFallbacks {
  std::function<Tensors4(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&, double)>
      cross_attention;
  std::function<Tensors6(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>
      cross_attention_backward;
  std::function<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)> gated_residual;
  std::function<Tensors3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>
      gated_residual_backward;
  // (grad_a, grad_b, q_a, k_a, v_a, q_b, k_b, v_b, scale) -> (dq_a, dk_a, dv_a, dq_b, dk_b, dv_b)
  std::function<Tensors6(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>
      composite_cross_attention_backward;
  std::function<Tensors3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>
      composite_gated_residual_backward;
};
void set_attention_fallbacks(AttentionFallbacks fallbacks);

// Serve later cross_attention calls (and their backward) with these six inputs' signature in C++, each
// direction with its kernel: a (q_a against k_b, v_b) and b (q_b against k_a, v_a).
void remember_attention_choice(
    const at::Tensor& q_a, const at::Tensor& k_a, const at::Tensor& v_a, const at::Tensor& q_b, const at::Tensor& k_b,
    const at::Tensor& v_b, AttentionKernel kernel_a, AttentionKernel kernel_b);
// Serve later gated_residual calls with f (or, for the backward, grad) and gate_logits like these in C++.
void remember_gate_choice(const at::Tensor& f, const at::Tensor& gate_logits);
void forget_attention_choices();
int64_t remembered_attention_choices();

}  // namespace aqcf
