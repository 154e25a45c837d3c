"""Quaternion recurrent layers with ``torch.nn.RNN`` / ``LSTM`` / ``GRU`` conventions.

:class:`QuaternionRNN` (Elman, tanh or ReLU), :class:`QuaternionLSTM` and :class:`QuaternionLiGRU`
(Ravanelli et al.'s light GRU: one update gate, no reset gate, a ReLU candidate, batch norm on the
input projection), the quaternion layers of speechbrain's ``q_RNN.py`` (``QRNN``, ``QLSTM``,
``QLiGRU``) with torch.nn's arguments: ``input_size`` and ``hidden_size`` count REAL features
(multiples of 4, blocked ``[r | i | j | k]``), ``num_layers``, ``bias``, ``batch_first``, ``dropout``
(between layers), ``bidirectional``, an optional initial state in and the final state out, and
``PackedSequence`` inputs.

How a layer computes, per direction:

1. the input projection of EVERY time step at once, one quaternion GEMM
   (:func:`aqcf_kernels.functional.quaternion_linear`, ``algorithm`` as given: 'auto' measures
   hamilton against fast8), plus the recurrent bias folded in, plus (LiGRU) the batch norm;
2. the recurrence ``gates = proj_t + W_hh ⊗ h_{t−1}`` and the layer's cell, every step.

On CPU float32/float64 with the compiled extension, step 2 of an unpacked sequence is ONE op per
direction, :func:`aqcf_kernels.ops.rnn_cell.rnn_sequence` (csrc/cpu/rnn_cell.cpp): per step one GEMM of
the four stacked components of ``h`` with the four weight components (it reads the quaternion weight,
a quarter of the expanded one: at batch 8 the step is bound by reading the weight) and one fused
element-wise pass (Hamilton signs, gates, cell); its backward runs through time in C++, keeps the
gates' gradients (they are the gradient of the projection) and forms the weight gradient in one GEMM
over all steps. Measured on this 2-core CPU (1 layer, 512 real hidden, batch 8, 100 steps,
forward+backward, LSTM): the per-step composite loop spent ~60% of its time in the backward's two
GEMMs per step (one of them the rank-8 weight gradient, a full 4 MiB matrix per step) and ~10% adding
those per-step weight gradients; the fused op runs the same layer ~4x faster (1951 -> 495 ms on one
busy thread). On CUDA (every tensor of one dtype, triton importable) the same op runs the Triton
kernels of backends/triton/rnn_cell.py: per step a cuBLAS GEMM on the expanded weight and one Triton
launch for the whole cell, forward and backward.

Elsewhere (packed sequences, no extension or triton, other devices, ``algorithm='fast8'``) a Python loop runs the
composite cells (:func:`_rnn_cell`, :func:`_lstm_cell`, :func:`_ligru_cell`) with the recurrent product
on the expanded real weight, built ONCE per forward: each step is one ``addmm``, and autograd sums the
steps' weight gradients into that one matrix, folded back to the quaternion weight once. Measured
(batch 8, 512 real hidden, LSTM gates, forward+backward per step): the ``aqcf.qconv`` op called per
step 13-17 ms, speechbrain's construction (weight rebuilt every step) 5-7 ms, the expanded weight built
once 2-3 ms. The per-step op pays its dispatch, weight expansion and fold on every step of a GEMM whose
batch is only the minibatch, which is also why fast8 cannot pay there; ``algorithm='fast8'`` still runs
the recurrent step on the op (opt-in, for measuring).

Weights: per layer ``l`` and direction (suffix ``_reverse``) ONE quaternion parameter per projection,
``weight_ih_l{l}`` ``(4, G·H/4, in/4)`` and ``weight_hh_l{l}`` ``(4, G·H/4, H/4)`` (G gates: 1, 4, 2),
biases ``bias_ih_l{l}`` and ``bias_hh_l{l}`` ``(G·H,)``, as torch.nn names them.

Gates: speechbrain's. The ``G·H`` projection (blocked over its ``G·H/4`` quaternions) is cut into G
consecutive pieces of ``H`` reals, each read as one blocked gate tensor (speechbrain's ``chunk(4·G)``
followed by ``cat`` of four chunks is exactly ``chunk(G)``): with the LSTM's four gates the input
gate is the real component block of the projection, the forget gate the i block, and so on. Gate
order (i, f, o, g) for the LSTM, as speechbrain (torch.nn.LSTM has i, f, g, o), and (candidate,
update) for the LiGRU. Parcollet's original QLSTM gives each gate a quaternion map of its own
instead; speechbrain's layout is the one whose checkpoints load here.

Differences from speechbrain's layers, all on purpose (torch.nn's conventions where they disagree):

* separate weights per direction (speechbrain shares one set between the two directions; its state
  dicts load into both copies); the final state is the state after each direction's last step
  (speechbrain returns the output at the last time index, i.e. the reverse direction's FIRST step);
  an initial cell state ``c_0`` is used (speechbrain starts the cell at zero whatever ``hx`` is);
* ``dropout`` drops layer outputs between layers (torch.nn); speechbrain's ``dropout`` is a
  recurrent mask on the candidate, drawn from a bank of 16000 masks; none here;
* ``QuaternionLiGRU``'s default candidate is ReLU (Ravanelli's definition); speechbrain's
  ``QLiGRU`` defaults to leaky ReLU (``nonlinearity='leaky_relu'`` matches it), and normalises both
  directions with one batch norm (statistics over both in training), here one per direction.

The concatenation of the two directions (forward first) is the plain one of torch.nn and
speechbrain, not :func:`aqcf_kernels.layout.qcat`: ``output[..., :H]`` and ``output[..., H:]`` are
each a blocked quaternion tensor, their concatenation is not one (use ``qcat`` on the two halves for
a downstream quaternion layer). Between layers the plain concatenation is kept so that speechbrain's
checkpoints compute the same function here.

Loading speechbrain's ``QRNN`` / ``QLSTM`` / ``QLiGRU`` state dicts: ``load_state_dict`` recognises
their keys (``rnn.{l}.w.r_weight``, ...) and converts them (see :meth:`_QuaternionRNNBase._load_from_state_dict`).
Not supported: LSTM ``proj_size``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .._fx import fx_leaf
from ..functional import quaternion_linear
from ..ops import rnn_cell as rnn_cell_ops
from ..ops.lowerings import exporting_to_onnx, rnn_sequence_lowering
from ..params import autocast_casts, same_dtype_under_autocast
from ..quaternion import check_algorithm
from ._base import COMPONENTS, check_quaternion_channels
from .init import check_init, init_quaternion_
from .norm import QuaternionBatchNorm1d

# ---------------------------------------------------------------------------------------------
# Cells: the element-wise part of one time step, one function per layer type
# ---------------------------------------------------------------------------------------------


# The composite cells live in ops/rnn_cell.py (the fused kernel's reference); the per-step loop below uses
# them where the fused op does not serve (packed sequences, no extension, other devices, fast8).
_rnn_cell, _lstm_cell, _ligru_cell = rnn_cell_ops.rnn_cell, rnn_cell_ops.lstm_cell, rnn_cell_ops.ligru_cell


# ---------------------------------------------------------------------------------------------
# The shared module
# ---------------------------------------------------------------------------------------------


_expanded_weight = rnn_cell_ops.expanded_weight


def _autocast_plan(proj: Tensor, *others: Tensor | None) -> tuple[torch.dtype, torch.dtype] | None:
    """Under ``torch.autocast`` (on for ``proj``'s device, and ``proj`` a dtype it casts): ``(the dtype the
    recurrence runs in, the dtype of its outputs)``, the second the autocast dtype, the first too where a fused
    kernel serves it (:func:`aqcf_kernels.ops.rnn_cell.available`, asked on zero-stride stand-ins: no copy),
    else float32. ``None`` without autocast."""
    if not autocast_casts(proj):
        return None
    dtype = torch.get_autocast_dtype(proj.device.type)
    stand_ins = [None if t is None else t.new_empty(1, dtype=dtype).expand(t.shape) for t in (proj, *others)]
    return (dtype if rnn_cell_ops.available(*stand_ins) else torch.float32), dtype


def _direction_suffix(direction: int) -> str:
    return "_reverse" if direction else ""


class _QuaternionRNNBase(nn.Module):
    """Parameters, checks, packing and the time loop shared by the three layers.

    Subclasses set ``_gates`` (gate blocks per projection) and ``_has_cell_state``, and implement
    :meth:`_cell`; the LiGRU adds its batch norms through :meth:`_make_extra` and :meth:`_normalize`.
    """

    _gates: int
    _has_cell_state = False

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int,
        bias: bool,
        batch_first: bool,
        dropout: float,
        bidirectional: bool,
        device: Any,
        dtype: Any,
        algorithm: str,
        init: str,
        init_criterion: str,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        input_size = check_quaternion_channels(name, "input_size", input_size)
        hidden_size = check_quaternion_channels(name, "hidden_size", hidden_size)
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers <= 0:
            raise ValueError(f"{name}: num_layers must be a positive int, got {num_layers!r}")
        if (
            not isinstance(dropout, numbers.Number)
            or isinstance(dropout, bool)
            or not 0 <= dropout <= 1
            or math.isnan(dropout)
        ):
            raise ValueError(f"{name}: dropout must be a number in [0, 1], got {dropout!r}")
        for flag, value in (("bias", bias), ("batch_first", batch_first), ("bidirectional", bidirectional)):
            if not isinstance(value, bool):
                raise ValueError(f"{name}: {flag} must be a bool, got {value!r}")
        check_algorithm(name, algorithm)
        check_init(name, init, init_criterion)
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                f"{name}: dropout={dropout} has no effect with num_layers=1 (it drops the outputs of every "
                "layer but the last, as torch.nn's recurrent layers do)",
                stacklevel=3,
            )
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional = bidirectional
        self.algorithm, self.init, self.init_criterion = algorithm, init, init_criterion

        factory = {"device": device, "dtype": dtype}
        gates_h = self._gates * hidden_size
        self._param_names: list[str] = []
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else self.num_directions * hidden_size
            for direction in range(self.num_directions):
                sfx = f"_l{layer}{_direction_suffix(direction)}"
                params = {
                    f"weight_ih{sfx}": torch.empty((4, gates_h // 4, layer_in // 4), **factory),
                    f"weight_hh{sfx}": torch.empty((4, gates_h // 4, hidden_size // 4), **factory),
                }
                if self._has_bias_ih():
                    params[f"bias_ih{sfx}"] = torch.empty(gates_h, **factory)
                if self._has_bias_hh():
                    params[f"bias_hh{sfx}"] = torch.empty(gates_h, **factory)
                for pname, value in params.items():
                    setattr(self, pname, nn.Parameter(value))
                    self._param_names.append(pname)
                self._make_extra(sfx, factory)
        self.reset_parameters()

    # ----------------------------------------------------------------- structure

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _has_bias_ih(self) -> bool:
        return self.bias

    def _has_bias_hh(self) -> bool:
        return self.bias

    def _make_extra(self, sfx: str, factory: dict[str, Any]) -> None:
        """Per layer and direction modules besides the weights (the LiGRU's batch norm)."""

    def _normalize(self, sfx: str, proj: Tensor) -> Tensor:
        """The input projection after its normalisation (identity but for the LiGRU)."""
        return proj

    def _cell(self, gates: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def _sequence_args(self) -> tuple[str, str, float]:
        """``(mode, nonlinearity, negative_slope)`` of :func:`aqcf_kernels.ops.rnn_cell.rnn_sequence`."""
        raise NotImplementedError

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """The parameters per layer and direction, as ``torch.nn.RNNBase.all_weights``."""
        per = len(self._param_names) // (self.num_layers * self.num_directions)
        names = self._param_names
        return [[getattr(self, n) for n in names[i : i + per]] for i in range(0, len(names), per)]

    def flatten_parameters(self) -> None:
        """No-op, for code written against ``torch.nn.LSTM`` (there is no cuDNN weight buffer here)."""

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Every weight from ``init`` and ``init_criterion``; biases at zero; norms reset.

        Like :class:`~aqcf_kernels.nn.QuaternionLinear` and speechbrain's ``QLinear`` (Parcollet's init,
        zero bias), not torch.nn's ``U(-1/sqrt(H), 1/sqrt(H))`` on everything. The fans of a projection
        count all its gates: ``fan_out = G·H/4`` quaternions, as speechbrain's fused projections.
        """
        for pname in self._param_names:
            p = getattr(self, pname)
            if pname.startswith("weight"):
                init_quaternion_(p, self.init, self.init_criterion, generator)
            else:
                nn.init.zeros_(p)
        for m in self.children():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        s += self._extra_repr_options()
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if self.algorithm != "auto":
            s += f", algorithm={self.algorithm!r}"
        if self.init != "quaternion":
            s += f", init={self.init!r}"
        if self.init_criterion != "glorot":
            s += f", init_criterion={self.init_criterion!r}"
        return s

    def _extra_repr_options(self) -> str:
        return ""

    # ----------------------------------------------------------------- checks

    def _check_state(self, what: str, state: Any, batch: int, unbatched: bool, like: Tensor) -> Tensor:
        name = type(self).__name__
        layers = self.num_layers * self.num_directions
        shape = (layers, self.hidden_size) if unbatched else (layers, batch, self.hidden_size)
        if not isinstance(state, Tensor):
            raise TypeError(f"{name}: {what} must be a Tensor, got {type(state).__name__}")
        if tuple(state.shape) != shape:
            layout = "(num_layers * num_directions, " + ("" if unbatched else "batch, ") + "hidden_size)"
            raise ValueError(
                f"{name}: {what} must have shape {layout} = {shape} for this input, got {tuple(state.shape)}"
            )
        if state.dtype != like.dtype or state.device != like.device:
            raise ValueError(
                f"{name}: {what} is {state.dtype} on {state.device} but input is {like.dtype} on {like.device}"
            )
        return state.unsqueeze(1) if unbatched else state

    def _initial_states(self, hx: Any, batch: int, unbatched: bool, like: Tensor) -> tuple[Tensor, Tensor | None]:
        name = type(self).__name__
        shape = (self.num_layers * self.num_directions, batch, self.hidden_size)
        if hx is None:
            zeros = like.new_zeros(shape)
            return zeros, (zeros if self._has_cell_state else None)
        if self._has_cell_state:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError(f"{name}: hx must be a tuple (h_0, c_0), got {type(hx).__name__}")
            return (
                self._check_state("h_0", hx[0], batch, unbatched, like),
                self._check_state("c_0", hx[1], batch, unbatched, like),
            )
        return self._check_state("hx", hx, batch, unbatched, like), None

    # ----------------------------------------------------------------- forward

    @fx_leaf
    def forward(self, input: Tensor | PackedSequence, hx: Any = None) -> tuple[Any, Any]:
        """``(output, h_n)`` (LSTM: ``(output, (h_n, c_n))``) as ``torch.nn.RNN`` / ``GRU`` / ``LSTM``.

        ``input``: ``(T, B, input_size)`` (``(B, T, input_size)`` with ``batch_first``), an unbatched
        ``(T, input_size)``, or a ``PackedSequence``. ``hx``: ``(num_layers · num_directions, B, hidden_size)``
        (LSTM: a tuple ``(h_0, c_0)``), zeros if ``None``. ``output`` has ``num_directions · hidden_size``
        features, the forward direction's first.
        """
        name = type(self).__name__
        sizes: list[int] | None = None
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_indices, unsorted_indices = input
            if data.dim() != 2:
                raise ValueError(f"{name}: a PackedSequence's data must be 2-D (sum of lengths, input_size)")
            sizes = batch_sizes.tolist()
            batch, unbatched = sizes[0], False
            x = data
        else:
            if not isinstance(input, Tensor):
                raise TypeError(f"{name}: input must be a Tensor or a PackedSequence, got {type(input).__name__}")
            if input.dim() not in (2, 3):
                layout = "(batch, seq, feature)" if self.batch_first else "(seq, batch, feature)"
                raise ValueError(
                    f"{name}: input must be 3-D {layout} or 2-D (seq, feature) unbatched, got {tuple(input.shape)}"
                )
            unbatched = input.dim() == 2
            x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if self.batch_first else input)
            if x.shape[0] == 0:
                raise ValueError(f"{name}: input has no time steps (shape {tuple(input.shape)})")
            batch = x.shape[1]
            sorted_indices = unsorted_indices = None
        if not x.is_floating_point():
            raise TypeError(f"{name}: input must be floating point, got {x.dtype}")
        weight = self.weight_ih_l0
        if not same_dtype_under_autocast(x, weight) or x.device != weight.device:  # as nn.LSTM's check
            raise TypeError(
                f"{name}: input is {x.dtype} on {x.device} but the layer's parameters are {weight.dtype} on "
                f"{weight.device}"
            )
        if x.shape[-1] != self.input_size:
            raise ValueError(
                f"{name}: input has {x.shape[-1]} features (last dim), expected input_size={self.input_size}"
            )
        h0, c0 = self._initial_states(hx, batch, unbatched, x)
        if sorted_indices is not None:  # a PackedSequence sorted by length: the states follow its order
            h0 = h0.index_select(1, sorted_indices)
            c0 = None if c0 is None else c0.index_select(1, sorted_indices)

        h_n: list[Tensor] = []
        c_n: list[Tensor] = []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.num_directions):
                k = layer * self.num_directions + direction
                out, h, c = self._run_direction(
                    f"_l{layer}{_direction_suffix(direction)}",
                    x,
                    sizes,
                    h0[k],
                    None if c0 is None else c0[k],
                    reverse=direction == 1,
                )
                outputs.append(out)
                h_n.append(h)
                if c is not None:
                    c_n.append(c)
            x = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)

        h_out = torch.stack(h_n)
        c_out = torch.stack(c_n) if c_n else None
        if sizes is not None:
            output: Any = PackedSequence(x, batch_sizes, sorted_indices, unsorted_indices)
            if unsorted_indices is not None:
                h_out = h_out.index_select(1, unsorted_indices)
                c_out = None if c_out is None else c_out.index_select(1, unsorted_indices)
        elif unbatched:
            output, h_out = x.squeeze(1), h_out.squeeze(1)
            c_out = None if c_out is None else c_out.squeeze(1)
        else:
            output = x.transpose(0, 1) if self.batch_first else x
        return output, ((h_out, c_out) if self._has_cell_state else h_out)

    def _run_direction(
        self, sfx: str, x: Tensor, sizes: list[int] | None, h0: Tensor, c0: Tensor | None, reverse: bool
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """One layer, one direction: ``(output, h_last, c_last)``.

        ``x`` is ``(T, B, in)``, or packed rows ``(N, in)`` with ``sizes[t]`` rows at step ``t``
        (non-increasing, the longest sequences first): then a sequence that ended drops out of the
        state (its final state is kept aside), and in the reverse direction a sequence joins, from its
        initial state, at its own last step.
        """
        w_ih = getattr(self, f"weight_ih{sfx}")
        w_hh = getattr(self, f"weight_hh{sfx}")
        b_ih = getattr(self, f"bias_ih{sfx}", None)
        b_hh = getattr(self, f"bias_hh{sfx}", None)
        # 1. The input projection of every step: one quaternion GEMM, the recurrent bias folded into its
        # bias (b_ih + b_hh: one pass fewer), then the norm (the LiGRU, which never has b_hh).
        bias = b_hh if b_ih is None else (b_ih if b_hh is None else b_ih + b_hh)
        proj = self._normalize(sfx, quaternion_linear(x, w_ih, bias, algorithm=self.algorithm))
        plan = _autocast_plan(proj, h0, c0, w_hh)
        if plan is None:
            return self._recurrence(proj, w_hh, sizes, h0, c0, reverse)
        # Under autocast the recurrence is one op, as torch.nn.LSTM is: its outputs in the autocast dtype. It
        # runs in that dtype where a fused kernel serves it (Triton on CUDA), else in float32 (the C++ kernel
        # on CPU): left to autocast op by op, its mixed dtypes took the composite loop (2x slower on CPU).
        run, out = plan
        with torch.autocast(proj.device.type, enabled=False):
            cast = [None if t is None else t.to(run) for t in (proj, w_hh, h0, c0)]
            output, h, c = self._recurrence(*cast[:2], sizes, *cast[2:], reverse)
        return output.to(out), h.to(out), (None if c is None else c.to(out))

    def _recurrence(
        self, proj: Tensor, w_hh: Tensor, sizes: list[int] | None, h0: Tensor, c0: Tensor | None, reverse: bool
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """:meth:`_run_direction` from the input projection ``proj`` on: the recurrence over every step."""
        # while torch.onnx.export captures a model: the op's lowering, one ONNX Scan over a dynamic length
        # (this loop would fix it to the example's), whether or not a fused kernel serves (see ops.lowerings)
        exporting = exporting_to_onnx()
        if (
            self.algorithm != "fast8"
            and sizes is None
            and proj.shape[0] > 0
            and (exporting or rnn_cell_ops.available(proj, h0, c0, w_hh))
        ):
            # the whole sequence in one fused op (csrc/cpu/rnn_cell.cpp; Triton on CUDA)
            sequence = rnn_sequence_lowering if exporting else torch.ops.aqcf.rnn_sequence
            output, cells, _ = sequence(proj, h0, c0, w_hh, *self._sequence_args(), reverse)
            last = 0 if reverse else -1
            return output, output[last], (cells[last] if c0 is not None else None)
        steps = proj.unbind(0) if sizes is None else proj.split(sizes)
        # 2. The recurrent product: the expanded weight, built once (see the module docstring).
        w_hh_t = None if self.algorithm == "fast8" else _expanded_weight(w_hh).t()

        n = len(steps)
        order = range(n - 1, -1, -1) if reverse else range(n)
        first = steps[order[0]].shape[0]
        h = h0[:first]
        c = None if c0 is None else c0[:first]
        outputs: list[Tensor] = [h] * n  # placeholders, every index is overwritten
        ended_h: list[Tensor] = []
        ended_c: list[Tensor] = []
        for t in order:
            proj_t = steps[t]
            rows = proj_t.shape[0]
            if rows < h.shape[0]:  # forward, packed: the sequences of rows [rows, ...) have ended
                ended_h.append(h[rows:])
                h = h[:rows]
                if c is not None:
                    ended_c.append(c[rows:])
                    c = c[:rows]
            elif rows > h.shape[0]:  # reverse, packed: sequences [len(h), rows) start here
                h = torch.cat([h, h0[h.shape[0] : rows]])
                if c is not None:
                    c = torch.cat([c, c0[c.shape[0] : rows]])
            if w_hh_t is None:
                gates = proj_t + quaternion_linear(h, w_hh, algorithm=self.algorithm)
            else:
                gates = torch.addmm(proj_t, h, w_hh_t)
            h, c = self._cell(gates, h, c)
            outputs[t] = h
        if ended_h:  # rows in order: the last active ones, then those that ended latest first
            h = torch.cat([h, *reversed(ended_h)])
            c = None if c is None else torch.cat([c, *reversed(ended_c)])
        output = torch.stack(outputs) if sizes is None else torch.cat(outputs)
        return output, h, c

    # ----------------------------------------------------------------- speechbrain checkpoints

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        """Converts speechbrain ``QRNN`` / ``QLSTM`` / ``QLiGRU`` keys in place, then loads normally.

        speechbrain's layer ``l`` is ``rnn.{l}``: projections ``w`` (input) and ``u`` (recurrent), each
        a ``QLinear`` with components ``{r,i,j,k}_weight`` of shape ``(in/4, out/4)`` (transposed here) and
        an optional ``bias``; the LiGRU's ``norm`` (a ``QBatchNorm``: ``gamma``, ``beta``, running
        statistics). Its buffers ``h_init`` (zeros) and ``drop_masks`` (dropout bank) are dropped. Its
        bidirectional layers share one set of weights: they are loaded into both directions. Shapes,
        missing and unexpected keys are then checked as for any state dict.
        """
        if f"{prefix}rnn.0.w.r_weight" in state_dict and f"{prefix}weight_ih_l0" not in state_dict:
            self._convert_speechbrain(state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _convert_speechbrain(self, state_dict: dict[str, Tensor], prefix: str) -> None:
        layer = 0
        while f"{prefix}rnn.{layer}.w.r_weight" in state_dict:
            sb = f"{prefix}rnn.{layer}."
            converted: dict[str, Tensor] = {}
            for ours, theirs in (("weight_ih", "w"), ("weight_hh", "u")):
                keys = [f"{sb}{theirs}.{c}_weight" for c in COMPONENTS]
                if all(key in state_dict for key in keys):
                    converted[ours] = torch.stack([state_dict.pop(key).transpose(0, 1) for key in keys])
            for ours, theirs in (("bias_ih", "w"), ("bias_hh", "u")):
                if f"{sb}{theirs}.bias" in state_dict:
                    converted[ours] = state_dict.pop(f"{sb}{theirs}.bias")
            norm_keys = [key for key in state_dict if key.startswith(f"{sb}norm.")]
            norm = {key[len(f"{sb}norm.") :]: state_dict.pop(key) for key in norm_keys}
            for buffer in ("h_init", "drop_masks"):
                state_dict.pop(f"{sb}{buffer}", None)
            for direction in range(self.num_directions):
                sfx = f"_l{layer}{_direction_suffix(direction)}"
                for ours, value in converted.items():
                    state_dict[f"{prefix}{ours}{sfx}"] = value
                for key, value in norm.items():
                    state_dict[f"{prefix}norm{sfx}.{key}"] = value
            layer += 1


# ---------------------------------------------------------------------------------------------
# The layers
# ---------------------------------------------------------------------------------------------


class QuaternionRNN(_QuaternionRNNBase):
    """Quaternion Elman RNN: ``h_t = act(W_ih ⊗ x_t + b_ih + W_hh ⊗ h_{t−1} + b_hh)``, act tanh or ReLU.

    Arguments as ``torch.nn.RNN`` (sizes in real features, multiples of 4) plus ``algorithm`` (of the
    input projection), ``init`` and ``init_criterion``. speechbrain's ``QRNN`` computes the same
    function (its ``dropout`` aside); its state dicts load. See :mod:`aqcf_kernels.nn.recurrent`.
    """

    _gates = 1

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: Any = None,
        dtype: Any = None,
        *,
        algorithm: str = "auto",
        init: str = "quaternion",
        init_criterion: str = "glorot",
    ) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"{type(self).__name__}: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
            device, dtype, algorithm, init, init_criterion,
        )  # fmt: skip

    def _cell(self, gates: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, None]:
        return _rnn_cell(gates, self.nonlinearity), None

    def _sequence_args(self) -> tuple[str, str, float]:
        return "rnn", self.nonlinearity, 0.0

    def _extra_repr_options(self) -> str:
        return "" if self.nonlinearity == "tanh" else f", nonlinearity={self.nonlinearity!r}"


class QuaternionLSTM(_QuaternionRNNBase):
    """Quaternion LSTM; gates ``[i | f | o | g]`` of one projection per input (speechbrain's ``QLSTM``).

    ``c_t = σ(f) c_{t−1} + σ(i) tanh(g)``, ``h_t = σ(o) tanh(c_t)``. Arguments as ``torch.nn.LSTM``
    (sizes in real features, multiples of 4; no ``proj_size``) plus ``algorithm``, ``init`` and
    ``init_criterion``; returns ``(output, (h_n, c_n))``. See :mod:`aqcf_kernels.nn.recurrent` for the
    gate layout and the differences from speechbrain.
    """

    _gates = 4
    _has_cell_state = True

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: Any = None,
        dtype: Any = None,
        *,
        algorithm: str = "auto",
        init: str = "quaternion",
        init_criterion: str = "glorot",
    ) -> None:
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
            device, dtype, algorithm, init, init_criterion,
        )  # fmt: skip

    def _cell(self, gates: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor]:
        return _lstm_cell(gates, c)

    def _sequence_args(self) -> tuple[str, str, float]:
        return "lstm", "tanh", 0.0


class QuaternionLiGRU(_QuaternionRNNBase):
    """Quaternion light GRU (Ravanelli et al. 2018; speechbrain's ``QLiGRU``).

    ``[a | z] = BN(W_ih ⊗ x_t) + W_hh ⊗ h_{t−1}``, ``z ← σ(z)``, ``h_t = z h_{t−1} + (1 − z) act(a)``:
    one update gate, no reset gate, ``act`` ReLU (``nonlinearity``: 'relu', 'leaky_relu' with
    ``negative_slope``, 'tanh'). ``normalization='batchnorm'`` (default) puts a quaternion batch norm
    (:class:`~aqcf_kernels.nn.QuaternionBatchNorm1d`, ``norm_l{l}``, over the ``2·hidden_size`` projection,
    statistics over every time step and sequence; ``norm_eps`` and ``norm_momentum``, speechbrain's
    defaults 1e-4 and 0.1) on the input projection of all steps; ``None`` for none.

    ``bias``: without normalisation, a bias on the input projection (``bias_ih_l{l}``). With batch
    norm the norm's shift β is the bias (a bias before a batch norm is cancelled by its mean), so
    ``bias`` adds nothing; there is never a recurrent bias (neither Ravanelli's nor speechbrain's
    LiGRU has one). Arguments otherwise as ``torch.nn.GRU``; returns ``(output, h_n)``.
    """

    _gates = 2

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: Any = None,
        dtype: Any = None,
        *,
        nonlinearity: str = "relu",
        negative_slope: float = 0.01,
        normalization: str | None = "batchnorm",
        norm_eps: float = 1e-4,
        norm_momentum: float | None = 0.1,
        algorithm: str = "auto",
        init: str = "quaternion",
        init_criterion: str = "glorot",
    ) -> None:
        name = type(self).__name__
        if nonlinearity not in ("relu", "leaky_relu", "tanh"):
            raise ValueError(f"{name}: nonlinearity must be 'relu', 'leaky_relu' or 'tanh', got {nonlinearity!r}")
        if normalization not in ("batchnorm", None):
            raise ValueError(f"{name}: normalization must be 'batchnorm' or None, got {normalization!r}")
        if not isinstance(negative_slope, (int, float)) or isinstance(negative_slope, bool):
            raise ValueError(f"{name}: negative_slope must be a number, got {negative_slope!r}")
        self.nonlinearity, self.negative_slope = nonlinearity, float(negative_slope)
        self.normalization, self.norm_eps, self.norm_momentum = normalization, norm_eps, norm_momentum
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
            device, dtype, algorithm, init, init_criterion,
        )  # fmt: skip

    def _has_bias_ih(self) -> bool:
        return self.bias and self.normalization is None

    def _has_bias_hh(self) -> bool:
        return False

    def _make_extra(self, sfx: str, factory: dict[str, Any]) -> None:
        if self.normalization == "batchnorm":
            norm = QuaternionBatchNorm1d(
                self._gates * self.hidden_size, eps=self.norm_eps, momentum=self.norm_momentum, **factory
            )
            self.add_module(f"norm{sfx}", norm)

    def _normalize(self, sfx: str, proj: Tensor) -> Tensor:
        if self.normalization is None:
            return proj
        rows = proj.reshape(-1, proj.shape[-1])
        return getattr(self, f"norm{sfx}")(rows).reshape(proj.shape)

    def _cell(self, gates: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, None]:
        return _ligru_cell(gates, h, self.nonlinearity, self.negative_slope), None

    def _sequence_args(self) -> tuple[str, str, float]:
        return "ligru", self.nonlinearity, self.negative_slope

    def _extra_repr_options(self) -> str:
        s = "" if self.nonlinearity == "relu" else f", nonlinearity={self.nonlinearity!r}"
        if self.nonlinearity == "leaky_relu" and self.negative_slope != 0.01:
            s += f", negative_slope={self.negative_slope}"
        return s + ("" if self.normalization == "batchnorm" else f", normalization={self.normalization!r}")


__all__ = ["QuaternionRNN", "QuaternionLSTM", "QuaternionLiGRU"]
