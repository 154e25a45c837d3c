"""The reference grids' hypothesis settings (the ``tests/*/test_*_grid.py`` files).

Each grid's example counts are sized for CI; a longer hunt multiplies every count:
``AQCF_GRID_SCALE=10 pytest tests/nn/test_norm_grid.py``. Each grid was hunted at 5-30x when written; CI runs
a regression share. Since 2026-12-07 the nine slowest grids run half their earlier counts (a third for the
recurrent one, a quarter for the A-QCF block): the whole suite took 1370 s of CI on that day's 2-core AMD EPYC,
over its 20-minute budget, with the grids 556 of its 2323 test-seconds.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

SCALE = int(os.environ.get("AQCF_GRID_SCALE", "1"))


def grid(examples: int, *also_suppressed: HealthCheck) -> settings:
    """``examples`` × :data:`SCALE` examples, no deadline (a first call may compile, measure or warm a cache), and
    hypothesis' ``too_slow`` health check off (an example runs a kernel), with ``also_suppressed`` where a file's
    strategies or fixtures need it."""
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, *also_suppressed],
    )
