// Howell & Lafon's 8-multiplication Hamilton product over any real bilinear map.
//
// A quaternion conv, its transposed conv and its weight gradient are all Hamilton products
// Z = A ⊗ B whose scalar products A_p * B_a are one real bilinear map (conv, conv_transpose or
// the weight-gradient correlation); see aqcf_kernels/quaternion.py. This engine runs any of them
// with 8 calls of that map instead of 16, streaming so that the transformed operands never
// outlive the product that reads them.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/FunctionRef.h>

#include <array>

namespace aqcf {

// One operand of a Hamilton product: its four components [r, i, j, k]. With `conjugate` the
// operand is read as (r, -i, -j, -k); the signs are folded into the transforms and the output
// coefficients, so the conjugate is never materialised.
struct QuaternionOperand {
  std::array<at::Tensor, 4> components;
  bool conjugate = false;
};

// A real bilinear map product(left, right) -> tensor with the shape of one output component.
using BilinearProduct = c10::function_ref<at::Tensor(const at::Tensor&, const at::Tensor&)>;

// Writes Z_c + addend[c] into out[c] for Z = left ⊗ right. `out[c]` may be strided views (e.g. the
// blocks of one blocked tensor). `addend[c]`, if defined, broadcasts to out[c]: a bias, or out[c]
// itself to accumulate. Peak extra memory: s5..s8 (one output's worth), one s_c, and one
// transformed pair (left_m, right_m).
void fast8_hamilton_product(
    const QuaternionOperand& left,
    const QuaternionOperand& right,
    BilinearProduct product,
    const std::array<at::Tensor, 4>& out,
    const std::array<at::Tensor, 4>& addend);

}  // namespace aqcf
