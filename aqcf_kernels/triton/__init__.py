"""Triton kernels (GPU; CPU under ``TRITON_INTERPRET=1``), registered as the ``triton`` backend."""
