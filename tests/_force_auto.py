"""A hunting aid: every ``'auto'`` conv choice takes one algorithm, as on a machine where it measures fastest.

``AQCF_TEST_FORCE_AUTO=fast8`` (or ``hamilton``) with ``pytest`` applies it to a whole run (tests/conftest.py):
a test that only holds for the algorithm this machine happens to measure faster fails there, not on the next
machine. CI's EPYC measured fast8 fastest where the developer's measured hamilton, and a grid comparison failed
there only (tests/models/test_aqcfnet_grid.py, the max-pool near-tie). ``tests/conv/test_tuning.py`` tests the
measurement itself, which this replaces: leave it out of such a run (``--deselect tests/conv/test_tuning.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from aqcf_kernels import tuning
from aqcf_kernels.backends.registry import forget_choices

ALGORITHMS = ("hamilton", "fast8")


@contextlib.contextmanager
def force_auto(algorithm: str) -> Iterator[None]:
    """Inside the block, :func:`aqcf_kernels.tuning.choose` returns a candidate of ``algorithm`` wherever one is
    among the candidates, on the heuristic's backend where it has one (as the heuristic's pick: nothing is
    measured or remembered in the tuning cache); other choices (the attention's route, a unit's split) are
    measured as usual. The choices the extension serves itself are dropped on entry and exit, so that none made
    outside the block serves inside it, nor the other way round."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"AQCF_TEST_FORCE_AUTO must be one of {', '.join(ALGORITHMS)}, not {algorithm!r}")
    measured = tuning.choose

    def choose(key, candidates, prior, run, tensors, fast_key=None):
        forced = sorted((c for c in candidates if c.algorithm == algorithm), key=lambda c: c.backend != prior.backend)
        if forced:
            return tuning.Choice(forced[0], "heuristic"), None
        return measured(key, candidates, prior, run, tensors, fast_key)

    tuning.choose = choose
    forget_choices()
    try:
        yield
    finally:
        tuning.choose = measured
        forget_choices()
