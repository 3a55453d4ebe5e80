"""Foreign mappings in batches, kept and dropped; frame spaces; a guest's populated ranges.

The "domain" is frames built in bytes behind a stand-in for Xen's map call
(real ForeignMapping objects over ctypes buffers), so the cache's batching,
eviction and per-frame errors are exercised without a hypervisor. The Xen
lab tests (tests/lab/test_xen_lab.py) exercise the same code on real domains.
"""

from __future__ import annotations

import ctypes
import errno

import pytest

from vmishell.errors import PhysicalReadError
from vmishell.sources.base import PhysRange
from vmishell.sources.framespace import to_walk, walk_source
from vmishell.sources.memory import BufferSource
from vmishell.sources.xen import survey
from vmishell.sources.xenlib import PAGE_SIZE, ForeignMapping
from vmishell.sources.xenmap import FrameCache


class FakeXen:
    """Frames `populated` hold their number in every byte; others fail with EINVAL."""

    def __init__(self, populated: set[int]) -> None:
        self.populated = populated
        self.calls: list[tuple[int, int]] = []
        self.unmapped: list[int] = []
        self._keep: dict[int, ctypes.Array] = {}

    def map(self, domid: int, frames, *, write: bool = False) -> ForeignMapping:
        frames = list(frames)
        self.calls.append((frames[0], len(frames)))
        buf = ctypes.create_string_buffer(len(frames) * PAGE_SIZE)
        errs = []
        for i, f in enumerate(frames):
            if f in self.populated:
                ctypes.memset(ctypes.addressof(buf) + i * PAGE_SIZE, f & 0xFF, PAGE_SIZE)
                errs.append(0)
            else:
                errs.append(-errno.EINVAL)
        self._keep[ctypes.addressof(buf)] = buf
        return ForeignMapping(self, ctypes.addressof(buf), len(frames), tuple(errs))

    def unmap(self, addr: int, pages: int) -> None:
        self.unmapped.append(addr)
        del self._keep[addr]


def test_frames_are_mapped_a_chunk_at_a_time_and_kept() -> None:
    xen = FakeXen(set(range(64)))
    cache = FrameCache(xen, 3, space="guest", chunk=16, max_chunks=8)
    assert cache.read(5, 10, 4) == bytes([5]) * 4
    assert cache.read(6, 0, 2) == bytes([6]) * 2  # same chunk: no new map call
    assert xen.calls == [(0, 16)]
    cache.read(17, 0, 1)
    assert xen.calls == [(0, 16), (16, 16)]
    assert (cache.stats.maps, cache.stats.hits) == (2, 1)


def test_the_least_recently_used_chunk_is_unmapped_first() -> None:
    xen = FakeXen(set(range(64)))
    cache = FrameCache(xen, 3, space="guest", chunk=4, max_chunks=2)
    for frame in (0, 4, 0, 8):  # 4's chunk is the oldest when 8's arrives
        cache.read(frame, 0, 1)
    assert cache.mapped == 2 and len(xen.unmapped) == 1
    cache.read(0, 0, 1)
    assert xen.calls[-1] == (8, 4)  # chunk 0 was still mapped
    cache.flush()
    assert cache.mapped == 0 and len(xen.unmapped) == 3


def test_a_frame_that_cannot_be_mapped_is_one_error_and_never_touched() -> None:
    xen = FakeXen({0, 1, 3})
    cache = FrameCache(xen, 9, space="machine", chunk=4)
    with pytest.raises(PhysicalReadError, match=r"machine frame 0x2 of domain 9 .* not populated"):
        cache.read(2, 0, 8)
    assert cache.readable(3) and not cache.readable(2)
    assert cache.read(3, 0, 1) == b"\x03"


def test_a_survey_finds_the_vga_hole_and_the_edges_of_ram_in_a_few_batches() -> None:
    ram = set(range(0, 0xA0)) | set(range(0xC0, 0x1234)) | set(range(0x3E00, 0x3E05))
    xen = FakeXen(ram | {0x2FF0, 0x2FF1})
    ranges = survey(FrameCache(xen, 1, space="guest"), 0x4000, chunk=512)
    assert ranges == [
        PhysRange(0, 0xA0000),
        PhysRange(0xC0000, 0x1234000),
        PhysRange(0x3E00000, 0x3E05000),
    ]  # the two frames inside an empty block (Xen's special pages) are not RAM to find
    assert len(xen.calls) < 8  # a few batches, not one call per block


def test_a_plain_source_is_its_own_walk_space() -> None:
    src = BufferSource([(0, bytes(PAGE_SIZE))])
    assert walk_source(src) is src and to_walk(src, 0x123) == 0x123


def test_a_source_with_another_walk_space_is_asked_for_it() -> None:
    machine = BufferSource([(0x10000, bytes(PAGE_SIZE))])

    class Pseudo(BufferSource):
        walk_source = machine

        def to_walk(self, paddr: int) -> int:
            return paddr + 0x10000

    src = Pseudo([(0, bytes(PAGE_SIZE))])
    assert walk_source(src) is machine and to_walk(src, 0x123) == 0x10123
