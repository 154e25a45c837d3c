"""Where a step's time goes: each module family's share, forward and backward, from one profiled step.

The modules of each family (e.g. every conv) are wrapped in a profiler scope while the step runs
(forward hooks). An op inside a scope belongs to that family; the outermost family scope wins, so a
block's own convs count for the block (the A-QCF block's projections are its attention's cost). A
backward op belongs to the family of the forward op that recorded its autograd node: the
profiler gives both the same sequence number. What no family claims, and the step's time outside
any op (Python, the optimizer's bookkeeping), is ``rest``.

On CPU a family's time is its ops' own CPU time. On a GPU (``device="cuda"``) it is the device time
of the kernels its ops launched (the step synchronised before and after), since there the host runs
ahead of the device and an op's CPU time is its launch; ``rest`` is then the rest of the step's wall
time: kernels launched outside any op and the time the device waited on the host (a host-bound step's
share). Backward ops are taken from every thread that runs autograd's engine (on a GPU the engine's
device thread, not the caller's).

Profiling slows small ops more than big ones, so the breakdown is reported as shares of the
profiled step; :func:`component_times` scales them to an unprofiled median.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

REST = "rest"
_SCOPE = "breakdown::"
_BACKWARD = "autograd::engine::evaluate_function: "


#: A family member: a module type, or a test ``module -> bool`` asked at each call (a module whose
#: role depends on its mode, e.g. a conv + norm unit that is one folded conv in eval mode only).
Member = type | Callable[[nn.Module], bool]


def _family_of(module: nn.Module, families: Mapping[str, tuple[Member, ...]]) -> str | None:
    for family, members in families.items():
        for m in members:
            if isinstance(m, type) and isinstance(module, m) or not isinstance(m, type) and m(module):
                return family
    return None


@contextlib.contextmanager
def _family_scopes(model: nn.Module, families: Mapping[str, tuple[Member, ...]]) -> Iterator[None]:
    """Every module of a family runs its forward inside a ``breakdown::<family>`` profiler scope,
    unless a family scope is already open (the outermost wins). Membership is decided per call."""
    open_scopes: list[record_function | None] = []

    def enter(module: nn.Module, args) -> None:
        family = None if any(s is not None for s in open_scopes) else _family_of(module, families)
        scope = None if family is None else record_function(_SCOPE + family)
        if scope is not None:
            scope.__enter__()
        open_scopes.append(scope)

    def leave(module: nn.Module, args, output) -> None:
        scope = open_scopes.pop()
        if scope is not None:
            scope.__exit__(None, None, None)

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


#: how kineto (torch 2.13) starts the two lines it writes to stderr at each profile's start and stop,
#: ``USDT:<date> <pid>:<tid> SyncActivityProfilerHandler.cpp:52] profiler_start``, whatever
#: ``KINETO_LOG_LEVEL`` short of silencing its errors too
KINETO_MARKER = "USDT:"


@contextlib.contextmanager
def kineto_markers_dropped() -> Iterator[None]:
    """File descriptor 2 diverted to a file while the block runs, then written back without kineto's start
    and stop markers (:data:`KINETO_MARKER`): a benchmark that profiles a step per case printed two such
    lines a case between its progress lines. Everything else on stderr (kineto's errors, warnings) is kept,
    after the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as diverted:
        os.dup2(diverted.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            diverted.seek(0)
            kept = [
                line
                for line in diverted.read().splitlines(keepends=True)
                if not line.startswith(KINETO_MARKER.encode())
            ]
            if kept:
                os.write(2, b"".join(kept))


def _attributed(model: nn.Module, step: Callable[[], None], families: Mapping[str, tuple[Member, ...]], device: str):
    """Run ``step()`` once under the profiler; return its wall time in µs and, for each op event of the
    step's threads that a family claims, ``(event, family)``."""
    cuda = device == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with kineto_markers_dropped(), _family_scopes(model, families), profile(activities=activities) as prof:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        wall_us = (time.perf_counter() - start) * 1e6
    return wall_us, claimed_events(prof.events())


def claimed_events(events) -> list:
    """``(event, family)`` for each host op event of the step that a family claims: events of the thread that
    ran the family scopes and of autograd's engine threads (intra-op worker threads run inside a claimed op's
    span; device kernels are counted through the op that launched them)."""
    family_of_event: dict[int, str | None] = {}
    family_of_node: dict[int, str | None] = {}  # forward op's sequence number -> family

    def family(e) -> str | None:
        key = id(e)
        if key not in family_of_event:
            if e.name.startswith(_SCOPE):
                found = e.name[len(_SCOPE) :]
            elif e.name.startswith(_BACKWARD):
                found = family_of_node.get(e.sequence_nr)
            else:
                found = family(e.cpu_parent) if e.cpu_parent is not None else None
            family_of_event[key] = found
        return family_of_event[key]

    events = [e for e in events if e.device_type == DeviceType.CPU]
    # Forward first (events come in start order, a node's forward op before its backward), then all.
    # Every op that starts while autograd's counter is at n records n, whether or not it makes a node
    # (a norm's in-place update of its running statistics does not); the op that makes node n is the
    # last of them to start, since the counter moves on as it does. So the last one decides, family or
    # not: with the first, a conv's backward after a norm counted for the norm.
    for e in events:
        if not e.name.startswith(_BACKWARD) and e.sequence_nr >= 0:
            family_of_node[e.sequence_nr] = family(e)
    threads = {e.thread for e in events if e.name.startswith((_SCOPE, _BACKWARD))}
    return [(e, f) for e in events if e.thread in threads and (f := family(e)) is not None]


def spent_seconds(
    wall_us: float, claimed: list, families: Mapping[str, tuple[Member, ...]], device: str
) -> dict[str, float]:
    """Seconds of each family (its ops' own CPU time; on ``cuda`` the device time of the kernels they
    launched) and of ``rest``, the step's wall time that no family's ops account for."""
    spent: dict[str, float] = dict.fromkeys(families, 0.0)
    for e, f in claimed:
        if device == "cuda":  # a scope launches nothing itself (its device annotation spans its ops' kernels)
            spent[f] += 0.0 if e.name.startswith(_SCOPE) else e.self_device_time_total
        else:
            spent[f] += e.self_cpu_time_total
    spent[REST] = max(wall_us - sum(spent.values()), 0.0)
    return {f: t / 1e6 for f, t in spent.items()}


def profiled_seconds(
    model: nn.Module, step: Callable[[], None], families: Mapping[str, tuple[Member, ...]], device: str = "cpu"
) -> dict[str, float]:
    """Seconds of one profiled ``step()`` spent in each family's modules (forward and backward) and in
    ``rest`` (:func:`spent_seconds`); they sum to the profiled step's wall time."""
    return spent_seconds(*_attributed(model, step, families, device), families, device)


def profiled_ops(
    model: nn.Module, step: Callable[[], None], families: Mapping[str, tuple[Member, ...]]
) -> dict[str, set[str]]:
    """The names of the ops of one profiled ``step()`` that each family claims (what
    :func:`profiled_seconds` adds up), for checking the attribution without timing anything."""
    ops: dict[str, set[str]] = {f: set() for f in families}
    for e, f in _attributed(model, step, families, "cpu")[1]:
        ops[f].add(e.name)
    return ops


def shares(
    model: nn.Module, step: Callable[[], None], families: Mapping[str, tuple[Member, ...]], device: str = "cpu"
) -> dict[str, float]:
    """:func:`profiled_seconds` as fractions of the profiled step; they sum to 1."""
    seconds = profiled_seconds(model, step, families, device)
    total = sum(seconds.values())
    return {f: t / total for f, t in seconds.items()}


def component_times(
    model: nn.Module,
    step: Callable[[], None],
    families: Mapping[str, tuple[Member, ...]],
    median_s: float,
    device: str = "cpu",
) -> dict[str, float]:
    """:func:`shares` of one profiled step on ``device`` (its type), scaled to an unprofiled step of ``median_s``
    seconds."""
    return {f: share * median_s for f, share in shares(model, step, families, device).items()}


__all__ = [
    "REST",
    "claimed_events",
    "component_times",
    "kineto_markers_dropped",
    "profiled_ops",
    "profiled_seconds",
    "shares",
    "spent_seconds",
]
