"""What every source of guest-physical memory answers.

A source knows the guest's RAM ranges and reads physical bytes with no seek
state. Live sources bump `generation` on `refresh()` so that caches keyed on
(physical address, generation) never serve data from before the caller asked
for a fresh view.

A live source also has a lifecycle. `check()` is called at the start of every
top-level call (by the session) and must be cheap: it raises TargetEnded once
the VM is gone and SessionClosed after `close()`. `resets` counts guest
resets the source has seen (None when it cannot tell, as for a RAM file
without an event channel: the OS layer then watches the kernel itself).
"""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from vmishell.errors import (
    PhysicalReadError,
    RegistersUnavailable,
    SessionClosed,
    TargetEnded,
)


@dataclass(frozen=True, slots=True)
class PhysRange:
    """A run of guest RAM: physical [start, end)."""

    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Registers:
    """The vCPU state that address translation needs (and a few more for display).

    `arch` is "x86_64", "i386" or "aarch64" for the guest's architecture as
    reported by the source. Control registers absent from the source are None
    (on aarch64 all of them: QEMU's `info registers` shows PC, SP and PSTATE,
    kept in `extra`, but no TTBR or TCR).
    """

    arch: str
    cr0: int | None = None
    cr3: int | None = None
    cr4: int | None = None
    efer: int | None = None
    extra: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Segment:
    """A RAM range backed by one buffer: physical [start, start+len(view))."""

    start: int
    view: memoryview

    @property
    def end(self) -> int:
        return self.start + len(self.view)


class PhysicalSource(ABC):
    """Guest-physical memory. Subclasses implement `_read` and `ranges`."""

    #: Whether the guest may change under us (a running VM).
    live: bool = False
    #: Whether `write` is allowed; sources are read-only unless opened writable.
    writable: bool = False
    #: Short human description ("ram file /dev/shm/x", "ELF core dump.elf").
    description: str = "physical memory"

    def __init__(self) -> None:
        self._generation = 0
        self._starts: list[int] | None = None
        self._closed = False
        self._ended: TargetEnded | None = None

    # -- what subclasses provide ------------------------------------------------
    @abstractmethod
    def ranges(self) -> Sequence[PhysRange]:
        """The guest's RAM ranges, sorted and non-overlapping."""

    @abstractmethod
    def _read(self, paddr: int, size: int) -> bytes:
        """Read bytes known to lie inside one RAM range."""

    def segments(self) -> Sequence[Segment] | None:
        """Zero-copy buffers over RAM when the source is memory-mapped, else None.

        Hot paths (page walks) use these to read entries without a call per read.
        """
        return None

    def registers(self) -> Registers:
        """The guest's control registers; raises RegistersUnavailable if unknown."""
        raise RegistersUnavailable(f"{self.description} carries no CPU registers")

    # -- lifecycle --------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def ended(self) -> bool:
        return self._ended is not None

    @property
    def resets(self) -> int | None:
        """Guest resets seen since the source was opened; None when the source cannot tell."""
        return None

    def check(self) -> None:
        """Raise SessionClosed or TargetEnded if the target can no longer be read.

        Called at the start of every top-level call, so it must stay cheap;
        sources with a lifecycle extend `_check_alive`.
        """
        if self._closed:
            raise SessionClosed(f"{self.description} is closed")
        if self._ended is not None:
            raise self._ended
        self._check_alive()

    def _check_alive(self) -> None:  # noqa: B027 - images have no lifecycle to check
        """Subclass hook: notice that the target ended and call `_end(why)`."""

    def _end(self, why: str) -> None:
        """Record that the target ended (once) and raise the error every later call gets."""
        if self._ended is None:
            import time

            when = time.time()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
            self._ended = TargetEnded(f"{self.description} ended at {stamp}: {why}", when)
            self._generation += 1
        raise self._ended

    @property
    def state(self) -> str:
        """ "closed", "ended", "running" for a live guest, or "image"."""
        if self._closed:
            return "closed"
        if self._ended is not None:
            return "ended"
        return "running" if self.live else "image"

    # -- common behaviour ------------------------------------------------------------
    @property
    def generation(self) -> int:
        """Changes whenever a live guest may have changed since the last look."""
        return self._generation

    def refresh(self) -> None:
        """Declare that cached views of a live guest are stale."""
        if self.live:
            self._generation += 1

    @property
    def size(self) -> int:
        """One past the highest physical address backed by RAM."""
        rs = self.ranges()
        return rs[-1].end if rs else 0

    def range_of(self, paddr: int) -> PhysRange | None:
        """The RAM range holding `paddr`, or None."""
        rs = self.ranges()
        if self._starts is None or len(self._starts) != len(rs):
            self._starts = [r.start for r in rs]
        i = bisect.bisect_right(self._starts, paddr) - 1
        if i >= 0 and paddr < rs[i].end:
            return rs[i]
        return None

    def is_valid(self, paddr: int, size: int = 1) -> bool:
        """Whether [paddr, paddr+size) lies entirely in RAM."""
        r = self.range_of(paddr)
        return r is not None and paddr + size <= r.end

    def read(self, paddr: int, size: int) -> bytes:
        """Read `size` bytes at `paddr`; raises PhysicalReadError outside RAM."""
        if size < 0 or paddr < 0:
            raise PhysicalReadError(paddr, size, "negative address or size")
        if self._closed or self._ended is not None:
            self.check()
        if size == 0:
            return b""
        r = self.range_of(paddr)
        if r is None:
            raise PhysicalReadError(paddr, size)
        if paddr + size <= r.end:
            return self._read(paddr, size)
        # Spans several ranges: every byte must still be RAM.
        parts = []
        pos, end = paddr, paddr + size
        while pos < end:
            r = self.range_of(pos)
            if r is None:
                raise PhysicalReadError(paddr, size, f"{pos:#x} is outside guest RAM")
            chunk = min(end, r.end) - pos
            parts.append(self._read(pos, chunk))
            pos += chunk
        return b"".join(parts)

    def read_sparse(self, paddr: int, size: int) -> bytes:
        """A small read, one of many far apart (a probe on a grid); same answer as `read`.

        Sources that map their memory answer it without mapping the page
        into this process (see MappedFileSource), so a scan of a few hundred
        probes does not cost tens of megabytes of resident memory.
        """
        return self.read(paddr, size)

    def read_padded(self, paddr: int, size: int) -> bytes:
        """Read like `read`, but bytes outside RAM read as zeros."""
        if self._closed or self._ended is not None:
            self.check()
        out = bytearray(size)
        pos, end = paddr, paddr + size
        for r in self.ranges():
            lo, hi = max(pos, r.start), min(end, r.end)
            if lo < hi:
                out[lo - paddr : hi - paddr] = self._read(lo, hi - lo)
        return bytes(out)

    def write(self, paddr: int, data: bytes) -> None:
        """Write guest memory: refused unless the source was opened writable."""
        from vmishell.errors import SourceError

        raise SourceError(f"{self.description} is read-only")

    def find(self, needle: bytes, start: int = 0, end: int | None = None) -> Iterable[int]:
        """Physical addresses of `needle` in RAM, in order (matches may span a chunk edge)."""
        chunk = 16 << 20
        for r in self.ranges():
            lo = max(start, r.start)
            hi = r.end if end is None else min(end, r.end)
            pos = lo
            while pos < hi:
                n = min(chunk + len(needle) - 1, hi - pos)
                data = self._read(pos, n)
                i = data.find(needle)
                while i != -1:
                    if i < chunk or pos + n >= hi:
                        yield pos + i
                    i = data.find(needle, i + 1)
                pos += chunk

    def close(self) -> None:
        """Release files and sockets; every later read raises SessionClosed."""
        self._closed = True
        self._generation += 1

    def __enter__(self) -> PhysicalSource:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}>"
