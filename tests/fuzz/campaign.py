"""A long fuzz campaign against a lab dump: N seeded cases, a report of the worst.

    scripts/fuzz-campaign --cases 100000 --workers 1     # report: tests/fuzz/campaign-report.json
    scripts/fuzz-campaign --dump x86_64.raw --replay 4711   # one case, verbosely

Without `--dump` it boots its own x86_64 lab guest, dumps it and stops it.
Case `i` is drawn from `random.Random(seed + i)`, so any failure replays
from its number alone. Each worker attaches once and runs its share of the
cases on a copy-on-write map of the dump (see `harness`). The report is
written beside this file, to be committed, with the command that made it.

A case fails when anything but a vmishell error escapes, when it makes more
than `--work` function calls (its work, counted by the harness's work meter:
a count, so machine load does not change it), when its memory passes its
bound, or when it hangs. The hang watchdog fires after `--seconds` of CPU
time (TRACED_FACTOR times that for a traced case), and after WALL_FACTOR
times that of wall-clock time for a case that waits instead of computing.
Memory is measured per case as the growth of the resident set over the case
(the kernel's high-water mark, reset before each case: cheap, and it sees
every allocation; bound CASE_RSS_BYTES), and every `--trace-every`-th case
also under tracemalloc (the Python heap exactly, but 5-40x slower; bound
CASE_PEAK_BYTES). Workers also run under an address-space limit, so a
runaway allocation is a recorded MemoryError rather than a stalled machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.fuzz.harness import (
    CASE_CALLS,
    CASE_PEAK_BYTES,
    HANG_SECONDS,
    WALL_FACTOR,
    Harness,
    Outcome,
    RandomChooser,
    choose_case,
)

#: Slowest cases kept in the report.
KEEP_SLOWEST = 10
#: Failures kept in full (the count is always exact).
KEEP_FAILURES = 200
#: Where the report goes by default: beside this file, to be committed.
REPORT = Path(__file__).with_name("campaign-report.json")
#: Growth of the resident set over one case that counts as a failure (the Python heap
#: bound, CASE_PEAK_BYTES, is checked on traced cases).
CASE_RSS_BYTES = 4 * CASE_PEAK_BYTES
#: The watchdog of a traced case is this many times `--seconds` (tracemalloc is slow).
TRACED_FACTOR = 4


def case_plan(harness: Harness, seed: int) -> tuple[list[Any], bool]:
    """The mutations of case `seed`, and whether it runs over copying reads."""
    rng = random.Random(seed)
    mutations = choose_case(harness.targets, RandomChooser(rng))
    return mutations, rng.random() < 0.25


def _limit_address_space(extra: int) -> None:
    """Cap this process's address space at its current size plus `extra` bytes."""
    with open("/proc/self/status") as f:
        vmsize = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    limit = vmsize + extra
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


class _Stop:
    """Set by SIGINT/SIGTERM: the worker ends after its current case and reports."""

    requested = False

    @classmethod
    def request(cls, signum: int, frame: object) -> None:
        cls.requested = True


def worker(args: tuple[Any, ...]) -> dict[str, Any]:
    """Run cases index, index + workers, ... below `cases`; a summary of what they did.

    The worker stops early, between two cases, at `deadline` (time.time()) or
    when asked by SIGINT/SIGTERM; the summary counts the cases it ran.
    """
    (
        dump,
        index,
        workers,
        cases,
        seed,
        work,
        seconds,
        trace_every,
        memory_headroom,
        log,
        deadline,
    ) = args
    signal.signal(signal.SIGINT, _Stop.request)
    signal.signal(signal.SIGTERM, _Stop.request)
    harness = Harness(Path(dump))
    harness.prefault()
    _limit_address_space(memory_headroom)
    summary: dict[str, Any] = {
        "cases": 0,
        "stopped_early": False,
        "case_seconds": 0.0,
        "case_calls": 0,
        "most_work": [],
        "slowest": [],
        "max_rss_growth": {"bytes": 0, "seed": None},
        "max_traced_peak": {"bytes": 0, "seed": None},
        "traced_cases": 0,
        "failures": [],
        "failure_count": 0,
        "slowest_wall": {"seconds": 0.0, "seed": None},
        "errors_by_step": {},
        "rows": {"min": None, "max": 0},
    }
    slowest: list[tuple[float, int, list[str]]] = []
    most_work: list[tuple[int, int, list[str]]] = []
    started = time.monotonic()
    for i in range(index, cases, workers):
        if _Stop.requested or (deadline is not None and time.time() >= deadline):
            summary["stopped_early"] = True
            break
        case_seed = seed + i
        mutations, copying = case_plan(harness, case_seed)
        # Every worker traces its own every trace_every-th case (i % trace_every would
        # give them all to one worker whenever workers divides trace_every).
        traced = trace_every > 0 and (i // workers) % trace_every == 0
        outcome: Outcome = harness.run(
            mutations,
            work=work,
            seconds=seconds * TRACED_FACTOR if traced else seconds,
            copying=copying,
            memory="tracemalloc" if traced else "rss",
        )
        summary["cases"] += 1
        summary["case_seconds"] += outcome.seconds
        summary["case_calls"] += outcome.work
        summary["wall_seconds_in_cases"] = summary.get("wall_seconds_in_cases", 0.0) + outcome.wall
        described = [str(m) for m in mutations]
        most_work.append((outcome.work, case_seed, described))
        if len(most_work) > 4 * KEEP_SLOWEST:
            most_work = sorted(most_work, reverse=True)[:KEEP_SLOWEST]
        if traced:
            summary["traced_cases"] += 1
            if outcome.peak > summary["max_traced_peak"]["bytes"]:
                summary["max_traced_peak"] = {"bytes": outcome.peak, "seed": case_seed}
            if outcome.peak > CASE_PEAK_BYTES and not outcome.failure:
                outcome.failure = f"Python heap peak {outcome.peak} bytes > {CASE_PEAK_BYTES}"
        else:
            if outcome.peak > summary["max_rss_growth"]["bytes"]:
                summary["max_rss_growth"] = {"bytes": outcome.peak, "seed": case_seed}
            if outcome.peak > CASE_RSS_BYTES and not outcome.failure:
                outcome.failure = f"resident set grew {outcome.peak} bytes > {CASE_RSS_BYTES}"
            slowest.append((outcome.seconds, case_seed, described))
            if outcome.wall > summary["slowest_wall"]["seconds"]:
                summary["slowest_wall"] = {"seconds": round(outcome.wall, 4), "seed": case_seed}
            if len(slowest) > 4 * KEEP_SLOWEST:
                slowest = sorted(slowest, reverse=True)[:KEEP_SLOWEST]
        for step in outcome.vmi_errors:
            key = step.split(" ")[0]
            summary["errors_by_step"][key] = summary["errors_by_step"].get(key, 0) + 1
        rows = summary["rows"]
        rows["max"] = max(rows["max"], outcome.rows)
        rows["min"] = outcome.rows if rows["min"] is None else min(rows["min"], outcome.rows)
        if outcome.failure:
            summary["failure_count"] += 1
            failure = {
                "seed": case_seed,
                "copying": copying,
                "traced": traced,
                "calls": outcome.work,
                "cpu_seconds": round(outcome.seconds, 3),
                "wall_seconds": round(outcome.wall, 3),
                "mutations": described,
                "failure": outcome.failure[-3000:],
            }
            if len(summary["failures"]) < KEEP_FAILURES:
                summary["failures"].append(failure)
            with open(log, "a") as f:  # at once, so a long run shows failures as they come
                f.write(json.dumps(failure) + "\n")
        if summary["cases"] % 2000 == 0:
            rate = summary["cases"] / (time.monotonic() - started)
            print(
                f"worker {index}: {summary['cases']} cases, {rate:.0f}/s, "
                f"{summary['failure_count']} failures",
                file=sys.stderr,
                flush=True,
            )
    summary["slowest"] = [
        {"seconds": round(s, 4), "seed": sd, "mutations": m}
        for s, sd, m in sorted(slowest, reverse=True)[:KEEP_SLOWEST]
    ]
    summary["most_work"] = [
        {"calls": w, "seed": sd, "mutations": m}
        for w, sd, m in sorted(most_work, reverse=True)[:KEEP_SLOWEST]
    ]
    summary["worker_max_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return summary


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "cases": sum(p["cases"] for p in parts),
        "stopped_early": any(p["stopped_early"] for p in parts),
        "slowest_wall": max((p["slowest_wall"] for p in parts), key=lambda s: s["seconds"]),
        "wall_seconds_in_cases": round(sum(p.get("wall_seconds_in_cases", 0) for p in parts), 2),
        "traced_cases": sum(p["traced_cases"] for p in parts),
        "case_seconds": round(sum(p["case_seconds"] for p in parts), 2),
        "case_calls": sum(p["case_calls"] for p in parts),
        "failure_count": sum(p["failure_count"] for p in parts),
        "failures": [f for p in parts for f in p["failures"]][:KEEP_FAILURES],
        "slowest": sorted((s for p in parts for s in p["slowest"]), key=lambda s: -s["seconds"])[
            :KEEP_SLOWEST
        ],
        "most_work": sorted((w for p in parts for w in p["most_work"]), key=lambda w: -w["calls"])[
            :KEEP_SLOWEST
        ],
        "max_rss_growth": max((p["max_rss_growth"] for p in parts), key=lambda m: m["bytes"]),
        "max_traced_peak": max((p["max_traced_peak"] for p in parts), key=lambda m: m["bytes"]),
        "worker_max_rss": max(p["worker_max_rss"] for p in parts),
        "errors_by_step": {},
        "rows": {
            "min": min(p["rows"]["min"] for p in parts if p["rows"]["min"] is not None),
            "max": max(p["rows"]["max"] for p in parts),
        },
    }
    for p in parts:
        for step, n in p["errors_by_step"].items():
            out["errors_by_step"][step] = out["errors_by_step"].get(step, 0) + n
    return out


def _own_dump(directory: Path) -> Path:
    """Boot a private x86_64 lab guest, dump its RAM raw, stop it."""
    from vmishell.lab.runner import down, up

    guest = up("x86_64", f"fuzz-{os.getpid()}", timeout=240)
    try:
        return guest.dump(directory / "x86_64.raw", "raw")
    finally:
        down(guest.name)


def replay(dump: Path, seed: int, work: int, seconds: float) -> int:
    harness = Harness(dump)
    mutations, copying = case_plan(harness, seed)
    print(f"case {seed} ({'copying' if copying else 'zero-copy'} reads):")
    for m in mutations:
        print(f"  {m}")
    outcome = harness.run(mutations, work=work, seconds=seconds, copying=copying, memory="rss")
    peak = outcome.peak / 2**20
    print(
        f"{outcome.work} calls, {outcome.seconds:.3f} s CPU, {outcome.wall:.3f} s wall, "
        f"resident set grew {peak:.1f} MiB, rows {outcome.rows}"
    )
    for step, error in outcome.vmi_errors.items():
        print(f"  {step}: {error}")
    if outcome.failure:
        print(outcome.failure)
        return 1
    return 0


def _commit() -> str | None:
    """The checkout's commit, for the report (None outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/fuzz-campaign", description=__doc__)
    parser.add_argument("--dump", type=Path, help="raw dump of the x86_64 lab guest")
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument(
        "--minutes",
        type=float,
        help="stop starting cases after this long (the report says how many ran)",
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="case i uses seed + i")
    parser.add_argument(
        "--work", type=int, default=CASE_CALLS, help="function calls a case may make (its bound)"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=HANG_SECONDS,
        help="CPU seconds before a case counts as hung",
    )
    parser.add_argument("--trace-every", type=int, default=50, help="tracemalloc every N cases")
    parser.add_argument("--memory-headroom", type=int, default=4 << 30, help="bytes per worker")
    parser.add_argument("--report", type=Path, default=REPORT, help=f"default: {REPORT}")
    parser.add_argument("--replay", type=int, metavar="SEED", help="run one case and show it")
    args = parser.parse_args(argv)
    command = " ".join(["scripts/fuzz-campaign", *(argv if argv is not None else sys.argv[1:])])

    commit = _commit()  # the code that runs, even if the checkout moves on meanwhile
    with tempfile.TemporaryDirectory(prefix="vmishell-fuzz-") as tmp:
        dump = args.dump or _own_dump(Path(tmp))
        dump_bytes = Path(dump).stat().st_size
        if args.replay is not None:
            return replay(dump, args.replay, args.work, args.seconds)
        failures_log = args.report.with_suffix(".failures.jsonl")
        started_at = time.time()
        deadline = started_at + 60 * args.minutes if args.minutes else None
        jobs = [
            (
                str(dump),
                i,
                args.workers,
                args.cases,
                args.seed,
                args.work,
                args.seconds,
                args.trace_every,
                args.memory_headroom,
                str(failures_log),
                deadline,
            )
            for i in range(args.workers)
        ]
        failures_log.unlink(missing_ok=True)
        load_before = os.getloadavg()
        started = time.monotonic()
        if args.workers == 1:
            parts = [worker(jobs[0])]
        else:
            with multiprocessing.get_context("fork").Pool(args.workers) as pool:
                parts = pool.map(worker, jobs)
        wall = time.monotonic() - started
    report = merge(parts)
    # One worker runs a prefix of the cases, so the count alone replays the campaign.
    reproduce = (
        f"scripts/fuzz-campaign --cases {report['cases']} --workers 1 --seed {args.seed}"
        if args.workers == 1 or not report["stopped_early"]
        else None
    )
    report.update(
        command=command,
        reproduce=reproduce,
        started=time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started_at)),
        wall_seconds=round(wall, 1),
        workers=args.workers,
        seed=args.seed,
        bound_calls=args.work,
        watchdog_cpu_seconds=args.seconds,
        watchdog_wall_seconds=args.seconds * WALL_FACTOR,
        traced_watchdog_factor=TRACED_FACTOR,
        bound_traced_peak_bytes=CASE_PEAK_BYTES,
        bound_rss_growth_bytes=CASE_RSS_BYTES,
        dump=str(args.dump) if args.dump else "(own x86_64 lab guest)",
        dump_bytes=dump_bytes,
        commit=commit,
        python=sys.version.split()[0],
        cpus=os.cpu_count(),
        load_average_before=[round(x, 2) for x in load_before],
        load_average_after=[round(x, 2) for x in os.getloadavg()],
    )
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    heavy = report["most_work"][0] if report["most_work"] else {"calls": 0, "seed": None}
    slow = report["slowest"][0] if report["slowest"] else {"seconds": 0, "seed": None}
    print(
        f"{report['cases']} cases in {report['wall_seconds']} s wall "
        f"({report['case_seconds']} s of CPU in cases, {args.workers} worker(s)); "
        f"most work {heavy['calls']} calls (seed {heavy['seed']}); "
        f"slowest {slow['seconds']} s CPU (seed {slow['seed']}), "
        f"{report['slowest_wall']['seconds']} s wall (seed {report['slowest_wall']['seed']}); "
        f"peak RSS growth {report['max_rss_growth']['bytes'] / 2**20:.1f} MiB; "
        f"traced peak {report['max_traced_peak']['bytes'] / 2**20:.1f} MiB "
        f"over {report['traced_cases']} cases; failures {report['failure_count']}. "
        f"Report: {args.report}"
    )
    return 1 if report["failure_count"] else 0


if __name__ == "__main__":
    sys.exit(main())
