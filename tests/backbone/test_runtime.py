"""The timing primitive every measurement uses: round-robin timing on a fake clock, warm-up, and named errors."""

from __future__ import annotations

import pytest

from conftest import FakeClock
from layerfold.runtime import Workload, alternate, timed


def test_alternate_rotates_the_order_and_reports_median_and_spread():
    clock, log = FakeClock(), []
    durations = {"A": iter([100.0, 5.0, 1.0, 3.0]), "B": iter([100.0, 2.0, 2.0, 8.0])}  # first of each: warm-up

    def variant(name):
        def run():
            log.append(name)
            clock.now += next(durations[name])
        return run

    timings = alternate({"A": variant("A"), "B": variant("B")}, warmup=1, repeats=3, clock=clock)
    assert log == ["A", "B", "A", "B", "B", "A", "A", "B"]  # warm-up round, then rounds starting A, B, A
    assert timings["A"].runs == [5.0, 1.0, 3.0] and timings["B"].runs == [2.0, 2.0, 8.0]
    assert timings["A"].summary() == (3.0, 1.0, 5.0) and timings["B"].summary() == (2.0, 2.0, 8.0)
    assert timings["A"].as_dict()["runs_s"] == [5.0, 1.0, 3.0]


def test_prepare_is_outside_the_timer_and_feeds_run():
    clock, seen = FakeClock(), []

    def prepare():
        clock.now += 1000.0  # e.g. the prefill that fills a KV cache
        return "state"

    def run(state):
        seen.append(state)
        clock.now += 2.0

    timing = timed(Workload(run=run, prepare=prepare), warmup=0, repeats=4, clock=clock)
    assert timing.runs == [2.0] * 4 and seen == ["state"] * 4


def test_warmup_keeps_going_until_the_minimum_time_has_passed():
    clock, calls = FakeClock(), []

    def run():
        calls.append(clock.now)
        clock.now += 1.0

    timed(run, warmup=2, repeats=1, min_warmup_s=5.0, clock=clock)
    assert len(calls) == 5 + 1  # five warm-up runs of 1 s reach 5 s (more than the 2 asked for), then one timed


@pytest.mark.parametrize(("kwargs", "message"), [({"warmup": -1}, "warmup=-1"), ({"repeats": 0}, "repeats=0")])
def test_bad_timing_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        timed(lambda: None, **kwargs)
