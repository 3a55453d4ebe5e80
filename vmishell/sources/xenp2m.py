"""A Xen PV guest's physical-to-machine map (p2m), read from the guest the way Xen's tools do.

A PV kernel's own physical addresses (`__pa()`, page frame numbers) are
pseudo-physical; its page tables hold machine frames. The guest keeps the
map between the two in its own memory and tells Xen where in the
`arch_shared_info` part of its shared-info page:

- `p2m_cr3` and `p2m_vaddr` (Linux since 4.x): the p2m is a linear array at
  `p2m_vaddr` of the guest's kernel address space whose page tables start at
  machine frame `p2m_cr3 >> 12`; `p2m_generation` changes whenever it does;
- otherwise `pfn_to_mfn_frame_list_list`: the machine frame of a page listing
  the frames of pages listing the p2m's frames (a three-level tree).

This is the logic of Xen's own `xc_core_arch_map_p2m` (tools/libs/guest/
xg_core_x86.c), for 64-bit PV guests, written over a `read_frames`
callable so that it maps nothing writable and is tested on pages built in
bytes. Every frame number and count from the guest is bounded: the walk
reads at most a page-table path per p2m page and the p2m's size is capped
by what Xen says the guest has (`nr_gpfns`).
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vmishell.errors import GuestDataError

PAGE = 4096
#: Offsets in a 64-bit guest's shared_info page (struct shared_info, x86_64).
ARCH_OFFSET = 3088
_ARCH = struct.Struct("<QQQQQQ")  # max_pfn, fll, nmi_reason, p2m_cr3, p2m_vaddr, p2m_generation
#: An entry that maps nothing, and Linux's marks on entries that are not the guest's RAM.
INVALID = (1 << 64) - 1
FOREIGN_FRAME = 1 << 63
IDENTITY_FRAME = 1 << 62
#: Where Xen reserves 64-bit guests' virtual addresses for itself.
_XEN_VIRT = (0xFFFF800000000000, 0xFFFF87FFFFFFFFFF)
_ADDRESS = 0x000FFFFFFFFFF000
_ENTRIES = PAGE // 8

ReadFrames = Callable[[Sequence[int]], bytes]


@dataclass(frozen=True, slots=True)
class ArchSharedInfo:
    """The p2m's whereabouts, as a 64-bit PV guest publishes them."""

    max_pfn: int
    frame_list_list: int
    p2m_cr3: int
    p2m_vaddr: int
    p2m_generation: int

    @classmethod
    def parse(cls, page: bytes) -> ArchSharedInfo:
        max_pfn, fll, _nmi, cr3, vaddr, gen = _ARCH.unpack_from(page, ARCH_OFFSET)
        return cls(max_pfn, fll, cr3, vaddr, gen)


def _canonical(v: int) -> bool:
    top = v >> 47
    return top in (0, (1 << 17) - 1)


def linear_p2m_frames(read_frames: ReadFrames, info: ArchSharedInfo, nr_pfns: int) -> list[int]:
    """The machine frames holding the linear p2m list (the guest's virtually mapped array).

    Walks the guest's own four-level page tables from `p2m_cr3` for the
    virtual range of the list, one level at a time, as xg_core_x86.c does.
    """
    frames_needed = -(-nr_pfns // _ENTRIES)
    start = info.p2m_vaddr
    end = start + frames_needed * PAGE - 1
    if (
        not (_canonical(start) and _canonical(end))
        or end < start
        or (start <= _XEN_VIRT[1] and end > _XEN_VIRT[0])
    ):
        raise GuestDataError(f"the p2m list's virtual range {start:#x}-{end:#x} is not valid")
    tables = [info.p2m_cr3 >> 12]
    first_index = 0
    mask = (1 << 48) - 1
    for level in (4, 3, 2, 1):
        shift = 12 + 9 * (level - 1)
        lo = ((start & mask) >> shift) - first_index
        hi = ((end & mask) >> shift) - first_index
        data = read_frames(tables)
        if hi >= len(tables) * _ENTRIES or lo < 0:
            raise GuestDataError(f"the p2m list does not fit its level-{level} tables")
        entries = struct.unpack_from(f"<{hi - lo + 1}Q", data, lo * 8)
        tables = []
        for i, e in enumerate(entries):
            if not e & 1 or not e & _ADDRESS:
                raise GuestDataError(
                    f"the p2m list is not mapped at {start + ((lo + i) << shift):#x} "
                    f"(level {level} entry {e:#x})"
                )
            tables.append((e & _ADDRESS) >> 12)
        # The next level's tables start with the one covering `start`: index its
        # entries from that table's first.
        first_index = ((start & mask) >> shift) << 9
    return tables


def tree_p2m_frames(read_frames: ReadFrames, info: ArchSharedInfo, nr_pfns: int) -> list[int]:
    """The machine frames of the p2m from the older frame-list-list tree."""
    frames_needed = -(-nr_pfns // _ENTRIES)
    lists_needed = -(-frames_needed // _ENTRIES)
    if lists_needed > _ENTRIES:
        raise GuestDataError(f"a p2m of {nr_pfns} frames does not fit a frame list tree")
    fll = struct.unpack_from(f"<{lists_needed}Q", read_frames([info.frame_list_list]))
    lists = read_frames(list(fll))
    return list(struct.unpack_from(f"<{frames_needed}Q", lists))


def p2m_size(info: ArchSharedInfo, nr_gpfns: int) -> int:
    """Entries of the p2m: what Xen counts, or less when the guest's own list is shorter."""
    if 0 < info.max_pfn < nr_gpfns:
        return info.max_pfn
    return nr_gpfns


def p2m_frames(read_frames: ReadFrames, info: ArchSharedInfo, nr_pfns: int) -> list[int]:
    """The machine frames holding the p2m of `nr_pfns` entries, by whichever way the guest uses."""
    if info.p2m_cr3:
        return linear_p2m_frames(read_frames, info, nr_pfns)
    if info.frame_list_list in (0, INVALID):
        raise GuestDataError("the guest publishes no p2m (neither a list nor a frame list tree)")
    return tree_p2m_frames(read_frames, info, nr_pfns)


def read_p2m(read_frames: ReadFrames, info: ArchSharedInfo, nr_pfns: int) -> array:
    """The p2m: entry `pfn` is the machine frame of pseudo-physical frame `pfn`, or INVALID.

    Entries that are not the guest's own RAM (Linux's identity and foreign
    marks) read as INVALID: nothing of the guest lies there.
    """
    frames = p2m_frames(read_frames, info, nr_pfns)
    raw = read_frames(frames)
    table = array("Q")
    table.frombytes(raw[: nr_pfns * 8])
    special = FOREIGN_FRAME | IDENTITY_FRAME
    for pfn, entry in enumerate(table):
        if entry & special and entry != INVALID:
            table[pfn] = INVALID
    return table


def pfn_runs(p2m: array) -> list[tuple[int, int]]:
    """[start, end) frame runs of the pseudo-physical space that hold RAM."""
    runs: list[tuple[int, int]] = []
    start = None
    for pfn, mfn in enumerate(p2m):
        if mfn != INVALID:
            if start is None:
                start = pfn
        elif start is not None:
            runs.append((start, pfn))
            start = None
    if start is not None:
        runs.append((start, len(p2m)))
    return runs


def mfn_runs(p2m: array) -> list[tuple[int, int]]:
    """[start, end) runs of machine frames the guest's p2m names (its own memory)."""
    mfns = sorted({m for m in p2m if m != INVALID})
    runs: list[tuple[int, int]] = []
    for m in mfns:
        if runs and runs[-1][1] == m:
            runs[-1] = (runs[-1][0], m + 1)
        else:
            runs.append((m, m + 1))
    return runs
