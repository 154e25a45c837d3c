// CUDA kernels of the quaternion (transposed) convolution and its weight gradient.
//
// The same algebra as aqcf_kernels/quaternion.py and the Triton kernels (triton/conv_kernels.py),
// which are the blueprint: every computation is a Hamilton product Z = A ⊗ B of two blocked
// quaternion operands whose scalar products A_p * B_a are real GEMMs:
//
//   qconv_kernel        y  = W ⊗ x        (conv; implicit GEMM over output pixels x out-channels,
//                       y  = conj(W) ⊗ x   transposed conv, gathered: reduction over taps x in-channels)
//   qconv_wgrad_kernel  gW = gy ⊗ conj(x)  (reduction over output pixels, split with atomics)
//
// Both kernels share one block-level micro-GEMM: a block owns a BL x BR tile of the output (BL along
// the LEFT operand's free dim: output channels; BR along the RIGHT operand's: pixels for the conv,
// input channels for the weight gradient), stages a BK-deep slice of both operands in shared memory,
// and every thread accumulates a TL x TR register micro-tile of all output components.
//
// The operands are staged as "planes": the 4 components (hamilton, 16 products per element pair) or
// Howell & Lafon's 8 operand combinations formed once at staging time (fast8, 8 products, undone in
// the epilogue). Loads are converted to the accumulation type at once (float for half/bfloat16/float,
// double for double), so the fast8 sums are never rounded to half precision.
//
// Only plain C++ plus __syncthreads/atomicAdd/threadIdx/blockIdx is used on purpose: the header has no
// ATen dependency, which lets it be compiled and run by a host-side block emulator for testing.
#pragma once

#include <cstdint>

#include "qconv_geometry.h"

namespace aqcf {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// Quaternion algebra on one element pair (component order r, i, j, k).

// Left operand planes: the components, or FAST8_LEFT of quaternion.py:
// s1=(d1-c1) s2=(a1+b1) s3=(a1-b1) s4=(c1+d1) s5=(d1-b1) s6=(d1+b1) s7=(a1+c1) s8=(a1-c1).
template <bool FAST8, typename T>
__device__ __forceinline__ void left_planes(const T a[4], T out[]) {
  if constexpr (FAST8) {
    out[0] = a[3] - a[2];
    out[1] = a[0] + a[1];
    out[2] = a[0] - a[1];
    out[3] = a[2] + a[3];
    out[4] = a[3] - a[1];
    out[5] = a[3] + a[1];
    out[6] = a[0] + a[2];
    out[7] = a[0] - a[2];
  } else {
#pragma unroll
    for (int q = 0; q < 4; ++q) out[q] = a[q];
  }
}

// Right operand planes: the components, or FAST8_RIGHT of quaternion.py:
// s1=(c2-d2) s2=(a2+b2) s3=(c2+d2) s4=(a2-b2) s5=(b2-c2) s6=(b2+c2) s7=(a2-d2) s8=(a2+d2).
template <bool FAST8, typename T>
__device__ __forceinline__ void right_planes(const T b[4], T out[]) {
  if constexpr (FAST8) {
    out[0] = b[2] - b[3];
    out[1] = b[0] + b[1];
    out[2] = b[2] + b[3];
    out[3] = b[0] - b[1];
    out[4] = b[1] - b[2];
    out[5] = b[1] + b[2];
    out[6] = b[0] - b[3];
    out[7] = b[0] + b[3];
  } else {
#pragma unroll
    for (int q = 0; q < 4; ++q) out[q] = b[q];
  }
}

// acc += A ⊗ B on planes (hamilton: the product itself; fast8: the 8 products s_m).
template <bool FAST8, typename T>
__device__ __forceinline__ void quat_mac(T acc[], const T a[], const T b[]) {
  if constexpr (FAST8) {
#pragma unroll
    for (int q = 0; q < 8; ++q) acc[q] += a[q] * b[q];
  } else {
    // reference.HAMILTON: Z_r = ArBr - AiBi - AjBj - AkBk, Z_i = AiBr + ArBi - AkBj + AjBk,
    // Z_j = AjBr + AkBi + ArBj - AiBk, Z_k = AkBr - AjBi + AiBj + ArBk.
    acc[0] += a[0] * b[0] - a[1] * b[1] - a[2] * b[2] - a[3] * b[3];
    acc[1] += a[1] * b[0] + a[0] * b[1] - a[3] * b[2] + a[2] * b[3];
    acc[2] += a[2] * b[0] + a[3] * b[1] + a[0] * b[2] - a[1] * b[3];
    acc[3] += a[3] * b[0] - a[2] * b[1] + a[1] * b[2] + a[0] * b[3];
  }
}

// Accumulators -> the 4 output components (fast8: FAST8_OUT, Z_c = s_c + butterfly(s5..s8)_c / 2).
template <bool FAST8, typename T>
__device__ __forceinline__ void finish(const T s[], T z[4]) {
  if constexpr (FAST8) {
    const T u = s[4] - s[5], w = s[4] + s[5], v = s[6] + s[7], t = s[6] - s[7];
    const T half = T(0.5);
    z[0] = s[0] + half * (u + v);
    z[1] = s[1] + half * (u - v);
    z[2] = s[2] + half * (w + t);
    z[3] = s[3] + half * (w - t);
  } else {
#pragma unroll
    for (int c = 0; c < 4; ++c) z[c] = s[c];
  }
}

// ---------------------------------------------------------------------------------------------
// The block-level micro-GEMM.

template <typename acc_t, bool FAST8>
struct StagedTiles {
  using T = Tile<acc_t, FAST8>;
  acc_t left[T::kPlanes][T::BK][T::BL];
  acc_t right[T::kPlanes][T::BK][T::BR];
};

template <typename acc_t, bool FAST8>
__device__ __forceinline__ void stage_left(StagedTiles<acc_t, FAST8>& s, int k, int l, const acc_t q[4]) {
  acc_t p[Tile<acc_t, FAST8>::kPlanes];
  left_planes<FAST8>(q, p);
#pragma unroll
  for (int i = 0; i < Tile<acc_t, FAST8>::kPlanes; ++i) s.left[i][k][l] = p[i];
}

template <typename acc_t, bool FAST8>
__device__ __forceinline__ void stage_right(StagedTiles<acc_t, FAST8>& s, int k, int r, const acc_t q[4]) {
  acc_t p[Tile<acc_t, FAST8>::kPlanes];
  right_planes<FAST8>(q, p);
#pragma unroll
  for (int i = 0; i < Tile<acc_t, FAST8>::kPlanes; ++i) s.right[i][k][r] = p[i];
}

// acc[j][i] += sum_k left[:, k, tl + 16 j] ⊗ right[:, k, tr + 16 i] over the staged slice.
template <typename acc_t, bool FAST8>
__device__ __forceinline__ void tile_mma(
    const StagedTiles<acc_t, FAST8>& s,
    acc_t (&acc)[Tile<acc_t, FAST8>::TL][Tile<acc_t, FAST8>::TR][Tile<acc_t, FAST8>::kPlanes],
    int tl, int tr) {
  using T = Tile<acc_t, FAST8>;
#pragma unroll
  for (int k = 0; k < T::BK; ++k) {
    acc_t a[T::TL][T::kPlanes], b[T::TR][T::kPlanes];
#pragma unroll
    for (int j = 0; j < T::TL; ++j)
#pragma unroll
      for (int q = 0; q < T::kPlanes; ++q) a[j][q] = s.left[q][k][tl + T::kSide * j];
#pragma unroll
    for (int i = 0; i < T::TR; ++i)
#pragma unroll
      for (int q = 0; q < T::kPlanes; ++q) b[i][q] = s.right[q][k][tr + T::kSide * i];
#pragma unroll
    for (int j = 0; j < T::TL; ++j)
#pragma unroll
      for (int i = 0; i < T::TR; ++i) quat_mac<FAST8>(acc[j][i], a[j], b[i]);
  }
}

// Element e of a K x N staging pass -> (k, n). Threads walk n fastest when consecutive n are
// adjacent in memory (pixels of a contiguous NCDHW tensor), k fastest otherwise (channels of a
// channels_last tensor): only the coalescing depends on it, never the result.
template <int K, int N>
__device__ __forceinline__ void staging_coords(int e, bool k_fast, int& k, int& n) {
  if (k_fast) {
    k = e % K;
    n = e / K;
  } else {
    n = e % N;
    k = e / N;
  }
}


// Input pixel (d, h, w) that output pixel o reads at tap k; false where it falls in the padding or,
// for a transposed conv, where (o + pad - k * dil) is not a multiple of the stride.
__device__ __forceinline__ bool input_pixel(const Geometry& g, bool transposed, const int o[3], const int k[3], int i[3]) {
  bool ok = true;
#pragma unroll
  for (int d = 0; d < 3; ++d) {
    if (transposed) {
      const int num = o[d] + g.pad[d] - k[d] * g.dil[d];
      ok = ok && num >= 0 && num % g.stride[d] == 0;
      i[d] = num >= 0 ? num / g.stride[d] : -1;
    } else {
      i[d] = o[d] * g.stride[d] - g.pad[d] + k[d] * g.dil[d];
      ok = ok && i[d] >= 0;
    }
    ok = ok && i[d] < g.in[d];
  }
  return ok;
}

__device__ __forceinline__ void decode_tap(const Geometry& g, int tap, int k[3]) {
  k[2] = tap % g.kernel[2];
  k[1] = (tap / g.kernel[2]) % g.kernel[1];
  k[0] = tap / (g.kernel[2] * g.kernel[1]);
}

// Output pixel index m (over N * OD * OH * OW) -> batch n and (od, oh, ow).
__device__ __forceinline__ int64_t decode_pixel(const Geometry& g, int64_t m, int o[3]) {
  o[2] = static_cast<int>(m % g.out[2]);
  m /= g.out[2];
  o[1] = static_cast<int>(m % g.out[1]);
  m /= g.out[1];
  o[0] = static_cast<int>(m % g.out[0]);
  return m / g.out[0];
}

// ---------------------------------------------------------------------------------------------
// y = W ⊗ x (conv) or conj(W) ⊗ x (transposed conv), + bias.
//
// Grid: (ceil(M / BR), ceil(cg_out / BL), groups), M = N * OD * OH * OW. The reduction runs over
// taps x input-channel slices of BK. `w` is the weight rearranged by the host into GEMM order
// [4][groups][taps][cg_in][cg_out] (contiguous; out-channels fastest for coalesced staging).
template <typename scalar_t, bool FAST8>
__global__ void __launch_bounds__(256) qconv_kernel(
    const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ w,
    const scalar_t* __restrict__ bias,  // (4 * cq_out,) or nullptr
    scalar_t* __restrict__ y,
    Geometry g,
    int64_t M,
    bool transposed,
    bool x_channels_fast) {
  using acc_t = typename AccType<scalar_t>::type;
  using T = Tile<acc_t, FAST8>;
  __shared__ StagedTiles<acc_t, FAST8> tiles;
  __shared__ int64_t x_pix[T::BR];  // offset of the x pixel each tile pixel reads at this tap; -1: none
  __shared__ int64_t y_pix[T::BR];  // offset of each tile pixel in y; -1: past the end

  const int tid = threadIdx.x;
  const int tr = tid % T::kSide, tl = tid / T::kSide;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * T::BR;
  const int n0 = blockIdx.y * T::BL;
  const int grp = blockIdx.z;
  const int taps = g.kernel[0] * g.kernel[1] * g.kernel[2];

  // Thread t < BR owns tile pixel t for the address computations.
  int o[3] = {0, 0, 0};
  int64_t batch = 0;
  const bool owns_pixel = tid < T::BR && m0 + tid < M;
  if (owns_pixel) batch = decode_pixel(g, m0 + tid, o);
  if (tid < T::BR)
    y_pix[tid] = owns_pixel ? batch * g.sy[0] + o[0] * g.sy[2] + o[1] * g.sy[3] + o[2] * g.sy[4] : -1;

  const int64_t x_comp = static_cast<int64_t>(g.cq_in) * g.sx[1];  // distance between the r, i, j, k blocks
  const int64_t x_group = static_cast<int64_t>(grp) * g.cg_in * g.sx[1];
  const int64_t w_comp = static_cast<int64_t>(g.groups) * taps * g.cg_in * g.cg_out;
  const scalar_t* w_group = w + static_cast<int64_t>(grp) * taps * g.cg_in * g.cg_out;

  acc_t acc[T::TL][T::TR][T::kPlanes];
#pragma unroll
  for (int j = 0; j < T::TL; ++j)
#pragma unroll
    for (int i = 0; i < T::TR; ++i)
#pragma unroll
      for (int q = 0; q < T::kPlanes; ++q) acc[j][i][q] = acc_t(0);

  for (int tap = 0; tap < taps; ++tap) {
    // (The barrier ending the previous slice protects x_pix from being rewritten while in use.)
    if (tid < T::BR) {
      int k[3], i[3];
      decode_tap(g, tap, k);
      x_pix[tid] = owns_pixel && input_pixel(g, transposed, o, k, i)
          ? batch * g.sx[0] + i[0] * g.sx[2] + i[1] * g.sx[3] + i[2] * g.sx[4] + x_group
          : -1;
    }
    __syncthreads();
    const scalar_t* w_tap = w_group + static_cast<int64_t>(tap) * g.cg_in * g.cg_out;
    for (int c0 = 0; c0 < g.cg_in; c0 += T::BK) {
      // Right operand: x[c, pixel], k = input channel, r = tile pixel.
      for (int e = tid; e < T::BK * T::BR; e += T::kThreads) {
        int k, r;
        staging_coords<T::BK, T::BR>(e, x_channels_fast, k, r);
        const int c = c0 + k;
        const int64_t base = x_pix[r];
        acc_t q[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
        if (c < g.cg_in && base >= 0) {
          const scalar_t* p = x + base + c * g.sx[1];
#pragma unroll
          for (int comp = 0; comp < 4; ++comp) q[comp] = static_cast<acc_t>(p[comp * x_comp]);
        }
        stage_right(tiles, k, r, q);
      }
      // Left operand: W[c, n] (conj(W) for the transposed conv, the adjoint), l = output channel.
      for (int e = tid; e < T::BK * T::BL; e += T::kThreads) {
        const int k = e / T::BL, l = e % T::BL;
        const int c = c0 + k, n = n0 + l;
        acc_t q[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
        if (c < g.cg_in && n < g.cg_out) {
          const scalar_t* p = w_tap + static_cast<int64_t>(c) * g.cg_out + n;
#pragma unroll
          for (int comp = 0; comp < 4; ++comp) q[comp] = static_cast<acc_t>(p[comp * w_comp]);
          if (transposed) {
            q[1] = -q[1];
            q[2] = -q[2];
            q[3] = -q[3];
          }
        }
        stage_left(tiles, k, l, q);
      }
      __syncthreads();
      tile_mma(tiles, acc, tl, tr);
      __syncthreads();
    }
  }

  // Epilogue: undo fast8, add the bias, store the 4 components.
  const int64_t y_comp = static_cast<int64_t>(g.cq_out) * g.sy[1];
#pragma unroll
  for (int j = 0; j < T::TL; ++j) {
    const int n = n0 + tl + T::kSide * j;
    if (n >= g.cg_out) continue;
    const int ch = grp * g.cg_out + n;
    acc_t b[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    if (bias != nullptr) {
#pragma unroll
      for (int comp = 0; comp < 4; ++comp) b[comp] = static_cast<acc_t>(bias[comp * g.cq_out + ch]);
    }
#pragma unroll
    for (int i = 0; i < T::TR; ++i) {
      const int64_t base = y_pix[tr + T::kSide * i];
      if (base < 0) continue;
      acc_t z[4];
      finish<FAST8>(acc[j][i], z);
      scalar_t* p = y + base + ch * g.sy[1];
#pragma unroll
      for (int comp = 0; comp < 4; ++comp) p[comp * y_comp] = static_cast<scalar_t>(z[comp] + b[comp]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// gW += gy ⊗ conj(x) for a NON-transposed conv gy = conv(x, W) (the host swaps x and gy for a
// transposed conv). Here Geometry.in / cq_in / sx describe x and .out / cq_out / sy describe gy.
//
// gw: (4, cq_out, cg_in, taps) in acc_t, zero-filled; each block adds its partial sums with atomics.
// Grid: (ceil(cg_out / BL) * ceil(cg_in / BR), taps, groups * splits); split s reduces output pixels
// [s * pix_per_split, (s + 1) * pix_per_split) of the P = N * OD * OH * OW pixels of gy.
template <typename scalar_t, bool FAST8>
__global__ void __launch_bounds__(256) qconv_wgrad_kernel(
    const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ gy,
    typename AccType<scalar_t>::type* __restrict__ gw,
    Geometry g,
    int64_t P,
    int64_t pix_per_split,
    int splits,
    bool channels_fast) {
  using acc_t = typename AccType<scalar_t>::type;
  using T = Tile<acc_t, FAST8>;
  __shared__ StagedTiles<acc_t, FAST8> tiles;
  __shared__ int64_t g_pix[T::BK];  // offset of each staged pixel in gy; -1: past the end
  __shared__ int64_t x_pix[T::BK];  // offset of the x pixel it reads at this tap; -1: none

  const int tid = threadIdx.x;
  const int tr = tid % T::kSide, tl = tid / T::kSide;
  const int c_blocks = (g.cg_in + T::BR - 1) / T::BR;
  const int o0 = (blockIdx.x / c_blocks) * T::BL;
  const int c0 = (blockIdx.x % c_blocks) * T::BR;
  const int tap = blockIdx.y;
  const int grp = blockIdx.z / splits;
  const int64_t p_begin = static_cast<int64_t>(blockIdx.z % splits) * pix_per_split;
  const int64_t p_end = p_begin + pix_per_split < P ? p_begin + pix_per_split : P;

  int k[3];
  decode_tap(g, tap, k);
  const int64_t x_comp = static_cast<int64_t>(g.cq_in) * g.sx[1];
  const int64_t g_comp = static_cast<int64_t>(g.cq_out) * g.sy[1];
  const int64_t x_group = static_cast<int64_t>(grp) * g.cg_in * g.sx[1];
  const int64_t g_group = static_cast<int64_t>(grp) * g.cg_out * g.sy[1];

  acc_t acc[T::TL][T::TR][T::kPlanes];
#pragma unroll
  for (int j = 0; j < T::TL; ++j)
#pragma unroll
    for (int i = 0; i < T::TR; ++i)
#pragma unroll
      for (int q = 0; q < T::kPlanes; ++q) acc[j][i][q] = acc_t(0);

  for (int64_t p0 = p_begin; p0 < p_end; p0 += T::BK) {
    if (tid < T::BK) {
      int64_t goff = -1, xoff = -1;
      if (p0 + tid < p_end) {
        int o[3], i[3];
        const int64_t batch = decode_pixel(g, p0 + tid, o);
        goff = batch * g.sy[0] + o[0] * g.sy[2] + o[1] * g.sy[3] + o[2] * g.sy[4] + g_group;
        if (input_pixel(g, /*transposed=*/false, o, k, i))
          xoff = batch * g.sx[0] + i[0] * g.sx[2] + i[1] * g.sx[3] + i[2] * g.sx[4] + x_group;
      }
      g_pix[tid] = goff;
      x_pix[tid] = xoff;
    }
    __syncthreads();
    // Left operand: gy[o, pixel], k = pixel, l = output channel.
    for (int e = tid; e < T::BK * T::BL; e += T::kThreads) {
      int kk, l;
      staging_coords<T::BK, T::BL>(e, !channels_fast, kk, l);
      const int oc = o0 + l;
      const int64_t base = g_pix[kk];
      acc_t q[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
      if (oc < g.cg_out && base >= 0) {
        const scalar_t* p = gy + base + oc * g.sy[1];
#pragma unroll
        for (int comp = 0; comp < 4; ++comp) q[comp] = static_cast<acc_t>(p[comp * g_comp]);
      }
      stage_left(tiles, kk, l, q);
    }
    // Right operand: conj(x[c, pixel]), r = input channel.
    for (int e = tid; e < T::BK * T::BR; e += T::kThreads) {
      int kk, r;
      staging_coords<T::BK, T::BR>(e, !channels_fast, kk, r);
      const int c = c0 + r;
      const int64_t base = x_pix[kk];
      acc_t q[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
      if (c < g.cg_in && base >= 0) {
        const scalar_t* p = x + base + c * g.sx[1];
        q[0] = static_cast<acc_t>(p[0]);
#pragma unroll
        for (int comp = 1; comp < 4; ++comp) q[comp] = -static_cast<acc_t>(p[comp * x_comp]);
      }
      stage_right(tiles, kk, r, q);
    }
    __syncthreads();
    tile_mma(tiles, acc, tl, tr);
    __syncthreads();
  }

  const int taps = g.kernel[0] * g.kernel[1] * g.kernel[2];
  const int64_t gw_comp = static_cast<int64_t>(g.cq_out) * g.cg_in * taps;
#pragma unroll
  for (int j = 0; j < T::TL; ++j) {
    const int oc = o0 + tl + T::kSide * j;
    if (oc >= g.cg_out) continue;
#pragma unroll
    for (int i = 0; i < T::TR; ++i) {
      const int c = c0 + tr + T::kSide * i;
      if (c >= g.cg_in) continue;
      acc_t z[4];
      finish<FAST8>(acc[j][i], z);
      acc_t* p = gw + (static_cast<int64_t>(grp * g.cg_out + oc) * g.cg_in + c) * taps + tap;
#pragma unroll
      for (int comp = 0; comp < 4; ++comp) atomicAdd(p + comp * gw_comp, z[comp]);
    }
  }
}

}  // namespace cuda
}  // namespace aqcf
