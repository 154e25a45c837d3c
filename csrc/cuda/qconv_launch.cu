// Kernel launches of the CUDA quaternion convolution (qconv_launch.h). Only dispatch and launch
// here: argument checks and error messages are host code in qconv_cuda.cpp, kernels are in
// qconv_kernels.cuh.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "qconv_kernels.cuh"
#include "qconv_launch.h"

namespace aqcf {
namespace cuda {

void launch_qconv(const at::Tensor& x5, const at::Tensor& w, const at::Tensor* bias, const at::Tensor& y5,
                  const Geometry& g, int64_t M, bool transposed, bool x_channels_fast, bool fast8, Grid grid) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x5.scalar_type(), "aqcf_cuda_conv", [&] {
    with_fast8(fast8, [&](auto fast8_tag) {
      constexpr bool kFast8 = decltype(fast8_tag)::value;
      using T = Tile<typename AccType<scalar_t>::type, kFast8>;
      qconv_kernel<scalar_t, kFast8><<<dim3(grid.x, grid.y, grid.z), T::kThreads, 0, stream>>>(
          x5.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), bias ? bias->data_ptr<scalar_t>() : nullptr,
          y5.data_ptr<scalar_t>(), g, M, transposed, x_channels_fast);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void launch_qconv_wgrad(const at::Tensor& x5, const at::Tensor& gy5, const at::Tensor& gw, const Geometry& g,
                        int64_t P, int64_t per_split, int splits, bool channels_fast, bool fast8, Grid grid) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x5.scalar_type(),
                                  "aqcf_cuda_conv_weight_grad", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    with_fast8(fast8, [&](auto fast8_tag) {
      constexpr bool kFast8 = decltype(fast8_tag)::value;
      using T = Tile<acc_t, kFast8>;
      qconv_wgrad_kernel<scalar_t, kFast8><<<dim3(grid.x, grid.y, grid.z), T::kThreads, 0, stream>>>(
          x5.data_ptr<scalar_t>(), gy5.data_ptr<scalar_t>(), gw.data_ptr<acc_t>(), g, P, per_split, splits,
          channels_fast);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace cuda
}  // namespace aqcf
