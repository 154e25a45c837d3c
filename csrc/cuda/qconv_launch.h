// Kernel launches of the CUDA quaternion convolution: the only host code compiled by nvcc
// (qconv_launch.cu). Everything that checks arguments or raises errors (qconv_cuda.cpp, qconv_plan.h)
// is compiled by the C++ compiler: on an H100 and an H200, raising the weight-shape error from
// nvcc-compiled host code segfaulted, while the same check built by g++ (the kernel emulator of
// tests/gpu) raises cleanly.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "qconv_geometry.h"

namespace aqcf {
namespace cuda {

struct Grid {
  unsigned x, y, z;
};

// y5 = W ⊗ x5 (+ bias), or conj(W) ⊗ x5 for `transposed`; w in GEMM order (qconv_plan.h).
void launch_qconv(const at::Tensor& x5, const at::Tensor& w, const at::Tensor* bias, const at::Tensor& y5,
                  const Geometry& g, int64_t M, bool transposed, bool x_channels_fast, bool fast8, Grid grid);

// gw += gy5 ⊗ conj(x5) over `splits` pixel splits of `per_split` pixels (gw zero-filled, acc type).
void launch_qconv_wgrad(const at::Tensor& x5, const at::Tensor& gy5, const at::Tensor& gw, const Geometry& g,
                        int64_t P, int64_t per_split, int splits, bool channels_fast, bool fast8, Grid grid);

}  // namespace cuda
}  // namespace aqcf
