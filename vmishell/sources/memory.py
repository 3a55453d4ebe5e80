"""Sources whose RAM is a set of in-process buffers (bytes, mmap)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from vmishell.errors import PhysicalReadError, SourceError
from vmishell.sources.base import PhysicalSource, PhysRange, Registers, Segment


class BufferSource(PhysicalSource):
    """Physical memory made of buffers placed at physical addresses.

    Used directly for page tables built in bytes (unit tests) and as the base of
    every memory-mapped file source, so the zero-copy `segments()` path is the
    same everywhere.
    """

    def __init__(
        self,
        segments: Sequence[tuple[int, bytes | bytearray | memoryview]],
        *,
        registers: Registers | None = None,
        description: str = "memory buffer",
        live: bool = False,
        writable: bool = False,
    ) -> None:
        super().__init__()
        segs = sorted(
            (Segment(start, memoryview(buf).cast("B")) for start, buf in segments if len(buf)),
            key=lambda s: s.start,
        )
        for a, b in itertools.pairwise(segs):
            if a.end > b.start:
                raise SourceError(f"overlapping RAM segments at {b.start:#x}")
        self._segments = segs
        self._ranges = [PhysRange(s.start, s.end) for s in segs]
        self._registers = registers
        self.description = description
        self.live = live
        self.writable = writable and all(not s.view.readonly for s in segs)

    def ranges(self) -> Sequence[PhysRange]:
        return self._ranges

    def segments(self) -> Sequence[Segment]:
        return self._segments

    def _segment_of(self, paddr: int) -> Segment:
        for s in self._segments:
            if s.start <= paddr < s.end:
                return s
        raise PhysicalReadError(paddr, 1)

    def _read(self, paddr: int, size: int) -> bytes:
        s = self._segment_of(paddr)
        off = paddr - s.start
        return bytes(s.view[off : off + size])

    def registers(self) -> Registers:
        if self._registers is None:
            return super().registers()
        return self._registers

    def write(self, paddr: int, data: bytes) -> None:
        if not self.writable:
            raise SourceError(f"{self.description} is read-only (open it writable to change it)")
        if not self.is_valid(paddr, len(data)):
            raise PhysicalReadError(paddr, len(data), "write outside guest RAM")
        s = self._segment_of(paddr)
        off = paddr - s.start
        s.view[off : off + len(data)] = data
