"""Watch several values at once: a change log, stop conditions and a bounded history.

`Session.watch("task_struct.cred->uid", "jiffies", pid=PID)` returns a
`FieldWatch`. Each sample starts one top-level call (a live guest is read
as it is then; with `pause=True` the guest is stopped for the sample, so
all values come from one instant), follows each target's pointers and
decodes its value by type. A change is one row: time, target, address,
old and new value. `until=` stops the watch when a value equals something,
changes, or leaves a range. It runs in this thread (`run()`) or in a daemon
thread (`start()`), with the listener protocol of the byte-range Watcher
so that %watch streams and shows both.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vmishell.errors import VmiError
from vmishell.frontends.memory import LIFECYCLE_ERRORS
from vmishell.monitor.targets import Target, resolve

if TYPE_CHECKING:
    import pandas as pd

    from vmishell.session import Session

log = logging.getLogger(__name__)

CHANGE_COLUMNS = ["time", "sample", "target", "pid", "address", "old", "new"]
#: Changes kept by default (the oldest are dropped beyond, and counted).
DEFAULT_HISTORY = 100_000


# -- stop conditions -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Condition:
    """When to stop: `equals(v)`, `changes()` or `outside(lo, hi)`."""

    kind: str
    value: Any = None
    low: Any = None
    high: Any = None

    def met(self, old: Any, new: Any) -> bool:
        if self.kind == "equals":
            return bool(new == self.value)
        if self.kind == "changes":
            return old is not None and new != old
        try:
            return not (self.low <= new <= self.high)
        except TypeError:
            return True

    def describe(self, name: str) -> str:
        if self.kind == "equals":
            return f"{name} equals {self.value!r}"
        if self.kind == "changes":
            return f"{name} changed"
        return f"{name} left [{self.low!r}, {self.high!r}]"


def equals(value: Any) -> Condition:
    return Condition("equals", value)


def changes() -> Condition:
    return Condition("changes")


def outside(low: Any, high: Any) -> Condition:
    return Condition("outside", low=low, high=high)


# -- samples -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FieldChange:
    time: float
    sample: int
    target: str
    pid: int
    address: int
    old: Any
    new: Any

    def row(self) -> tuple[Any, ...]:
        return (self.time, self.sample, self.target, self.pid, self.address, self.old, self.new)


@dataclass(frozen=True, slots=True)
class FieldSample:
    """One look at every target: values (None where unreadable), changes, errors."""

    time: float
    index: int
    values: tuple[Any, ...]
    changes: tuple[FieldChange, ...]
    error: str | None = None


Listener = Callable[["FieldWatch", FieldSample], None]


class FieldWatch:
    """Polls several targets and keeps a bounded log of their changes."""

    def __init__(
        self,
        session: Session,
        targets: list[Target],
        *,
        every: float = 1.0,
        count: int | None = None,
        until: Condition | Mapping[str, Condition] | None = None,
        history: int = DEFAULT_HISTORY,
        pause: bool = False,
    ) -> None:
        if not targets:
            raise VmiError("watch: give at least one target")
        if count is not None and count < 1:
            raise VmiError("watch count must be at least 1")
        if every < 0:
            raise VmiError("watch interval must not be negative")
        if history < 1:
            raise VmiError("watch history must keep at least one change")
        self.session = session
        self.targets = targets
        self.pid = targets[0].pid
        self.every = float(every)
        self.count = count
        names = {t.name for t in targets}
        if isinstance(until, Mapping):
            unknown = set(until) - names
            if unknown:
                raise VmiError(f"watch: until names unknown targets {sorted(unknown)}")
            self.until = dict(until)
        else:
            self.until = {t.name: until for t in targets} if until is not None else {}
        self.pause = pause
        self._changes: deque[FieldChange] = deque(maxlen=history)
        self.dropped = 0
        self._listeners: list[Listener] = []
        self._stop_listeners: list[Callable[[FieldWatch], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.samples = 0
        self.values: tuple[Any, ...] | None = None
        self.error: str | None = None
        self.stopped_because: str | None = None

    # -- identity and state ------------------------------------------------------------------
    @property
    def key(self) -> tuple[int, tuple[str, ...]]:
        """What a new watch of the same targets replaces (see Targets.add_watcher)."""
        return (self.pid, tuple(t.name for t in self.targets))

    @property
    def target(self) -> str:
        return ", ".join(t.name for t in self.targets)

    @property
    def running(self) -> bool:
        return not self._stop.is_set() and (self._thread is None or self._thread.is_alive())

    @property
    def history(self) -> pd.DataFrame:
        """Every change kept: time, sample, target, pid, address, old, new."""
        import pandas as pd

        from vmishell.frontends.frames import guest_frame

        with self._lock:
            rows = [c.row() for c in self._changes]
        df = guest_frame(pd.DataFrame(rows, columns=CHANGE_COLUMNS), hex=["address"])
        df["time"] = pd.to_datetime(df["time"], unit="s")
        return df

    @property
    def current(self) -> dict[str, Any]:
        """The latest value of each target."""
        values = self.values or (None,) * len(self.targets)
        return {t.name: v for t, v in zip(self.targets, values, strict=True)}

    def status(self) -> str:
        state = "running" if self.running else "stopped"
        if not self.running and self.stopped_because:
            state += f" ({self.stopped_because})"
        with self._lock:
            kept = len(self._changes)
        dropped = f" ({self.dropped} older dropped)" if self.dropped else ""
        return (
            f"{self.target} (pid {self.pid}) every {self.every:g} s: {state}, "
            f"{self.samples} samples, {kept} changes{dropped}"
            + (f", last error: {self.error}" if self.error else "")
        )

    def __repr__(self) -> str:
        return f"<FieldWatch {self.status()}>"

    def on_sample(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def on_stop(self, listener: Callable[[FieldWatch], None]) -> None:
        self._stop_listeners.append(listener)

    # -- sampling ------------------------------------------------------------------------------
    def _read_all(self) -> tuple[list[Any], list[int], list[str]]:
        values: list[Any] = []
        addrs: list[int] = []
        errors: list[str] = []
        for t in self.targets:
            try:
                addr, data = t.sample()
                values.append(t.decode(data))
                addrs.append(addr)
            except LIFECYCLE_ERRORS:
                raise
            except VmiError as exc:
                values.append(None)
                addrs.append(0)
                errors.append(f"{t.name}: {exc}")
        return values, addrs, errors

    def poll(self) -> FieldSample:
        """Read every target once (one top-level call) and record what changed."""
        now = time.time()
        index = self.samples
        self.session._begin()
        if self.pause and self.session.live:
            with self.session.paused():
                values, addrs, errors = self._read_all()
        else:
            values, addrs, errors = self._read_all()
        prev = self.values
        found: list[FieldChange] = []
        stop = None
        for i, t in enumerate(self.targets):
            old = prev[i] if prev is not None else None
            new = values[i]
            if prev is not None and new is not None and old is not None and new != old:
                found.append(FieldChange(now, index, t.name, t.pid, addrs[i], old, new))
            cond = self.until.get(t.name)
            if stop is None and cond is not None and new is not None and cond.met(old, new):
                stop = cond.describe(t.name)
        error = "; ".join(errors) or None
        sample = FieldSample(now, index, tuple(values), tuple(found), error)
        with self._lock:
            room = self._changes.maxlen or 0
            over = len(self._changes) + len(found) - room
            if over > 0:
                self.dropped += over
            self._changes.extend(found)
            self.values = tuple(
                v if v is not None or prev is None else prev[i] for i, v in enumerate(values)
            )
            self.error = error
            self.samples += 1
        if stop is not None:
            self.stopped_because = stop
            self._stop.set()
        for listener in list(self._listeners):
            try:
                listener(self, sample)
            except Exception:  # a broken view must not kill the watch
                log.exception("watch listener failed")
        return sample

    def _done(self) -> bool:
        return self._stop.is_set() or (self.count is not None and self.samples >= self.count)

    def _loop(self) -> None:
        while not self._done():
            self.poll()
            if self._done() or (self.every and self._stop.wait(self.every)):
                break

    def run(self) -> FieldWatch:
        """Sample in this thread until `count`, a stop condition or `stop()` (Ctrl-C too)."""
        try:
            self._loop()
        except KeyboardInterrupt:
            self.stopped_because = self.stopped_because or "interrupted"
            raise
        except LIFECYCLE_ERRORS as exc:
            self.stopped_because = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self._finish()
        return self

    def _thread_main(self) -> None:
        try:
            self._loop()
        except LIFECYCLE_ERRORS as exc:
            self.stopped_because = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # a bug below us: stop and say so rather than die silently
            self.stopped_because = f"failed: {exc}"
            log.warning("watch of %s stopped: %s", self.target, exc)
        finally:
            self._finish()

    def _finish(self) -> None:
        if self.stopped_because is None and self.count is not None and self.samples >= self.count:
            self.stopped_because = "count reached"
        self._stop.set()
        for listener in list(self._stop_listeners):
            try:
                listener(self)
            except Exception:
                log.exception("watch stop listener failed")

    def start(self) -> FieldWatch:
        """Sample in a daemon thread; returns at once."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._thread_main, name="vmishell-watch-fields", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, reason: str = "stop() called", timeout: float = 10.0) -> FieldWatch:
        if not self._stop.is_set() and self.stopped_because is None:
            self.stopped_because = reason
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        return self

    def wait(self, timeout: float | None = None) -> bool:
        if self._thread is None:
            return self._stop.is_set()
        self._thread.join(timeout)
        return not self._thread.is_alive()


def watch(
    session: Session,
    *targets: str,
    pid: int = 0,
    view: str | None = None,
    every: float = 1.0,
    count: int | None = None,
    until: Condition | Mapping[str, Condition] | None = None,
    history: int = DEFAULT_HISTORY,
    pause: bool = False,
    start: bool = False,
) -> FieldWatch:
    """A FieldWatch of `targets` (fields, symbols or addresses of process `pid`).

    Not started unless `start=True` (a background thread); call `.run()` to
    sample in this thread.
    """
    resolved = [resolve(session, spec, pid=pid, view=view) for spec in targets]
    w = FieldWatch(
        session, resolved, every=every, count=count, until=until, history=history, pause=pause
    )
    return w.start() if start else w


__all__ = [
    "CHANGE_COLUMNS",
    "Condition",
    "FieldChange",
    "FieldSample",
    "FieldWatch",
    "changes",
    "equals",
    "outside",
    "watch",
]
