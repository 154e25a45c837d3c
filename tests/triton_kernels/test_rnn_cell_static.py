"""Static proof (issue 16) of the fused recurrence's cell kernels: what an H100/H200 would run, read without a GPU.

``tools/triton_resources.py --rnn --quick`` compiles the forward and backward cell kernels of every cell
(RNN tanh/ReLU, LSTM, LiGRU with each candidate; fp32 and bf16 alternating, the LSTM also in fp64) for
sm_90 with **triton 3.6** (the GPU machines' version), as a launch at batch 8 x hidden 512 specialises
them, and exits non-zero if a variant has stack (spills) or its loads are not vectorised. The interpreted
tests (test_rnn_cell_triton.py) never run triton's compiler: this is what proves the kernels compile.
Triton 3.6 is found as for test_igemm_static.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from .test_igemm_static import ROOT, TRITON36, WHY_NOT, triton36_env

pytestmark = pytest.mark.skipif(TRITON36 is None, reason=WHY_NOT)


def test_cell_kernels_compile_for_sm90_without_spills_and_with_vector_loads():
    env = triton36_env()
    cmd = [sys.executable, str(ROOT / "tools" / "triton_resources.py"), "--rnn", "--quick"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    print("\n" + result.stdout)  # registers, stack and load widths per variant
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "triton 3.6" in result.stdout
    assert "all variants: no spills, vectorised loads" in result.stdout
