// What torch.autocast does to the aqcf ops that run in its lower precision (a convolution, the
// attention and the gate that adds its output; aqcf_kernels/ops/autocast.py says why): floating tensors
// on the device, float64 excepted, cast to the autocast dtype, then the op with autocast off, so the
// backends see one dtype. The cast is aten's own (cached_cast: a parameter is cast once per autocast
// region, as for aten's convolutions).
//
// Why native: under autocast every call of these ops passes its device's autocast kernel first, and
// the Python one cost a Python call per op (the training step runs under bf16 autocast on CUDA), in
// front of op kernels that serve remembered signatures without Python (op.h, attention_op.h).
#pragma once

#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <optional>

namespace aqcf {

// For the lifetime of the object: the device's autocast off; operator() casts an argument by autocast's rule.
template <c10::DeviceType device>
class LowerPrecision {
 public:
  LowerPrecision()
      : autocast_off_(at::autocast::get_autocast_dispatch_key_from_device_type(device)),
        dtype_(at::autocast::get_autocast_dtype(device)) {}

  at::Tensor operator()(const at::Tensor& t) const { return at::autocast::cached_cast(dtype_, t, device); }
  std::optional<at::Tensor> operator()(const std::optional<at::Tensor>& t) const {
    return at::autocast::cached_cast(dtype_, t, device);
  }

 private:
  c10::impl::ExcludeDispatchKeyGuard autocast_off_;
  at::ScalarType dtype_;
};

}  // namespace aqcf
