"""What every source of guest-physical memory answers.

A source knows the guest's RAM ranges and reads physical bytes with no seek
state. Live sources bump `generation` on `refresh()` so that caches keyed on
(physical address, generation) never serve data from before the caller asked
for a fresh view.
"""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from vmishell.errors import PhysicalReadError, RegistersUnavailable


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

    `arch` is "x86_64" or "i386" for the guest's architecture as reported by
    the source. Control registers absent from the source are None.
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

    def read_padded(self, paddr: int, size: int) -> bytes:
        """Read like `read`, but bytes outside RAM read as zeros."""
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

    def close(self) -> None:  # noqa: B027 - most sources hold nothing to release
        """Release files and sockets."""

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
