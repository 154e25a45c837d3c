// The autograd kernels' shortcut: a call that records no graph (inference, torch.no_grad(), and the
// backward's own calls, which run with grad mode off) goes straight to the kernel below autograd, as
// the forward of each op's torch::autograd::Function does, without the Function's node, context and
// output wrapping: ~3.5 us of the ~21 us host time of a small pointwise conv's op call (1 thread, CPU).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <optional>

namespace aqcf {

inline bool requires_grad(const at::Tensor& t) {
  return t.defined() && t.requires_grad();
}
inline bool requires_grad(const std::optional<at::Tensor>& t) {
  return t.has_value() && requires_grad(*t);
}

// Whether an autograd kernel called with these tensor arguments has a graph to record.
template <typename... Tensors>
bool records_graph(const Tensors&... tensors) {
  return at::GradMode::is_enabled() && (requires_grad(tensors) || ...);
}

// Calls `op` below the autograd and ADInplaceOrView keys: each Function's forward, and the shortcut.
template <typename Op, typename... Args>
decltype(auto) call_below_autograd(const Op& op, Args&&... args) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(std::forward<Args>(args)...);
}

}  // namespace aqcf
