"""A PV guest's p2m is read from its shared-info page and its own page tables, in bytes.

The guest here is built page by page: a four-level page table mapping the
p2m list's virtual range, the list itself (pfn -> mfn, with holes and
Linux's identity and foreign marks), and the shared-info page that points
at both, exactly as a 64-bit Linux PV guest publishes them.
"""

from __future__ import annotations

import struct

import pytest

from vmishell.errors import GuestDataError
from vmishell.sources.xenp2m import (
    ARCH_OFFSET,
    FOREIGN_FRAME,
    IDENTITY_FRAME,
    INVALID,
    ArchSharedInfo,
    mfn_runs,
    p2m_size,
    pfn_runs,
    read_p2m,
)

PAGE = 4096
P2M_VA = 0xFFFFC90000000000


class Machine:
    """Machine frames as bytes; `read_frames` is what the source's mapping cache answers."""

    def __init__(self) -> None:
        self.frames: dict[int, bytearray] = {}
        self.next = 0x1000

    def alloc(self) -> int:
        self.next += 1
        self.frames[self.next] = bytearray(PAGE)
        return self.next

    def read_frames(self, mfns) -> bytes:
        return b"".join(bytes(self.frames[m]) for m in mfns)


def build(entries: list[int]) -> tuple[Machine, ArchSharedInfo]:
    m = Machine()
    list_frames = []
    for i in range(0, len(entries), 512):
        f = m.alloc()
        chunk = entries[i : i + 512]
        struct.pack_into(f"<{len(chunk)}Q", m.frames[f], 0, *chunk)
        list_frames.append(f)
    top = m.alloc()
    table = top
    for level in (4, 3, 2):
        shift = 12 + 9 * (level - 1)
        nxt = m.alloc()
        struct.pack_into("<Q", m.frames[table], ((P2M_VA >> shift) & 511) * 8, nxt << 12 | 0x63)
        table = nxt
    for i, f in enumerate(list_frames):
        struct.pack_into("<Q", m.frames[table], (((P2M_VA >> 12) & 511) + i) * 8, f << 12 | 0x63)
    shared = bytearray(PAGE)
    struct.pack_into("<6Q", shared, ARCH_OFFSET, len(entries), 0, 0, top << 12, P2M_VA, 4)
    return m, ArchSharedInfo.parse(bytes(shared))


def test_the_shared_info_page_says_where_the_p2m_is() -> None:
    _, info = build([0x100])
    assert (info.max_pfn, info.p2m_vaddr, info.p2m_generation) == (1, P2M_VA, 4)
    assert p2m_size(info, 4096) == 1 and p2m_size(info, 0) == 0


def test_the_linear_list_is_found_through_the_guests_page_tables() -> None:
    entries = [0x5000 + i for i in range(1500)]
    m, info = build(entries)
    assert list(read_p2m(m.read_frames, info, len(entries))) == entries


def test_holes_and_frames_that_are_not_the_guests_ram_read_as_invalid() -> None:
    entries = [0x200, INVALID, 0x202 | IDENTITY_FRAME, 0x203 | FOREIGN_FRAME, 0x204, 0x205]
    m, info = build(entries)
    p2m = read_p2m(m.read_frames, info, len(entries))
    assert list(p2m) == [0x200, INVALID, INVALID, INVALID, 0x204, 0x205]
    assert pfn_runs(p2m) == [(0, 1), (4, 6)]
    assert mfn_runs(p2m) == [(0x200, 0x201), (0x204, 0x206)]


def test_an_unmapped_list_page_is_a_guest_data_error_naming_the_address() -> None:
    m, info = build([1] * 600)
    last = max(m.frames)  # the PT holding the list's entries
    m.frames[last][((P2M_VA >> 12) & 511) * 8 + 8 : ((P2M_VA >> 12) & 511) * 8 + 16] = bytes(8)
    with pytest.raises(GuestDataError, match=r"not mapped at 0xffffc90000001000"):
        read_p2m(m.read_frames, info, 600)


def test_a_p2m_in_xens_own_virtual_range_is_refused() -> None:
    m, info = build([1])
    bad = ArchSharedInfo(1, 0, info.p2m_cr3, 0xFFFF800000000000, 0)
    with pytest.raises(GuestDataError, match="not valid"):
        read_p2m(m.read_frames, bad, 1)


def test_the_older_frame_list_tree_is_read_too() -> None:
    m = Machine()
    entries = [0x9000 + i for i in range(700)]
    pages = []
    for i in range(0, 700, 512):
        f = m.alloc()
        chunk = entries[i : i + 512]
        struct.pack_into(f"<{len(chunk)}Q", m.frames[f], 0, *chunk)
        pages.append(f)
    fl = m.alloc()
    struct.pack_into(f"<{len(pages)}Q", m.frames[fl], 0, *pages)
    fll = m.alloc()
    struct.pack_into("<Q", m.frames[fll], 0, fl)
    info = ArchSharedInfo(700, fll, 0, 0, 0)
    assert list(read_p2m(m.read_frames, info, 700)) == entries
    with pytest.raises(GuestDataError, match="publishes no p2m"):
        read_p2m(m.read_frames, ArchSharedInfo(700, 0, 0, 0, 0), 700)
