"""The Triton interpreter patches ``triton.language`` once per launch, not once more per helper call.

To interpret a kernel, triton swaps the builtins of ``triton.language`` (and ``tl.core``, ``tl.math``,
``tl.tensor``) for interpreted ones for the duration of the launch (``interpreter._patch_lang``, undone when
the launch ends). It also calls ``_patch_lang`` on every call of a ``@triton.jit`` helper from inside the
kernel (``InterpretedFunction.__call__``), which redoes that work, ``inspect.getmembers`` over the modules
included, and changes nothing: the modules a helper sees are already patched, and a patched builtin is no
longer a builtin, so it is skipped. That redundant work was 22% of an interpreted A-QCF-Net training step
(14.6 of 67 s under cProfile, 16,334 helper calls in 346 launches; triton 3.9).

Here a helper's call skips it when every language module in the helper's globals is one the launch already
patched; any other call goes through triton's own. Results are those of triton's path (nothing the kernels
compute changes: the same patched functions run), which the suite's interpreter tests check against the
reference as before.
"""

from __future__ import annotations

import inspect
import threading


def install() -> bool:
    """Install the shortcut; ``False`` where triton's interpreter is not there or has another shape."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    patch_lang = getattr(interpreter, "_patch_lang", None)
    no_patch = getattr(interpreter, "_LangPatchScope", None)
    if getattr(patch_lang, "once", False):
        return True  # (installed already)
    if patch_lang is None or no_patch is None:
        return False

    launch_call = interpreter.GridExecutor.__call__
    state = threading.local()  # the language modules the launch in progress patched

    def langs_of(fn) -> frozenset[int]:
        return frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))

    def launch(self, *args, **kwargs):
        state.patched = None  # (the launch's own patch comes first: it records what it covered)
        try:
            return launch_call(self, *args, **kwargs)
        finally:
            state.patched = None

    def patch_lang_once(fn):
        langs, patched = langs_of(fn), getattr(state, "patched", None)
        if patched is not None and langs <= patched:
            return no_patch()  # (nothing set, so nothing to undo)
        scope = patch_lang(fn)
        if patched is None:
            state.patched = langs
        return scope

    patch_lang_once.once = True
    interpreter._patch_lang = patch_lang_once
    interpreter.GridExecutor.__call__ = launch
    return True
