"""Foreign mappings of one Xen domain's frames, made in batches and kept while they stay true.

Mapping a frame costs a hypercall path through dom0's privcmd driver; a
batch of frames costs little more than one. So frames are mapped by
aligned chunk (`chunk` frames at once) and the mappings are kept, least
recently used first out, up to `max_chunks`.

A foreign mapping shows the page as it is now, so a kept mapping stays true
while the guest runs; it goes stale only when the frame stops being the
guest's (a balloon driver returns it, a PV guest's p2m changes). The owner
(`XenDomainSource`) watches for that (the domain's page count, the PV p2m's
generation) and calls `flush()`. A frame that could not be mapped is never
touched (it would kill the process with SIGBUS): its error is remembered
with the chunk and raised as PhysicalReadError naming the frame and why.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from vmishell.errors import PhysicalReadError, SourceError
from vmishell.sources.xenlib import PAGE_SIZE, ForeignMapping, Xen, frame_error

#: Frames mapped per batch by default (256 KiB): see benchmarks/bench_xen.py for the trade.
DEFAULT_CHUNK = 64
#: Chunks kept mapped (64 frames each: 256 MiB of address space by default).
DEFAULT_MAX_CHUNKS = 1024


@dataclass
class MapStats:
    """What the cache did: calls to map, frames mapped, reads served from kept mappings."""

    maps: int = 0
    frames: int = 0
    hits: int = 0
    flushes: int = 0


class FrameCache:
    """Read frames of one domain (guest frames, or machine frames for PV) through kept mappings."""

    def __init__(
        self,
        xen: Xen,
        domid: int,
        *,
        space: str,
        chunk: int = DEFAULT_CHUNK,
        max_chunks: int = DEFAULT_MAX_CHUNKS,
        write: bool = False,
    ) -> None:
        if chunk < 1 or chunk & (chunk - 1):
            raise ValueError(f"chunk must be a power of two, not {chunk}")
        self.xen = xen
        self.domid = domid
        #: "guest" (gfns) or "machine" (mfns), for messages.
        self.space = space
        self.chunk = chunk
        self.max_chunks = max(1, max_chunks)
        self.write = write
        self.stats = MapStats()
        self._maps: OrderedDict[int, ForeignMapping] = OrderedDict()

    def _mapping(self, index: int) -> ForeignMapping:
        m = self._maps.get(index)
        if m is not None:
            self._maps.move_to_end(index)
            self.stats.hits += 1
            return m
        first = index * self.chunk
        m = self.xen.map(self.domid, range(first, first + self.chunk), write=self.write)
        self.stats.maps += 1
        self.stats.frames += self.chunk
        self._maps[index] = m
        while len(self._maps) > self.max_chunks:
            _, old = self._maps.popitem(last=False)
            old.unmap()
        return m

    def readable(self, frame: int) -> bool:
        """Whether `frame` maps (it is the domain's and populated)."""
        try:
            m = self._mapping(frame // self.chunk)
        except SourceError:  # nothing of the chunk could be mapped
            return False
        return m.ok(frame % self.chunk)

    def read(self, frame: int, offset: int, size: int) -> bytes:
        """`size` bytes at `offset` of one frame (offset + size <= 4096)."""
        m = self._mapping(frame // self.chunk)
        i = frame % self.chunk
        if not m.ok(i):
            raise PhysicalReadError(
                frame * PAGE_SIZE + offset,
                size,
                f"{self.space} frame {frame:#x} of domain {self.domid} cannot be mapped: "
                f"{frame_error(m.errors[i])}",
            )
        return m.read(i * PAGE_SIZE + offset, size)

    def write_bytes(self, frame: int, offset: int, data: bytes) -> None:
        m = self._mapping(frame // self.chunk)
        i = frame % self.chunk
        if not m.ok(i):
            raise PhysicalReadError(
                frame * PAGE_SIZE + offset,
                len(data),
                f"{self.space} frame {frame:#x} cannot be mapped: {frame_error(m.errors[i])}",
            )
        m.write(i * PAGE_SIZE + offset, data)

    def read_frames(self, frames: Sequence[int]) -> bytes:
        """Whole pages, concatenated (each must map)."""
        return b"".join(self.read(f, 0, PAGE_SIZE) for f in frames)

    def probe(self, frames: Sequence[int]) -> list[bool]:
        """Which of `frames` map, in one batch that is not kept (a survey of a frame space)."""
        if not frames:
            return []
        m = self.xen.map(self.domid, frames)
        try:
            self.stats.maps += 1
            self.stats.frames += len(frames)
            return [m.ok(i) for i in range(len(frames))]
        finally:
            m.unmap()

    def flush(self) -> None:
        """Unmap everything (the guest's frames may have changed hands)."""
        maps, self._maps = self._maps, OrderedDict()
        for m in maps.values():
            m.unmap()
        self.stats.flushes += 1

    @property
    def mapped(self) -> int:
        """Chunks mapped now."""
        return len(self._maps)
