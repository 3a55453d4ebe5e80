"""The fuzz harness's own bounds: a case is bounded by its work, and a hang still ends.

A case's bound is the number of function calls it makes (`work_meter`), a
count that machine load cannot change; the CPU and wall-clock alarms
(`watchdog`) are a generous hang detector only. These tests show each part
failing the way it must: a blow-up fails on its work long before any alarm, a
loop that makes no call is stopped by the CPU alarm, a wait by the wall-clock
alarm, and the same case costs the same work on a quiet and on a loaded CPU.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from . import harness as harness_module
from .campaign import CASE_RSS_BYTES, REPORT, TRACED_FACTOR
from .harness import (
    CASE_CALLS,
    CASE_PEAK_BYTES,
    HANG_SECONDS,
    WALL_FACTOR,
    CaseOverWork,
    CaseTimeout,
    Harness,
    Mutation,
    watchdog,
    work_meter,
)
from .test_pipeline_fuzz import EXAMPLE_CALLS

SECURITY = Path(__file__).resolve().parents[2] / "SECURITY.md"


def _noop() -> None:
    pass


def test_the_work_meter_counts_calls_and_stops_a_blow_up_at_its_bound() -> None:
    with work_meter(10_000) as calls:
        for _ in range(1_000):
            _noop()
    assert 1_000 <= calls[0] < 1_100
    start = time.process_time()
    with pytest.raises(CaseOverWork, match="more than 10000 function calls"), work_meter(10_000):
        while True:
            _noop()
    assert time.process_time() - start < 1.0  # stopped by its count, long before any alarm
    assert sys.getprofile() is None


def test_the_cpu_alarm_stops_a_loop_that_makes_no_call() -> None:
    """Whichever watchdog rings first (CPU, or wall-clock on a loaded machine) stops it."""
    with pytest.raises(CaseTimeout, match=r"0\.5 s of CPU|2\.0 s \(wall clock\)"), watchdog(0.5):
        while True:
            pass


def test_the_wall_clock_alarm_stops_a_case_that_waits() -> None:
    with pytest.raises(CaseTimeout, match="wall clock"), watchdog(0.25):
        time.sleep(60)


# -- through the harness, on the lab dump ---------------------------------------------------


@pytest.mark.lab
def test_a_blowing_up_case_is_a_failure_named_for_its_work(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    def blow_up(*args: object, **kwargs: object) -> int:
        while True:
            _noop()

    monkeypatch.setattr(harness_module, "pipeline", blow_up)
    outcome = harness.run([], work=100_000, memory="none")
    assert outcome.failure == "over work bound: case made more than 100000 function calls"
    assert outcome.work == 100_001


@pytest.mark.lab
def test_a_hanging_case_is_a_failure_named_for_the_watchdog(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    def spin(*args: object, **kwargs: object) -> int:
        while True:
            pass

    monkeypatch.setattr(harness_module, "pipeline", spin)
    outcome = harness.run([], seconds=0.5, memory="none")
    # Which alarm rings first depends on the machine's load (CPU time against wall
    # clock); either way the hang is a failure that names its watchdog.
    assert outcome.failure in (
        "timeout: case used more than 0.5 s of CPU",
        "timeout: case ran longer than 2.0 s (wall clock)",
    )


@pytest.mark.lab
def test_a_case_costs_the_same_work_on_a_loaded_cpu(harness: Harness) -> None:
    """The bound is a count: a CPU hog sharing this process's CPU slows the case down
    (wall clock) but does not change its work beyond a handful of calls."""
    case = [Mutation("task:vmi-marker.table.PT", "fill-self")]
    harness.run(case, memory="none")  # warm: lazy imports and decodings are not the case's
    quiet = harness.run(case, memory="none")
    cpu = min(os.sched_getaffinity(0))
    mine = os.sched_getaffinity(0)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(hog.pid, {cpu})
        os.sched_setaffinity(0, {cpu})
        loaded = harness.run(case, memory="none")
    finally:
        os.sched_setaffinity(0, mine)
        hog.kill()
        hog.wait()
    assert quiet.failure is None and loaded.failure is None
    # The same to within a few calls (caches filled on first use may differ by a handful;
    # a run once counted 244,330 against 244,334): load slows a case, it does not add work.
    assert quiet.work > 10_000
    assert abs(loaded.work - quiet.work) <= quiet.work // 1000


# -- what SECURITY.md says -------------------------------------------------------------------


def test_security_md_states_the_harness_bounds_as_the_code_has_them() -> None:
    text = " ".join(SECURITY.read_text().split())
    assert WALL_FACTOR == 4  # SECURITY.md says "four times"
    for phrase in (
        f"at most {CASE_CALLS:,} function calls",
        f"after {HANG_SECONDS:g} s of CPU time",
        f"({HANG_SECONDS * TRACED_FACTOR:g} s for a case traced with tracemalloc)",
        "or four times that of wall-clock time",
        f"bound {CASE_RSS_BYTES >> 20} MiB",
        f"bound {CASE_PEAK_BYTES >> 20} MiB of Python heap",
        f"each example makes at most {EXAMPLE_CALLS:,} function calls",
        f"({HANG_SECONDS:g} s of CPU time, or {HANG_SECONDS * WALL_FACTOR:g} s of wall-clock time)",
    ):
        assert phrase in text, phrase


def test_security_md_states_the_figures_of_the_committed_campaign_report() -> None:
    report = json.loads(REPORT.read_text())
    text = " ".join(SECURITY.read_text().split())
    assert report["bound_calls"] == CASE_CALLS and report["watchdog_cpu_seconds"] == HANG_SECONDS
    assert report["reproduce"] in text and report["workers"] == 1
    assert f"| cases | {report['cases']:,} |" in text
    assert re.search(rf"\| failures \([^|]*\) \| {report['failure_count']} \|", text)
    heavy, rss = report["most_work"][0], report["max_rss_growth"]
    assert f"{heavy['calls']:,} calls (seed {heavy['seed']}" in text
    assert f"{rss['bytes'] / 2**20:.1f} MiB (seed {rss['seed']})" in text
    traced = report["max_traced_peak"]
    assert f"{traced['bytes'] / 2**20:.2f} MiB (seed {traced['seed']})" in text
    assert f"({report['traced_cases']} traced cases)" in text
    steps = ", ".join(f"{k} {v:,}" for k, v in sorted(report["errors_by_step"].items()))
    assert steps in text
