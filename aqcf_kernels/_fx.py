"""torch.fx symbolic tracing: a quaternion module or function is one node of a traced graph.

FX's default tracer keeps the modules of ``torch.nn`` as leaves (one ``call_module`` node each, run by
the module at execution time), records torch's functions as ``call_function`` nodes, and runs every
other Python function or module ``forward`` with ``Proxy`` objects in place of tensors. That cannot
work for this package's layers and functions: they check shapes, dtypes and the blocked layout, pick a
backend and, for the norms and recurrent layers, branch on ``self.training``, all in Python, on values
a ``Proxy`` does not have. So each records itself as FX records torch's own:

- a module (:func:`fx_leaf` on its ``forward``) as a ``call_module`` node: the node calls the module, so
  its hooks, train/eval mode, unbatched inputs and backend choice work in the traced ``GraphModule``
  as in eager mode. The node is made through the tracer's own ``create_proxy`` while the tracer's
  ``call_module`` is on the stack, so a tracer that names or scopes nodes by module path (torchvision's
  ``NodePathTracer``, behind ``create_feature_extractor``) names this one too.
- a function (:func:`fx_leaf_function`: ``functional``'s ops, ``layout``'s ``qcat``, ``qsplit``...) as a
  ``call_function`` node, as ``torch.fx.wrap`` would, but whatever name the caller imported it by.

Only a ``Proxy`` argument under ``torch.fx.symbolic_trace`` changes anything: ``torch.compile``,
``torch.export`` and ``make_fx`` trace with real or fake tensors and run the code itself.
"""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch.fx import Proxy
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.utils._pytree import tree_leaves

Fn = TypeVar("Fn", bound=Callable[..., Any])


def _first_proxy(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Proxy | None:
    """The first ``Proxy`` among the arguments (inside lists, tuples and dicts too: ``qcat([a, b])``)."""
    if not is_fx_symbolic_tracing():
        return None
    return next((a for a in tree_leaves((args, kwargs)) if isinstance(a, Proxy)), None)


def fx_leaf(forward: Fn) -> Fn:
    """Decorates a module's ``forward``: under ``torch.fx.symbolic_trace`` the call becomes one
    ``call_module`` node instead of running ``forward``; otherwise ``forward`` runs as is (one flag
    read per call)."""

    @functools.wraps(forward)
    def traced_as_leaf(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        proxy = _first_proxy(args, kwargs)
        if proxy is None:
            return forward(self, *args, **kwargs)
        tracer = proxy.tracer
        if self is getattr(tracer, "root", None):
            # (a graph of the module alone would need a node calling the graph's own root)
            raise TypeError(
                f"torch.fx: {type(self).__name__} is a leaf of traced graphs (one call_module node, as torch.nn's "
                "layers are); trace a module that contains it, e.g. torch.fx.symbolic_trace(torch.nn.Sequential(layer))"
            )
        if self._forward_pre_hooks or self._forward_hooks:
            # (nn.Module's call ran them around this forward, on Proxy values; torch.nn's leaves skip them)
            warnings.warn(
                f"torch.fx: the hooks of {type(self).__name__} ran while tracing, on Proxy values, and run again "
                "each time the traced graph calls the layer; register them after tracing",
                stacklevel=3,
            )
        return tracer.create_proxy("call_module", tracer.path_of_module(self), args, kwargs)

    # FX reads the root forward's code through __wrapped__ and, for keyword-only parameters (the convs'
    # weight=, bias=, activation=), rewrites the code it then calls: the wrapper's, which has none of those
    # names (CodeType's "co_varnames is too small"). Without __wrapped__ FX reads the wrapper's own
    # (*args, **kwargs) and calls it, which gives the root's error above; __signature__ keeps what
    # inspect.signature (help(), docs) shows.
    del traced_as_leaf.__wrapped__
    traced_as_leaf.__signature__ = inspect.signature(forward)  # type: ignore[attr-defined]
    return _own_code(traced_as_leaf, forward)


def fx_leaf_function(fn: Fn) -> Fn:
    """Decorates a function: under ``torch.fx.symbolic_trace`` a call with a ``Proxy`` argument becomes
    one ``call_function`` node (of the decorated function, which runs ``fn`` when the graph runs)."""

    @functools.wraps(fn)
    def traced_as_call(*args: Any, **kwargs: Any) -> Any:
        proxy = _first_proxy(args, kwargs)
        if proxy is None:
            return fn(*args, **kwargs)
        return proxy.tracer.create_proxy("call_function", traced_as_call, args, kwargs)

    return _own_code(traced_as_call, fn)


def _own_code(wrapper: Callable[..., Any], wrapped: Callable[..., Any]) -> Any:
    """``wrapper`` with a code object of its own, named after ``wrapped``. torch.compile keeps its compiled
    graphs per code object, up to a small number (``torch._dynamo.config.recompile_limit``, 8): with one
    code object shared by every decorated forward, each layer class compiled on its own took a slot of the
    same few, and the ninth ran uncompiled. (Tracebacks name the wrapped function too.)"""
    names = {"co_name": wrapped.__name__}
    if sys.version_info >= (3, 11):
        names["co_qualname"] = f"{wrapped.__qualname__}.<fx wrapper>"
    wrapper.__code__ = wrapper.__code__.replace(**names)
    return wrapper


__all__ = ["fx_leaf", "fx_leaf_function"]
