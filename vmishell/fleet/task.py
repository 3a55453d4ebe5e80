"""What a Dask worker runs for one target: hand it to a sandbox, wait, return an Outcome.

The task never raises for a target's failure: a failure is an Outcome with
an error type and message, so one bad target never stops a sweep. Only a
dying sandbox is retried (once, in a fresh one); a dying *worker* is retried
by Dask (`allowed-failures`), which the client reports after that.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from vmishell.fleet.bounds import Bounds
from vmishell.fleet.errors import WorkerLost
from vmishell.fleet.sandbox import POOL


@dataclass
class Outcome:
    """One target's answer (or failure), with where and how long."""

    target: str
    answer: Any = None
    notes: list[str] = field(default_factory=list)
    error_type: str | None = None
    error: str | None = None
    #: Seconds of attach + question inside the sandbox.
    seconds: float = 0.0
    #: Seconds the worker spent on this target, sandbox round trip included.
    wall: float = 0.0
    worker: str = ""

    @property
    def ok(self) -> bool:
        return self.error_type is None


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return "local"


def run_target(
    target: str,
    question: str,
    options: bytes,
    profile: str | None = None,
    bounds: Bounds | None = None,
    timeout: float = 600.0,
) -> Outcome:
    """Ask `question` of `target` in a sandbox of this process; `options` are pickled."""
    started = time.perf_counter()
    out = Outcome(target, worker=_worker_name())
    request = {
        "target": target,
        "question": question,
        "options": options,
        "profile": profile,
        "bounds": bounds or Bounds(),
    }
    for attempt in (1, 2):
        try:
            with POOL.take() as box:
                reply = box.request(request, timeout, f"{question} of {target}")
        except WorkerLost as exc:
            if attempt == 1:
                continue
            out.error_type, out.error = type(exc).__name__, f"{exc} (also on the retry)"
        except Exception as exc:  # TargetTimeout, OutputTooLarge, a reply that does not load
            out.error_type, out.error = type(exc).__name__, str(exc)
        else:
            if reply[0] == "ok":
                out.answer, out.notes, out.seconds = reply[1], list(reply[2]), reply[3]
            else:
                out.error_type, out.error, out.seconds = reply[1], reply[2], reply[3]
        break
    out.wall = time.perf_counter() - started
    return out


def run_batch(
    jobs: list[tuple[str, bytes]],
    question: str,
    profile: str | None = None,
    bounds: Bounds | None = None,
    timeout: float = 600.0,
) -> list[Outcome]:
    """`run_target` for several (target, options) in one Dask task, one after another."""
    return [run_target(t, question, options, profile, bounds, timeout) for t, options in jobs]


def warm(profile: str | None = None) -> float:
    """Start this worker's sandbox and wait until it has imported vmishell (seconds)."""
    return run_target("-", "ping", b"", profile, timeout=120.0).wall


__all__ = ["Outcome", "run_batch", "run_target", "warm"]
