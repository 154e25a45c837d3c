// Howell & Lafon's 8-multiplication Hamilton product over any real bilinear map.
//
// A quaternion conv, its transposed conv and its weight gradient are all Hamilton products
// Z = A ⊗ B whose scalar products A_p * B_a are one real bilinear map (conv, conv_transpose or
// the weight-gradient correlation); see aqcf_kernels/quaternion.py. This engine runs any of them
// with 8 calls of that map instead of 16, on batch slices, streaming so that the transformed
// operands never outlive the products that read them.
//
// Memory passes: the 8 operands of the batched side come in 4 pairs A_p ± A_q, each formed in one
// pass reading A_p and A_q once; the 4 output components are written in one pass reading the 8
// products once. (One pass per operand and one per output component read 24 and 20
// component-sized tensors where these read 8 and 8.)
//
// Threading: the whole product is ONE parallel region whose threads take (slice, group of products)
// items from a shared counter, and each item runs single-threaded (ATen and oneDNN run serially
// inside a parallel region). The first engine parallelised every add, conv and output pass separately:
// ~30 parallel regions per slice, each ending in a barrier that waits for the slowest thread. On a
// busy machine (another process on one of the two cores) a descheduled thread stalled every one of
// those barriers and fwd+bwd fell to 0.26-0.6x of the expanded conv. With items handed out on
// demand, a thread that gets less CPU simply takes fewer items.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/FunctionRef.h>

#include "activation.h"

#include <array>

namespace aqcf {

// One operand of a Hamilton product: its four components [r, i, j, k]. With `conjugate` the
// operand is read as (r, -i, -j, -k); the signs are folded into the transforms and the output
// coefficients, so the conjugate is never materialised. A `batched` operand is cut into batch
// slices along dim 0 with the product; a shared one (a weight) is read whole by every slice.
struct QuaternionOperand {
  std::array<at::Tensor, 4> components;
  bool conjugate = false;
  bool batched = true;
  // The memory format a shared operand's transforms are written in (Preserve: its components'); a
  // conv's weight in its input's channels_last, so that no product copies it (weight_format_for).
  at::MemoryFormat memory_format = at::MemoryFormat::Preserve;
};

// A real bilinear map product(left, right) -> tensor with the shape of one output component.
// Called concurrently from several threads.
using BilinearProduct = c10::function_ref<at::Tensor(const at::Tensor&, const at::Tensor&)>;

// How the batch (dim 0 of the batched operands) is cut: `batch` samples, `slice` per item.
struct BatchSlices {
  int64_t batch;
  int64_t slice;
};

// Z = left ⊗ right, slice by slice.
// * batched output: writes act(Z_c + addend[c]) into out[c] (strided views, e.g. the blocks of one
//   blocked tensor); `addend[c]`, if defined, broadcasts to out[c] (a bias); `act` runs in the same
//   output pass.
// * shared output (a weight gradient): writes the sum over slices of Z_c into out[c], with a
//   summation order fixed by the thread count (deterministic run to run).
// Peak extra memory: the 8 products of the slices in flight (~ threads + 1 slices), and per item in
// flight up to 4 transformed operands of a slice (2 for a conv).
void fast8_hamilton_product(
    const QuaternionOperand& left,
    const QuaternionOperand& right,
    BilinearProduct product,
    const std::array<at::Tensor, 4>& out,
    bool out_batched,
    const std::array<at::Tensor, 4>& addend,
    BatchSlices slices,
    const Activation& act = {});

// The same product on any device (what runs on CUDA: cuDNN under at::convolution), on the caller's
// thread and stream: the 8 products one after the other on whole operands, then out[c] = act(Z_c
// (+ addend[c])) as ATen ops in the operands' accumulation type (float for bf16/fp16), rounded once.
// Peak extra memory: the 8 products (the whole batch's).
void fast8_hamilton_product_in_sequence(
    const QuaternionOperand& left,
    const QuaternionOperand& right,
    BilinearProduct product,
    const std::array<at::Tensor, 4>& out,
    const std::array<at::Tensor, 4>& addend,
    const Activation& act = {});

}  // namespace aqcf
