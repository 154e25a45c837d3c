"""What a backend of each op family implements: the :class:`ConvBackend` and :class:`AttentionBackend` Protocols.

A backend is an object (one instance per backend and family) that

* says, for any call, either ``None`` (it can serve) or a short reason it cannot — first for the whole
  machine (:meth:`Backend.unavailable`), then for one call (``cannot_serve``…) — so the registry can
  print why it was passed over and a forced backend fails with the backend's own words;
* declares its optional capabilities as class attributes (``fuses_activation``), which the ops read;
  nothing is probed with ``getattr``.

Backends subclass these Protocols explicitly: that inherits the defaults written here (the capability
flags, :meth:`ConvBackend.algorithms`), makes a class that leaves out a required (abstract) method
impossible to instantiate, and lets a type checker hold each method to its signature.
:func:`aqcf_kernels.backends.register` also checks that every member is present.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from .. import tuning
from ..params import ConvParams
from ..quaternion import ALGORITHMS


def contract_algorithms(input: Tensor, weight: Tensor | None = None) -> tuple[str, ...]:
    """The algorithms the accuracy contract (DESIGN.md) lets ``algorithm='auto'`` pick for a call on ``input``
    (and ``weight``, when it is an operand of the call: not for a weight gradient): hamilton always; fast8
    in float32 and float64 — in half precision its error is bounded only on balanced components, so there
    it is opt-in (an explicit ``algorithm='fast8'``), or picked for the caller only behind the balance
    guard when ``tuning.half_fast8 = 'balanced'`` (:func:`aqcf_kernels.tuning.half_fast8_allowed`)."""
    if input.dtype in (torch.float32, torch.float64) or tuning.half_fast8_allowed(input, weight):
        return ALGORITHMS
    return ("hamilton",)


def activate(z: Tensor, activation: str, negative_slope: float) -> Tensor:
    """``act(z)`` out of place, as ``aqcf::qconv`` defines its ``activation`` (GELU in erf form): what a
    backend that does not fuse the activation, or must keep ``z``, applies after the conv."""
    if activation == "relu":
        return torch.relu(z)
    if activation == "leaky_relu":
        return torch.nn.functional.leaky_relu(z, negative_slope)
    return torch.nn.functional.gelu(z)


def bias_grad(grad_output: Tensor) -> Tensor:
    """The gradient of a per-channel bias added to an output whose gradient is ``grad_output``: its sum over
    every dim but the channels (dim 1)."""
    return grad_output.sum(dim=[0, *range(2, grad_output.dim())])


#: Which of the three computations of a conv a call is: the op's output, the input gradient (a conv of
#: ``grad_output`` with the adjoint geometry) or the weight gradient. Autograd saves ``'auto'``, so
#: each is resolved to an algorithm on its own (see :func:`aqcf_kernels.backends.resolve_conv`).
ConvKind = Literal["forward", "input_grad", "weight_grad"]
CONV_KINDS: tuple[str, ...] = ("forward", "input_grad", "weight_grad")


@runtime_checkable
class Backend(Protocol):
    """Members every backend has, whatever its family."""

    #: the name ``AQCF_BACKEND`` and :func:`aqcf_kernels.backends.use` select it by
    name: str
    #: device types this backend can ever serve ("cpu", "cuda", ...)
    device_types: tuple[str, ...]

    @abstractmethod
    def unavailable(self) -> str | None:
        """Why this backend cannot run at all on this machine (``None`` if it can)."""
        ...


@runtime_checkable
class ConvBackend(Backend, Protocol):
    """A backend of the quaternion conv family (ops ``aqcf::qconv`` and ``aqcf::qconv_weight_grad``).

    ``algorithm`` is always resolved when a method is called: 'hamilton' or 'fast8', never 'auto'.
    ``params`` describe the conv as the user wrote it (``transposed`` included); the weight is
    ``(4, A, B, *k)`` and tensors are blocked ``[r|i|j|k]`` (see ``aqcf_kernels.quaternion``).
    """

    #: Capability: :meth:`conv_act` applies the activation inside the conv (one pass over the output).
    #: Without it the op runs :meth:`conv` and then the activation in PyTorch.
    fuses_activation: bool = False

    @abstractmethod
    def cannot_serve(self, input: Tensor, weight: Tensor, params: ConvParams, algorithm: str) -> str | None:
        """Why this backend cannot run this particular call (``None`` if it can).

        For the weight gradient ``weight`` is a data-less stand-in with the weight's shape, dtype and device.
        """
        ...

    def algorithms(self, input: Tensor) -> tuple[str, ...]:
        """The algorithms this backend offers ``algorithm='auto'`` for ``input`` (default: both). What the
        accuracy contract allows for the call is applied on top, once per call (:func:`contract_algorithms`)."""
        return ALGORITHMS

    @abstractmethod
    def conv(self, input: Tensor, weight: Tensor, bias: Tensor | None, params: ConvParams, algorithm: str) -> Tensor:
        """``y = W ⊗ x`` (+ bias), or the transposed conv (the adjoint) when ``params.transposed``."""
        ...

    @abstractmethod
    def conv_weight_grad(
        self, input: Tensor, grad_output: Tensor, weight_shape: list[int], params: ConvParams, algorithm: str
    ) -> Tensor:
        """Gradient of ``<grad_output, conv(input, W)>`` with respect to W, shape ``weight_shape``."""
        ...

    def conv_weight_bias_grad(
        self, input: Tensor, grad_output: Tensor, weight_shape: list[int], params: ConvParams, algorithm: str
    ) -> tuple[Tensor, Tensor]:
        """``(weight gradient, bias gradient)``: :meth:`conv_weight_grad` and the bias's, ``grad_output`` summed
        over every dim but the channels (:func:`bias_grad`). Default: the two one after the other; a backend
        whose weight-gradient kernel reads ``grad_output`` anyway may sum it in the same launch."""
        return self.conv_weight_grad(input, grad_output, weight_shape, params, algorithm), bias_grad(grad_output)

    def native_engine(self) -> str | None:
        """Which code of the compiled extension computes exactly what this backend's methods do: ``'cpu'`` (its
        CPU conv engine) or ``'aten'`` (its ATen path, ``conv_aten``), or ``None``. A call signature this
        backend served is then remembered by the extension's op kernels (CPU and CUDA), which serve its later
        calls without Python (``aqcf_kernels.ops.conv``). Default ``None``: every call comes through Python."""
        return None

    def conv_act(
        self,
        input: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        params: ConvParams,
        algorithm: str,
        activation: str,
        negative_slope: float,
        keep_pre: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """``(act(conv(...)), z)`` with ``z`` the pre-activation, written only if ``keep_pre`` (else ``None``).

        Called only on backends whose ``fuses_activation`` is true. ``activation`` is one of
        ``aqcf_kernels.ops.conv.ACTIVATIONS``.
        """
        raise NotImplementedError(f"{type(self).__name__} declares fuses_activation = {self.fuses_activation}")


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the log-sum-exp every attention backend returns: fp32 (fp64 for fp64 inputs),
    whatever the inputs' precision."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@runtime_checkable
class AttentionBackend(Backend, Protocol):
    """A backend of the A-QCF attention family (ops ``aqcf::cross_attention``, ``aqcf::gated_residual``
    and their backward ops; see ``aqcf_kernels.ops.attention`` for the maths).

    Attention tensors are ``(B, H, N, E)``; outputs may have any strides (the ops make them contiguous);
    log-sum-exps are ``(B, H, N)`` in :func:`lse_dtype` of the inputs.
    """

    @abstractmethod
    def cannot_serve_attention(self, q: Tensor) -> str | None:
        """Why this backend cannot run ``cross_attention`` (and its backward) for queries like ``q``."""
        ...

    @abstractmethod
    def cannot_serve_gate(self, f: Tensor, gate_logits: Tensor) -> str | None:
        """Why this backend cannot run ``gated_residual`` (and its backward) for these tensors."""
        ...

    @abstractmethod
    def cross_attention(
        self, q_a: Tensor, k_a: Tensor, v_a: Tensor, q_b: Tensor, k_b: Tensor, v_b: Tensor, scale: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Both directions: ``(out_a, out_b, lse_a, lse_b)``, ``out_a = softmax(q_a k_bᵀ·scale) v_b`` and
        ``out_b = softmax(q_b k_aᵀ·scale) v_a``."""
        ...

    @abstractmethod
    def cross_attention_backward(
        self,
        grad_a: Tensor,
        grad_b: Tensor,
        q_a: Tensor,
        k_a: Tensor,
        v_a: Tensor,
        q_b: Tensor,
        k_b: Tensor,
        v_b: Tensor,
        out_a: Tensor,
        out_b: Tensor,
        lse_a: Tensor,
        lse_b: Tensor,
        scale: float,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(dq_a, dk_a, dv_a, dq_b, dk_b, dv_b)`` from the saved outputs and log-sum-exps."""
        ...

    @abstractmethod
    def gated_residual(self, f: Tensor, o: Tensor, gate_logits: Tensor, alpha: Tensor) -> Tensor:
        """``f + alpha · sigmoid(gate_logits) ⊙ o``; ``gate_logits`` may broadcast to ``f``."""
        ...

    @abstractmethod
    def gated_residual_backward(
        self, grad: Tensor, o: Tensor, gate_logits: Tensor, alpha: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(d_o, d_gate_logits, d_alpha)``; ``d_gate_logits`` has ``gate_logits``' (broadcast) shape."""
        ...

    def native_attention_kernel(self, q: Tensor, k: Tensor, v: Tensor) -> str | None:
        """The PyTorch kernel this backend runs for one direction ``(q, k, v)`` when the compiled extension
        calls it the same way (csrc/cpu/attention_op.h): ``'cpu_flash'``, ``'flash'`` or ``'efficient'``
        (CUDA); else ``None``. A call signature whose two directions have one is then served by the
        extension's op kernels without Python (``aqcf_kernels.ops.attention``). Default ``None``."""
        return None

    def native_gate(self) -> bool:
        """Whether the compiled extension's gate (csrc/cpu/attention_op.h) computes exactly what this
        backend's ``gated_residual`` and its backward do, so that a call signature it served may skip Python
        next time. Default ``False``."""
        return False


def has_own_methods(backend: object, cls: type, names: tuple[str, ...]) -> bool:
    """Whether ``backend``'s methods ``names`` are ``cls``'s own: not replaced by a subclass or a test, so
    what they compute is what ``cls`` declares (:meth:`ConvBackend.native_engine`)."""
    return all(getattr(getattr(backend, name), "__func__", None) is getattr(cls, name) for name in names)


def protocol_members(protocol: type) -> frozenset[str]:
    """The public attributes and methods a class must have to implement ``protocol``."""
    names: set[str] = set()
    for cls in protocol.__mro__:
        if getattr(cls, "_is_protocol", False) and cls.__module__ == __name__:
            names.update(getattr(cls, "__annotations__", {}))
            names.update(n for n, v in vars(cls).items() if callable(v) and not n.startswith("_"))
    return frozenset(names)
