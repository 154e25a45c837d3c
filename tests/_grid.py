"""The reference grids' hypothesis settings (the ``tests/*/test_*_grid.py`` files).

Each grid's example counts are sized for CI; a longer hunt multiplies every count:
``AQCF_GRID_SCALE=10 pytest tests/nn/test_norm_grid.py``.
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
