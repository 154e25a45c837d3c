// Host- and device-side shapes of the CUDA quaternion convolution: accumulation types, the block
// tile (its sizes set the launch grids) and the conv Geometry. Plain C++ with no CUDA qualifiers, so
// the host code compiled by the C++ compiler (qconv_cuda.cpp, qconv_plan.h) and the kernels
// (qconv_kernels.cuh) share one definition.
#pragma once

#include <cstdint>
#include <type_traits>

namespace aqcf {
namespace cuda {

template <typename T>
struct AccType {
  using type = float;  // float, at::Half, at::BFloat16
};
template <>
struct AccType<double> {
  using type = double;
};

// Tile geometry: 256 threads as a 16 x 16 grid; thread (tl, tr) owns rows tl + 16 j (j < TL) and
// columns tr + 16 i (i < TR) of the block tile. Strided (not contiguous) micro-tiles keep the shared
// memory reads conflict-free (16 consecutive columns per half-warp) and the conv's output stores
// coalesced along pixels.
template <typename acc_t, bool FAST8>
struct Tile {
  static constexpr int kThreads = 256;
  static constexpr int kSide = 16;
  static constexpr int kPlanes = FAST8 ? 8 : 4;  // operand planes staged, accumulators per element
  // fast8 holds 8 accumulators per element: halve the left tile to stay in registers; double
  // accumulators take two registers each: halve the right tile.
  static constexpr int TL = FAST8 ? 2 : 4;
  static constexpr int TR = sizeof(acc_t) == 8 ? 2 : 4;
  static constexpr int BL = kSide * TL;
  static constexpr int BR = kSide * TR;
  static constexpr int BK = 8;
};

// Calls f(std::true_type{}) or f(std::false_type{}): the algorithm as a compile-time bool (for the
// launches and the kernel emulator of tests/gpu).
template <typename F>
void with_fast8(bool fast8, F&& f) {
  if (fast8) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// ---------------------------------------------------------------------------------------------
// Shapes and strides. 1D/2D convs are 3D convs with size-1 leading spatial dims. Tensors x and y
// (gy) are (N, 4 * CQ, D, H, W) with arbitrary element strides (contiguous, channels_last, views).

struct Geometry {
  int cq_in, cq_out;  // quaternion channels of x and of y (gy)
  int cg_in, cg_out;  // per group
  int groups;
  int in[3], out[3], kernel[3];  // D, H, W
  int stride[3], pad[3], dil[3];
  int64_t sx[5], sy[5];  // element strides of x and of y (gy): N, C, D, H, W
};

}  // namespace cuda
}  // namespace aqcf
