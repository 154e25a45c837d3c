// Host emulation of the CUDA kernels of csrc/cuda/qconv_kernels.cuh, for test_cuda_kernels_emulated.py.
//
// The kernel source is compiled as plain C++: every block runs as blockDim std::threads, __shared__
// becomes `static` (one copy, shared by the block's threads; blocks run one after another),
// __syncthreads is a std::barrier and atomicAdd takes a mutex. The launch planning (argument checks,
// weight layout, geometry, pixel splits) is the extension's own qconv_plan.h; only the launch itself
// mirrors qconv_launch.cu (grids as in qconv_cuda.cpp). Every output is NaN-poisoned before the kernel runs.
#include <torch/extension.h>

#include <atomic>
#include <barrier>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
thread_local dim3 threadIdx;
dim3 blockIdx;
static std::barrier<>* g_barrier = nullptr;
static std::mutex g_atomic_mutex;
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(n)
inline void __syncthreads() { g_barrier->arrive_and_wait(); }
template <typename T>
T atomicAdd(T* p, T v) {
  std::lock_guard<std::mutex> lock(g_atomic_mutex);
  T old = *p;
  *p = old + v;
  return old;
}

#include "qconv_kernels.cuh"
#include "qconv_plan.h"

template <typename F>
void emulate(dim3 grid, int threads, F body) {
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = {x, y, z};
        std::barrier<> bar(threads);
        g_barrier = &bar;
        std::vector<std::thread> ts;
        for (int t = 0; t < threads; ++t)
          ts.emplace_back([&, t] {
            threadIdx = {static_cast<unsigned>(t), 0, 0};
            body();
          });
        for (auto& t : ts) t.join();
      }
}

using namespace aqcf::cuda;

at::Tensor emu_conv(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                    bool transposed, std::vector<int64_t> output_padding, int64_t groups, bool fast8) {
  ConvPlan plan = plan_conv(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups);
  if (plan.y.numel() == 0) return plan.y;
  plan.y.fill_(std::numeric_limits<double>::quiet_NaN());  // poisoned: unwritten elements show
  const at::Tensor x5 = as_5d(input), y5 = as_5d(plan.y);
  const bool xcf = channels_fast(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, input.scalar_type(), "emu", [&] {
    with_fast8(fast8, [&](auto tag) {
      constexpr bool kFast8 = decltype(tag)::value;
      using T = Tile<typename AccType<scalar_t>::type, kFast8>;
      dim3 grid{static_cast<unsigned>((plan.M + T::BR - 1) / T::BR), static_cast<unsigned>((plan.g.cg_out + T::BL - 1) / T::BL),
                static_cast<unsigned>(groups)};
      const scalar_t* xp = x5.data_ptr<scalar_t>();
      const scalar_t* wp = plan.w.data_ptr<scalar_t>();
      const scalar_t* bp = plan.b ? plan.b->data_ptr<scalar_t>() : nullptr;
      scalar_t* yp = y5.data_ptr<scalar_t>();
      emulate(grid, T::kThreads, [&] { qconv_kernel<scalar_t, kFast8>(xp, wp, bp, yp, plan.g, plan.M, transposed, xcf); });
    });
  });
  return plan.y;
}

at::Tensor emu_wgrad(const at::Tensor& input, const at::Tensor& grad_output, std::vector<int64_t> weight_shape,
                     std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                     bool transposed, std::vector<int64_t> output_padding, int64_t groups, bool fast8, int64_t target_blocks) {
  WgradPlan plan = plan_wgrad(input, grad_output, weight_shape, stride, padding, dilation, transposed, groups);
  const Geometry& g = plan.g;
  if (plan.P > 0 && g.cg_in > 0 && g.cg_out > 0) {
    const at::Tensor x5 = as_5d(plan.x), g5 = as_5d(plan.gy);
    const bool cf = channels_fast(plan.x);
    const int64_t taps = plan.gw.size(3);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, input.scalar_type(), "emu", [&] {
      using acc_t = typename AccType<scalar_t>::type;
      with_fast8(fast8, [&](auto tag) {
        constexpr bool kFast8 = decltype(tag)::value;
        using T = Tile<acc_t, kFast8>;
        const int64_t tiles = ((g.cg_out + T::BL - 1) / T::BL) * ((g.cg_in + T::BR - 1) / T::BR);
        PixelSplit split = split_pixels(plan.P, tiles * taps * groups, target_blocks, 65535 / groups, T::BK);
        dim3 grid{static_cast<unsigned>(tiles), static_cast<unsigned>(taps), static_cast<unsigned>(groups * split.splits)};
        const scalar_t* xp = x5.data_ptr<scalar_t>();
        const scalar_t* gp = g5.data_ptr<scalar_t>();
        acc_t* wp = plan.gw.data_ptr<acc_t>();
        emulate(grid, T::kThreads, [&] {
          qconv_wgrad_kernel<scalar_t, kFast8>(xp, gp, wp, g, plan.P, split.per_split, static_cast<int>(split.splits), cf);
        });
      });
    });
  }
  return plan.gw.view(weight_shape).to(input.scalar_type());
}

// Same arguments as _C.cuda_conv / _C.cuda_conv_weight_grad (the latter plus the number of blocks
// the pixel split aims for, which stands in for 4 x the SM count).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cuda_conv", &emu_conv);
  m.def("cuda_conv_weight_grad", &emu_wgrad);
}
