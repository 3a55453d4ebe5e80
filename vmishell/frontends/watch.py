"""Watch a range of guest memory change: the monitoring loop behind %watch.

A `Watcher` re-reads [address, address+length) of one process every
`every` seconds, asking the session for a fresh view first (a live source
caches nothing across `refresh()`), and records each run of changed bytes
with a timestamp. It runs either in the caller's thread (`run()`, for a
terminal, until Ctrl-C or `count` reads) or in a daemon thread (`start()`,
for a notebook, so the kernel stays free). Listeners get every sample; the
notebook view uses that to repaint. No IPython here: scripts can watch too.

The thread uses its own Process (own translator and caches), so it shares
only the physical source with whatever the notebook does meanwhile, and
`stop()` joins it, which is what a detach does before closing the source.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vmishell.errors import VmiError
from vmishell.frontends.frames import GuestFrame, guest_frame
from vmishell.frontends.memory import LIFECYCLE_ERRORS, Memory, read_window

if TYPE_CHECKING:
    from vmishell.session import Process

log = logging.getLogger(__name__)

HISTORY_COLUMNS = [
    "time", "sample", "address", "offset", "size", "old", "new", "old_int", "new_int",
    "old_value", "new_value",
]  # fmt: skip
#: `view`s that split the range into numbers of one width: struct format and width.
NUMBER_VIEWS: dict[str, tuple[str, int]] = {
    "u8": ("<B", 1), "u16": ("<H", 2), "u32": ("<I", 4), "u64": ("<Q", 8),
    "i8": ("<b", 1), "i16": ("<h", 2), "i32": ("<i", 4), "i64": ("<q", 8),
    "f32": ("<f", 4), "f64": ("<d", 8),
}  # fmt: skip
VIEWS = (*NUMBER_VIEWS, "bytes", "str")
#: Changes kept in memory per watcher (the oldest are dropped beyond this).
MAX_HISTORY = 100_000
MIN_INTERVAL = 0.05


@dataclass(frozen=True, slots=True)
class Change:
    """One run of consecutive changed bytes between two samples."""

    time: float
    sample: int
    address: int
    offset: int
    old: bytes
    new: bytes
    view: str = "bytes"

    @property
    def size(self) -> int:
        return len(self.new)

    def row(self) -> tuple[Any, ...]:
        small = self.size <= 8
        return (
            self.time,
            self.sample,
            self.address,
            self.offset,
            self.size,
            self.old,
            self.new,
            int.from_bytes(self.old, "little") if small else None,
            int.from_bytes(self.new, "little") if small else None,
            decode_view(self.old, self.view),
            decode_view(self.new, self.view),
        )


def default_view(length: int) -> str:
    """A range of 1, 2, 4 or 8 bytes is one unsigned number; anything else is bytes."""
    return f"u{length * 8}" if length in (1, 2, 4, 8) else "bytes"


def decode_view(data: bytes, view: str) -> Any:
    """One watched value as `view` shows it: a number, a C string or the bytes."""
    number = NUMBER_VIEWS.get(view)
    if number is not None and len(data) == number[1]:
        return struct.unpack(number[0], data)[0]
    if view == "str":
        end = data.find(0)
        return (data if end < 0 else data[:end]).decode("utf-8", "backslashreplace")
    return data


def typed_changes(changes: list[Change], old: bytes, new: bytes, view: str) -> list[Change]:
    """Byte runs regrouped as whole values of the view: one change per changed number,
    or one for the whole range (str); bytes views keep the runs."""
    if view == "bytes" or not changes:
        return changes
    first = changes[0]
    if view == "str":
        return [Change(first.time, first.sample, first.address - first.offset, 0, old, new, view)]
    width = NUMBER_VIEWS[view][1]
    items = sorted({(c.offset + i) // width for c in changes for i in range(c.size)})
    base = first.address - first.offset
    out = []
    for k in items:
        lo, hi = k * width, (k + 1) * width
        if hi <= len(new):
            out.append(
                Change(first.time, first.sample, base + lo, lo, old[lo:hi], new[lo:hi], view)
            )
    return out


@dataclass(frozen=True, slots=True)
class Sample:
    """One read of the range: its bytes, which were readable, what changed since the last."""

    time: float
    index: int
    data: bytes
    readable: bytes
    changes: tuple[Change, ...]
    error: str | None = None

    @property
    def changed_offsets(self) -> set[int]:
        return {c.offset + i for c in self.changes for i in range(c.size)}


def diff(old: bytes, new: bytes, address: int, when: float, index: int) -> list[Change]:
    """Runs of differing bytes between two equally long buffers."""
    changes = []
    i, n = 0, min(len(old), len(new))
    while i < n:
        if old[i] == new[i]:
            i += 1
            continue
        j = i
        while j < n and old[j] != new[j]:
            j += 1
        changes.append(Change(when, index, address + i, i, old[i:j], new[i:j]))
        i = j
    return changes


Listener = Callable[["Watcher", Sample], None]


class Watcher:
    """Polls a guest memory range and keeps a history of what changed."""

    def __init__(
        self,
        process: Process,
        address: int,
        length: int,
        *,
        every: float = 1.0,
        count: int | None = None,
        refresh: Callable[[], None] | None = None,
        view: str | None = None,
    ) -> None:
        if length <= 0:
            raise VmiError("watch length must be positive")
        view = view or default_view(length)
        if view not in VIEWS:
            raise VmiError(f"watch view {view!r} is not one of {', '.join(VIEWS)}")
        if view in NUMBER_VIEWS and length % NUMBER_VIEWS[view][1]:
            raise VmiError(f"{length} bytes are not whole {view} values")
        if count is not None and count < 1:
            raise VmiError("watch count must be at least 1")
        self.process = process
        self.pid = process.pid
        self.address = address
        self.length = length
        #: How values are shown and compared: u8..u64, i8..i64, f32, f64, bytes or str.
        self.view = view
        self.every = max(MIN_INTERVAL, float(every))
        self.count = count
        self._refresh = refresh or process.session.refresh
        self._changes: list[Change] = []
        self._listeners: list[Listener] = []
        self._stop_listeners: list[Callable[[Watcher], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.samples = 0
        self.last: Sample | None = None
        self.error: str | None = None
        self.stopped_because: str | None = None

    # -- listening ------------------------------------------------------------
    def on_sample(self, listener: Listener) -> None:
        """Call `listener(watcher, sample)` after every read (from the polling thread)."""
        self._listeners.append(listener)

    def on_stop(self, listener: Callable[[Watcher], None]) -> None:
        """Call `listener(watcher)` once the watch has ended, whatever the reason."""
        self._stop_listeners.append(listener)

    # -- state ------------------------------------------------------------------
    @property
    def key(self) -> tuple[int, int]:
        """What a new watch of the same target replaces: (pid, address)."""
        return (self.pid, self.address)

    @property
    def target(self) -> str:
        return f"{self.address:#x}"

    @property
    def running(self) -> bool:
        return not self._stop.is_set() and (self._thread is None or self._thread.is_alive())

    @property
    def history(self) -> GuestFrame:
        """Every change so far: time, sample, address, offset, size, old, new (and as ints)."""
        import pandas as pd

        with self._lock:
            rows = [c.row() for c in self._changes]
        df = guest_frame(pd.DataFrame(rows, columns=HISTORY_COLUMNS), hex=["address", "offset"])
        df["time"] = pd.to_datetime(df["time"], unit="s")
        return df

    @property
    def data(self) -> Memory | None:
        """The bytes of the latest sample."""
        s = self.last
        if s is None:
            return None
        return Memory(s.data, self.address, self.pid, s.readable)

    def status(self) -> str:
        state = "running"
        if not self.running:
            state = "stopped" + (f" ({self.stopped_because})" if self.stopped_because else "")
        with self._lock:
            changes = len(self._changes)
        return (
            f"{self.length} bytes at {self.address:#x} (pid {self.pid}) as {self.view} "
            f"every {self.every:g} s: "
            f"{state}, {self.samples} reads, {changes} changes"
            + (f", last error: {self.error}" if self.error else "")
        )

    def __repr__(self) -> str:
        return f"<Watcher {self.status()}>"

    # -- polling ------------------------------------------------------------------
    def poll(self) -> Sample:
        """Read the range once (after a refresh) and record what changed."""
        now = time.time()
        index = self.samples
        error = None
        try:
            self._refresh()
            data, readable = read_window(self.process, self.address, self.length)
        except LIFECYCLE_ERRORS:
            raise  # the watch ends: see run() and the polling thread
        except VmiError as exc:
            error = str(exc)
            data, readable = bytes(self.length), bytes(self.length)
        changes: list[Change] = []
        prev = self.last
        if prev is not None and error is None:
            both = bytes(a & b for a, b in zip(prev.readable, readable, strict=True))
            old = bytes(d if ok else 0 for d, ok in zip(prev.data, both, strict=True))
            new = bytes(d if ok else 0 for d, ok in zip(data, both, strict=True))
            changes = typed_changes(diff(old, new, self.address, now, index), old, new, self.view)
        sample = Sample(now, index, data, readable, tuple(changes), error)
        with self._lock:
            self.error = error
            self._changes.extend(changes)
            if len(self._changes) > MAX_HISTORY:
                del self._changes[: len(self._changes) - MAX_HISTORY]
            if error is None:
                self.last = sample
            self.samples += 1
        for listener in list(self._listeners):
            try:
                listener(self, sample)
            except Exception:  # a broken view must not kill the watch
                log.exception("watch listener failed")
        return sample

    def _count_reached(self) -> bool:
        return self.count is not None and self.samples >= self.count

    def _done(self) -> bool:
        return self._stop.is_set() or self._count_reached()

    def run(self) -> Watcher:
        """Poll in this thread until `count` reads or `stop()` (Ctrl-C propagates)."""
        try:
            while not self._done():
                self.poll()
                if self._done() or self._stop.wait(self.every):
                    break
        except KeyboardInterrupt:
            self.stopped_because = "interrupted"
            raise
        except LIFECYCLE_ERRORS as exc:
            self._ended_by(exc)
            raise
        finally:
            self._stop.set()
            if self.stopped_because is None and self._count_reached():
                self.stopped_because = "count reached"
            self._notify_stop()
        return self

    def _thread_main(self) -> None:
        try:
            while not self._done():
                self.poll()
                if self._done() or self._stop.wait(self.every):
                    break
        except LIFECYCLE_ERRORS as exc:
            self._ended_by(exc)
        except Exception as exc:  # a bug below us: stop, and say so, rather than die silently
            self.stopped_because = f"failed: {exc}"
            log.warning("watch of %#x stopped: %s", self.address, exc)
        finally:
            if self.stopped_because is None and self._count_reached():
                self.stopped_because = "count reached"
            self._stop.set()
            self._notify_stop()

    def _ended_by(self, exc: BaseException) -> None:
        """The target ended, rebooted or was closed: the watch stops and says why."""
        with self._lock:
            self.error = str(exc)
        self.stopped_because = f"{type(exc).__name__}: {exc}"
        log.warning("watch of %#x stopped: %s", self.address, exc)

    def start(self) -> Watcher:
        """Poll in a daemon thread; returns at once."""
        if self._thread is not None:
            return self
        self._thread = threading.Thread(
            target=self._thread_main, name=f"vmishell-watch-{self.address:#x}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, reason: str = "stop() called", timeout: float = 10.0) -> Watcher:
        """Stop polling and wait for the thread to finish its current read."""
        if not self._stop.is_set() and self.stopped_because is None:
            self.stopped_because = reason
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the watch to end (count reached or stopped); True if it did."""
        if self._thread is None:
            return self._stop.is_set()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _notify_stop(self) -> None:
        for listener in list(self._stop_listeners):
            try:
                listener(self)
            except Exception:  # a broken view must not break stopping
                log.exception("watch stop listener failed")


__all__ = [
    "HISTORY_COLUMNS",
    "NUMBER_VIEWS",
    "VIEWS",
    "Change",
    "Sample",
    "Watcher",
    "decode_view",
    "default_view",
    "diff",
    "typed_changes",
]
