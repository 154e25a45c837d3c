"""Benchmarks of aqcf-kernels: one module per op family, shared by ``aqcf-bench`` and pytest-benchmark.

* :mod:`benchmarks.cli` — the ``aqcf-bench FAMILY ...`` console script;
* :mod:`benchmarks.common` — interleaved timing, peak memory, environment and output helpers;
* :mod:`benchmarks._memory_worker` — the fresh process that measures peak memory after the timing;
* :mod:`benchmarks.conv` — quaternion convolutions (``aqcf-bench conv``);
* ``test_bench_*.py`` — pytest-benchmark files, run with ``pytest benchmarks/`` (never by default).
"""
