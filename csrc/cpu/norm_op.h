// The fused quaternion norm operators (aqcf::qnorm and aqcf::qnorm_backward), registered natively, as
// op.h registers the conv ops.
//
// Why native: the Python custom op cost ~10 us a forward and ~80 us a backward over the compiled
// kernels (torch.library's autograd wrapper, argument defaults, redispatch; a small norm's fwd+bwd
// took 212 us against its kernels' 54 us on CPU), and A-QCF-Net runs a norm after every conv. Here the
// schemas, the CPU kernel and the autograd formula are C++. Python keeps what only it knows: whether
// the Triton kernels take a call (CUDA, or CPU under the interpreter with the triton backend forced),
// and the composite backward a differentiable gradient (create_graph) runs. The CPU kernel asks Python
// the first time it sees a signature; when the compiled kernels served it, Python remembers that here
// and later calls never leave C++. Python forgets every remembered choice when the dispatch state changes.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace aqcf {

using NormTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using OptionalNormTensors = std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>;

// The Python functions of aqcf_kernels.ops.norm: the ops' implementations (every device), and the
// gradients through the composite reference (create_graph=True; None where not needed).
struct NormFallbacks {
  std::function<NormTensors(
      const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, bool, double,
      const std::optional<std::string>&, double)>
      qnorm;
  std::function<NormTensors(
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
      const at::Tensor&, const at::Tensor&, bool, bool, double, const std::optional<std::string>&, double,
      const std::vector<bool>&)>
      qnorm_backward;
  std::function<OptionalNormTensors(
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
      const at::Tensor&, const at::Tensor&, bool, bool, double, const std::optional<std::string>&, double,
      const std::vector<bool>&)>
      composite_backward;
};
void set_norm_fallbacks(NormFallbacks fallbacks);

// torch.nn.BatchNorm's running-statistics update from one training call's statistics, in place: ``mean``
// ``(G, 4, Cq, 1...)`` and the biased ``var`` ``(G, 1, Cq, 1...)`` (G = 1 for batch norm, N for instance
// norm, whose running statistics track the batch's average), ``count`` values each; the unbiased variance
// goes into the average. Two ATen ops for batch norm (one multi-tensor lerp, the variance's unbiased part
// added in place), as the Python update in aqcf_kernels/nn/norm.py (which dynamo traces) runs them, without
// its Python.
void update_running_stats(
    const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean, const at::Tensor& var, int64_t count,
    double momentum);

// Serve later qnorm calls (and their backward) with inputs like this one by the compiled CPU kernels.
void remember_norm_choice(const at::Tensor& input);
void forget_norm_choices();
int64_t remembered_norm_choices();

}  // namespace aqcf
