// Host entry points of the CUDA quaternion convolution: device checks, planning, launch grids and
// the pybind11 registration (aqcf_register_cuda, called from the extension's one binding file).
// Compiled by the C++ compiler, not nvcc (see qconv_launch.h for why).
//
// Semantics are those of aqcf_kernels/backends/torch_impl.py: blocked [r|i|j|k] channels, y = W ⊗ x
// with weight (4, out/4, in/4/groups, *k); a transposed conv is the adjoint, conj(W) ⊗ x with
// weight (4, in/4, out/4/groups, *k). Argument checks and shapes: qconv_plan.h; launches:
// qconv_launch.cu; kernels: qconv_kernels.cuh.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "qconv_cuda.h"
#include "qconv_launch.h"
#include "qconv_plan.h"

namespace aqcf {
namespace {

using cuda::Tile;

constexpr int64_t kMaxGridYZ = 65535;

void check_cuda(const at::Tensor& t, const char* fn, const char* name) {
  TORCH_CHECK(t.is_cuda(), "aqcf ", fn, ": ", name, " must be a CUDA tensor, got device ", t.device());
}

// Test hook: with AQCF_CUDA_POISON_OUTPUT=1 the conv output is NaN-filled before the kernel runs,
// so a test sees any element the kernel fails to write.
bool poison_output() {
  const char* v = std::getenv("AQCF_CUDA_POISON_OUTPUT");
  return v != nullptr && std::string(v) == "1";
}

// f(Tile<acc_t, fast8>{}) for the accumulation type of `dtype`: the block tile that sets the grid.
template <typename F>
auto with_tile(at::ScalarType dtype, bool fast8, F&& f) {
  if (dtype == at::kDouble) return fast8 ? f(Tile<double, true>{}) : f(Tile<double, false>{});
  return fast8 ? f(Tile<float, true>{}) : f(Tile<float, false>{});
}

}  // namespace

at::Tensor cuda_conv(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                     bool transposed, std::vector<int64_t> output_padding, int64_t groups, bool fast8) {
  check_cuda(input, "cuda_conv", "input");
  check_cuda(weight, "cuda_conv", "weight");
  c10::cuda::CUDAGuard guard(input.device());
  cuda::ConvPlan plan = cuda::plan_conv(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups);
  if (plan.y.numel() == 0) return plan.y;
  if (poison_output()) plan.y.fill_(std::numeric_limits<double>::quiet_NaN());

  const auto [gx, gy] = with_tile(input.scalar_type(), fast8, [&](auto tile) {
    using T = decltype(tile);
    return std::pair<int64_t, int64_t>{(plan.M + T::BR - 1) / T::BR, (plan.g.cg_out + T::BL - 1) / T::BL};
  });
  TORCH_CHECK(gx <= std::numeric_limits<int>::max() && gy <= kMaxGridYZ && groups <= kMaxGridYZ,
              "aqcf cuda_conv: problem too large for one launch (grid ", gx, " x ", gy, " x ", groups, ")");
  cuda::launch_qconv(cuda::as_5d(input), plan.w, plan.b ? &*plan.b : nullptr, cuda::as_5d(plan.y), plan.g, plan.M,
                     transposed, cuda::channels_fast(input), fast8,
                     {static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(groups)});
  return plan.y;
}

at::Tensor cuda_conv_weight_grad(const at::Tensor& input, const at::Tensor& grad_output, std::vector<int64_t> weight_shape,
                                 std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                                 bool transposed, std::vector<int64_t> output_padding, int64_t groups, bool fast8) {
  (void)output_padding;  // only shapes the transposed conv's output, which grad_output already has
  check_cuda(input, "cuda_conv_weight_grad", "input");
  check_cuda(grad_output, "cuda_conv_weight_grad", "grad_output");
  c10::cuda::CUDAGuard guard(input.device());
  cuda::WgradPlan plan = cuda::plan_wgrad(input, grad_output, weight_shape, stride, padding, dilation, transposed, groups);
  const cuda::Geometry& g = plan.g;
  if (plan.P > 0 && g.cg_in > 0 && g.cg_out > 0) {
    const int64_t taps = plan.gw.size(3);
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const auto [tiles, bk] = with_tile(input.scalar_type(), fast8, [&](auto tile) {
      using T = decltype(tile);
      return std::pair<int64_t, int>{((g.cg_out + T::BL - 1) / T::BL) * ((g.cg_in + T::BR - 1) / T::BR), T::BK};
    });
    TORCH_CHECK(tiles <= std::numeric_limits<int>::max() && taps <= kMaxGridYZ && groups <= kMaxGridYZ,
                "aqcf cuda_conv_weight_grad: problem too large for one launch (", tiles, " tiles, ", taps, " taps, ",
                groups, " groups)");
    const cuda::PixelSplit split =
        cuda::split_pixels(plan.P, tiles * taps * groups, 4 * static_cast<int64_t>(sms), kMaxGridYZ / groups, bk);
    cuda::launch_qconv_wgrad(cuda::as_5d(plan.x), cuda::as_5d(plan.gy), plan.gw, g, plan.P, split.per_split,
                             static_cast<int>(split.splits), cuda::channels_fast(plan.x), fast8,
                             {static_cast<unsigned>(tiles), static_cast<unsigned>(taps),
                              static_cast<unsigned>(groups * split.splits)});
  }
  return plan.gw.view(weight_shape).to(input.scalar_type());
}

}  // namespace aqcf

void aqcf_register_cuda(pybind11::module_& m) {
  m.def("cuda_conv", &aqcf::cuda_conv,
        "CUDA y = W ⊗ x (+ bias): quaternion (transposed) conv; fast8 = Howell-Lafon 8-product kernel",
        py::arg("input"), py::arg("weight"), py::arg("bias"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"), py::arg("transposed"), py::arg("output_padding"), py::arg("groups"), py::arg("fast8"),
        py::call_guard<py::gil_scoped_release>());
  m.def("cuda_conv_weight_grad", &aqcf::cuda_conv_weight_grad,
        "CUDA gradient of <grad_output, conv(input, W)> w.r.t. W (of weight_shape)", py::arg("input"),
        py::arg("grad_output"), py::arg("weight_shape"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
        py::arg("transposed"), py::arg("output_padding"), py::arg("groups"), py::arg("fast8"),
        py::call_guard<py::gil_scoped_release>());
}
