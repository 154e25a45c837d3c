"""torch.func support of the ops: when they step aside for functorch's transforms and forward-mode AD.

functorch (``torch.func.grad``, ``vjp``, ``jacrev``, ``jvp``, ``jacfwd``, ``hessian``, ``vmap``) refuses both
autograd implementations the ops have: the extension's C++ ``torch::autograd::Function`` ("cannot use C++
torch::autograd::Function with functorch transforms") and the ``autograd.Function`` that
``torch.library.custom_op`` generates (its forward takes ``ctx``; torch 2.13); neither has forward-mode
formulas (``torch.autograd.forward_ad``'s dual tensors). So while a transform or a dual level is active
(:func:`transforms_active`, well under a microsecond), the callers take another route:

* the conv family (:mod:`.conv`: every conv, transposed conv and quaternion linear) goes through
  functorch-style ``autograd.Function`` s with the op's own backward, a forward-mode rule and a vmap
  rule that folds the vmapped dim into the conv's batch or groups: the fast kernels still serve;
* the norms, the fused recurrent sequence and the A-QCF attention and gate take their composite
  PyTorch code (the reference-checked path every other case takes), which functorch differentiates
  and batches itself. The composite attention materialises its ``N_a × N_b`` scores.
"""

from __future__ import annotations

import torch
from torch.autograd import forward_ad

#: Whether a torch.func transform is active: inside a transform's ``autograd.Function`` the transform's own
#: level is popped, and the op is called directly unless another level remains.
functorch_active = torch._C._are_functorch_transforms_active


def transforms_active() -> bool:
    """Whether a torch.func transform (grad, vjp, jvp, vmap, ...) or a forward-mode AD dual level
    (``torch.autograd.forward_ad.dual_level``) is active at this call."""
    return functorch_active() or forward_ad._current_level >= 0
