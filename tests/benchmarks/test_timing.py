"""The interleaved timer: round-robin order and the reps that ``min_time`` adds for fast steps."""

from __future__ import annotations

import time

from benchmarks import common


def _sleeper(seconds: float, log: list[str], name: str):
    def step() -> None:
        log.append(name)
        time.sleep(seconds)

    return step


def test_min_time_adds_reps_for_fast_steps_and_rotates_the_first() -> None:
    log: list[str] = []
    steps = {"a": _sleeper(0.002, log, "a"), "b": _sleeper(0.002, log, "b")}
    times = common.time_interleaved(steps, reps=3, warmup=1, min_time=0.05)
    # ~2 ms per call: 0.05 s asks for ~25 reps (sleep overshoots, so allow fewer), far above 3
    assert all(8 <= len(v) <= 26 for v in times.values()), {k: len(v) for k, v in times.items()}
    assert len(times["a"]) == len(times["b"])
    timed = log[2:]  # after the warmup round
    assert timed[:4] == ["a", "b", "b", "a"]
    assert all(t >= 0.002 for v in times.values() for t in v)


def test_without_min_time_the_reps_are_exact_and_capped_with_it() -> None:
    log: list[str] = []
    steps = {"a": _sleeper(0.0, log, "a")}
    assert len(common.time_interleaved(steps, reps=4, warmup=1)["a"]) == 4
    assert len(common.time_interleaved(steps, reps=4, warmup=1, min_time=10.0)["a"]) == common.MAX_REPS
