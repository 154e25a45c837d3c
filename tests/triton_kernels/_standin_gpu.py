"""An sm_90 GPU as far as triton 3.6's JIT and autotuner ask, for scripts run with triton 3.6 first on the
path and no GPU (_autotune_with_triton36.py, _launch_with_triton36.py): every launch specialises its
arguments and compiles for real (ptxas included), and launches nothing; the kernels' inputs are CPU
tensors, so their outputs are whatever memory held.
"""

import os
import threading
from types import SimpleNamespace

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import compiler as triton_compiler
from triton.runtime import OutOfResources

#: the SM count of the H100/H200 (what launchers that size their grids by the GPU read)
SMS = 132
#: their shared memory a program may have (227 KB; ``AQCF_STANDIN_MAX_SHARED`` stands in for a GPU with less): a
#: kernel that needs more is refused at its launch, as triton's ``CompiledKernel._init_handles`` refuses it on the
#: GPU, with ``OutOfResources``
MAX_SHARED = int(os.environ.get("AQCF_STANDIN_MAX_SHARED", 232448))
#: ``(kernel name, shared memory it needed)`` of each launch refused so
REFUSED: list[tuple[str, int]] = []


class StandInDriver:
    """What triton's JIT and autotuner ask of the active driver before a launch."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_benchmarker(self):
        def bench(kernel_call, quantiles):
            kernel_call()  # a trial: the lookup (or compile) of its kernel, then the no-op launch
            return [1.0] * len(quantiles)

        return bench


def install(on_compile=None) -> list:
    """Make triton launch onto the stand-in; returns the list that each compile appends
    ``(thread name, on_compile())`` to."""
    compiles = []
    real_compile = triton_compiler.compile

    def counting_compile(*args, **kwargs):
        compiles.append((threading.current_thread().name, on_compile() if on_compile else None))
        return real_compile(*args, **kwargs)

    triton.runtime.driver.set_active(StandInDriver())
    triton.compiler.compile = triton_compiler.compile = counting_compile  # (the JIT binds it at first call)
    triton_compiler.CompiledKernel.launch_metadata = lambda self, *args: None
    triton_compiler.CompiledKernel.run = property(_checked_no_op_launch)
    torch.cuda.get_device_properties = lambda device=None: SimpleNamespace(
        name="stand-in sm_90", multi_processor_count=SMS, major=9, minor=0
    )
    return compiles


def _checked_no_op_launch(kernel):
    """A compiled kernel's launch function on the stand-in: nothing, once the kernel has passed the check triton
    makes as it loads a kernel onto a GPU, its shared memory against the device's (:data:`MAX_SHARED`)."""
    if kernel.metadata.shared > MAX_SHARED:
        REFUSED.append((kernel.name, kernel.metadata.shared))
        raise OutOfResources(kernel.metadata.shared, MAX_SHARED, "shared memory")
    return lambda *args: None


def start_for_tool(convs: bool) -> bool:
    """What a tool measuring the Triton launch path on CPU does first: False (with a line on stderr) under
    ``TRITON_INTERPRET``, whose launches take no launch path; else install the stand-in and let the norm's
    Triton launchers (and with ``convs`` the conv backend's) take CPU tensors: a launch does nothing with them."""
    import sys

    if os.environ.get("TRITON_INTERPRET"):
        print("unset TRITON_INTERPRET: the interpreter runs no launch path", file=sys.stderr)
        return False
    install()
    from aqcf_kernels.backends.triton import common, norm

    common.serves_fused = lambda t: True
    norm.serves = lambda t: True
    if convs:
        common.cannot_serve_tensor = lambda t: None
        common.unavailable = lambda: None
    return True
