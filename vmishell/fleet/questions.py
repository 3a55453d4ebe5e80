"""The questions a fleet asks of each target, run where the target is (in the sandbox).

Each takes a `Session` and options and returns a DataFrame (or, for
`snapshot`, a Snapshot: tables of data that `diff` compares later). They use
only the Session API, so a fleet answers exactly what a plain Session does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pandas as pd

from vmishell.errors import GuestDataError
from vmishell.fleet.bounds import Bounds, bound_frame
from vmishell.fleet.errors import FleetError

if TYPE_CHECKING:
    from vmishell.session import Session


def processes(s: Session, *, threads: bool = False, cmdline: bool = True) -> pd.DataFrame:
    return s.processes(threads=threads, cmdline=cmdline)


def search(s: Session, *, pattern: Any, physical: bool = False, **options: Any) -> pd.DataFrame:
    """`Session.search`, or with `physical` all of RAM (`s.physical.search`)."""
    options.setdefault("progress", False)
    if physical:
        options.pop("pids", None)
        options.pop("kernel", None)
        return s.physical.search(pattern, **options)
    return s.search(pattern, **options)


def maps(s: Session, *, pid_or_comm: int | str) -> pd.DataFrame:
    """The maps of one pid, or of every process whose comm is `pid_or_comm`, with pid and comm."""
    if isinstance(pid_or_comm, int):
        pids = [(pid_or_comm, s.process(pid_or_comm).comm)]
    else:
        table = s.processes(cmdline=False)
        chosen = table[table.comm == pid_or_comm]
        pids = list(zip(chosen.pid.tolist(), chosen.comm.tolist(), strict=True))
        if not pids:
            raise GuestDataError(f"no process named {pid_or_comm!r} in {s.name}")
    frames = []
    for pid, comm in pids:
        df = s.process(int(pid)).maps()
        df.insert(0, "comm", comm)
        df.insert(0, "pid", int(pid))
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def snapshot(s: Session, **options: Any) -> Any:
    return s.snapshot(**options)


def diff(s: Session, *, before: Any) -> pd.DataFrame:
    return s.diff(before)


def run(s: Session, *, fn: Callable[[Session], Any]) -> pd.DataFrame:
    return as_frame(fn(s))


QUESTIONS: dict[str, Callable[..., Any]] = {
    "processes": processes,
    "search": search,
    "maps": maps,
    "snapshot": snapshot,
    "diff": diff,
    "run": run,
}


def as_frame(value: Any) -> pd.DataFrame:
    """A user function's answer as rows: a frame, a series or dict (one row), a list of
    rows, or one value (column `value`); None is no rows."""
    if isinstance(value, pd.DataFrame):
        return value
    if value is None:
        return pd.DataFrame()
    if isinstance(value, pd.Series):
        return value.to_frame().T.reset_index(drop=True)
    if isinstance(value, dict):
        return pd.DataFrame([value])
    if isinstance(value, list | tuple):
        if all(isinstance(v, dict) for v in value):
            return pd.DataFrame(list(value))
        return pd.DataFrame({"value": list(value)})
    return pd.DataFrame({"value": [value]})


def _bound_rows(rows: list[dict[str, Any]], bounds: Bounds) -> tuple[list[dict[str, Any]], int]:
    cut = 0
    out = []
    for row in rows[: bounds.max_rows]:
        fixed = {}
        for key, value in row.items():
            if isinstance(value, str | bytes) and len(value) > bounds.max_cell:
                value, cut = value[: bounds.max_cell], cut + 1
            fixed[key] = value
        out.append(fixed)
    return out, cut + max(0, len(rows) - bounds.max_rows)


def bound_answer(answer: Any, bounds: Bounds) -> tuple[Any, list[str]]:
    """An answer cut to `bounds`: a frame by `bound_frame`, a snapshot table by table."""
    if isinstance(answer, pd.DataFrame):
        plain = pd.DataFrame(answer)  # not a GuestFrame: the client need not import frontends
        plain.attrs = dict(answer.attrs)
        frame, notes = bound_frame(plain, bounds)
        meta = answer.attrs.get("vmishell.search") or {}
        notes += [str(p) for p in meta.get("problems", [])]
        if meta.get("stopped"):
            notes.append(f"search {meta['stopped']}")
        return frame, notes
    from vmishell.monitor.snapshot import Snapshot

    if isinstance(answer, Snapshot):
        notes = []
        changes: dict[str, Any] = {}
        for name in ("processes", "threads", "maps", "hashes"):
            rows, cut = _bound_rows(getattr(answer, name), bounds)
            changes[name] = rows
            if cut:
                notes.append(f"snapshot {name}: {cut} rows or cells cut (Bounds)")
        return dataclasses.replace(answer, **changes), notes
    raise FleetError(f"a fleet question returned {type(answer).__name__}, not a DataFrame")


def ask(
    target: str, question: str, options: dict[str, Any], profile: str | None, bounds: Bounds
) -> tuple[Any, list[str]]:
    """Attach to `target`, ask `question`, detach: the bounded answer and notes."""
    from vmishell.session import Session

    try:
        func = QUESTIONS[question]
    except KeyError:
        raise FleetError(f"no fleet question {question!r}") from None
    with Session.attach(target, profile=profile) as s:
        answer = func(s, **options)
    return bound_answer(answer, bounds)


__all__ = ["QUESTIONS", "as_frame", "ask", "bound_answer"]
