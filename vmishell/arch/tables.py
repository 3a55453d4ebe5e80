"""Access to paging-structure tables in guest-physical memory.

Walks read one entry per level, bulk enumeration reads whole tables. Both go
through `TableReader.locate`, which answers a (buffer, offset) pair: over a
memory-mapped source that is the source's own zero-copy segment view (so an
entry costs one `struct.unpack_from`, and no derived view outlives the call
to keep an mmap from closing), over any other source it is a copy of the
whole table, cached until the source's generation changes, because reading
a table entry by entry through a socket or a file would dominate every walk.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from struct import Struct

from vmishell.errors import PhysicalReadError
from vmishell.sources.base import PhysicalSource, Segment

Buffer = bytes | memoryview

#: Tables kept per translator for sources without zero-copy segments (~4 KiB each).
DEFAULT_MAX_CACHED_TABLES = 4096


class TableReader:
    """Finds page tables in a source and keeps copies of them per generation."""

    def __init__(
        self,
        source: PhysicalSource,
        entry_size: int,
        *,
        max_cached_tables: int = DEFAULT_MAX_CACHED_TABLES,
    ) -> None:
        self.source = source
        self.entry_size = entry_size
        self.entry = Struct("<I" if entry_size == 4 else "<Q")
        self._whole: dict[int, Struct] = {}
        self._max_cached = max_cached_tables
        self._cache: dict[tuple[int, int], bytes | None] = {}
        #: The source's zero-copy RAM segments (empty when it has none) and their starts.
        self.segments: Sequence[Segment] = ()
        self.starts: list[int] = []
        self._seen_segments: object = None
        self.reload()

    def reload(self) -> None:
        """Forget cached tables and look at the source's segments again.

        Cheap when nothing but the guest's contents changed (the common case on
        a live guest, once per top-level call): the segment list is rebuilt
        only when the source hands out a different one (after close, say).
        A closed or ended source raises its error here.
        """
        self._cache.clear()
        source = self.source
        if source.closed or source.ended:
            self.segments, self.starts, self._seen_segments = (), [], None
            source.check()
        segments = source.segments()
        if segments is not self._seen_segments or segments is None:
            self._seen_segments = segments
            self.segments = tuple(segments or ())
            self.starts = [s.start for s in self.segments]

    @property
    def single_segment(self) -> Segment | None:
        """The only RAM segment, when there is exactly one (lets walks inline the lookup)."""
        return self.segments[0] if len(self.segments) == 1 else None

    def table_struct(self, count: int) -> Struct:
        """A Struct unpacking `count` entries at once."""
        st = self._whole.get(count)
        if st is None:
            st = self._whole[count] = Struct(f"<{count}{'I' if self.entry_size == 4 else 'Q'}")
        return st

    def locate(self, table: int, size: int) -> tuple[Buffer, int] | None:
        """The buffer and offset holding physical [table, table+size), or None outside RAM."""
        if self.segments:
            i = bisect.bisect_right(self.starts, table) - 1
            if i >= 0:
                seg = self.segments[i]
                off = table - seg.start
                if off + size <= len(seg.view):
                    return seg.view, off
            return None
        key = (table, size)
        data = self._cache.get(key, b"")
        if data == b"":
            data = self._load(key)
        return (data, 0) if data is not None else None

    def _load(self, key: tuple[int, int]) -> bytes | None:
        try:
            data: bytes | None = self.source.read(*key)
        except PhysicalReadError:
            data = None
        if len(self._cache) >= self._max_cached:
            # Oldest first: upper-level tables, read first, are re-read soonest anyway.
            del self._cache[next(iter(self._cache))]
        self._cache[key] = data
        return data
