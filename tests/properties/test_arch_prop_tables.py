"""Walker, scanner and reader agree on random page tables, in every paging mode.

Two kinds of tables: well-formed ones built from a random list of pages
(checked against that list), and hostile ones made of random entries that
alias, loop and point outside RAM (checked for mutual consistency only).
"""

from __future__ import annotations

import itertools
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.pagetables import PageTableBuilder
from vmishell.arch import AddressSpace, Mapping, PagingMode, Translator
from vmishell.errors import PageFault
from vmishell.sources.memory import BufferSource

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
LONG = (PagingMode.LEVEL4, PagingMode.LEVEL5)
SIZES = {
    PagingMode.LEGACY: (4 * KiB, 4 * MiB),
    PagingMode.PAE: (4 * KiB, 2 * MiB),
    PagingMode.LEVEL4: (4 * KiB, 2 * MiB, GiB),
    PagingMode.LEVEL5: (4 * KiB, 2 * MiB, GiB),
}
#: Where the random pages go: a few regions so tables are shared and runs cross tables.
REGIONS = {
    PagingMode.LEGACY: (0x0040_0000, 0xC000_0000, 0xFF80_0000),
    PagingMode.PAE: (0x0040_0000, 0xC000_0000, 0xFF80_0000),
    PagingMode.LEVEL4: (0x7F00_0000_0000, 0xFFFF_8880_0000_0000, 0xFFFF_FFFF_8000_0000),
    PagingMode.LEVEL5: (0x00FF_0000_0000_0000, 0xFFFF_8880_0000_0000, 0xFF00_0000_0000_0000),
}
RAM = 4 * MiB

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

modes = st.sampled_from(list(PagingMode))


# -- checks shared by both kinds of tables ----------------------------------------------------


def sample_addresses(m: Mapping, data: st.DataObject) -> list[int]:
    """Every page of a small mapping, or its ends plus random pages of a big one."""
    pages = m.size // 4096
    if pages <= 48:
        offs = [i * 4096 for i in range(pages)] + [m.size - 1]
    else:
        offs = [0, m.size - 1] + [
            data.draw(st.integers(0, m.size - 1), label="offset") for _ in range(12)
        ]
    return [m.vaddr + o for o in offs]


def check_consistency(tr: Translator, data: st.DataObject) -> list[Mapping]:
    maps = list(tr.mappings())
    # The batched array form gives the very same runs.
    assert tr.runs() == [(m.vaddr, m.paddr, m.size, m.writable, m.user, m.nx) for m in maps]
    # Sorted, disjoint, and maximally coalesced.
    for a, b in itertools.pairwise(maps):
        assert a.end <= b.vaddr
        assert not (
            a.end == b.vaddr
            and a.paddr + a.size == b.paddr
            and (a.writable, a.user, a.nx) == (b.writable, b.user, b.nx)
        )
    # translate() agrees everywhere inside each run.
    for m in maps:
        for va in sample_addresses(m, data):
            t = tr.translate(va)
            assert t.paddr == m.paddr + (va - m.vaddr), (hex(va), m)
            assert (t.writable, t.user, t.nx) == (m.writable, m.user, m.nx)
    # Addresses outside every run fault.
    starts = [m.vaddr for m in maps]
    probes = [m.vaddr - 1 for m in maps] + [m.end for m in maps]
    top = tr.geometry.space_end
    probes += [data.draw(st.integers(0, top - 1), label="probe") for _ in range(20)]
    for va in probes:
        if not 0 <= va < top:
            continue
        inside = any(m.vaddr <= va < m.end for m in maps)
        if inside:
            continue
        try:
            t = tr.translate(va)
        except PageFault:
            continue
        raise AssertionError(f"{va:#x} translates to {t!r} but no mapping covers it {starts}")
    return maps


def check_windows(tr: Translator, maps: list[Mapping], data: st.DataObject) -> None:
    """mappings(start, end) clips; read(pad=True) equals a page-by-page reference."""
    asp = AddressSpace(tr)
    src = tr.source
    centres = [m.vaddr for m in maps] + [m.end for m in maps] or [0x1000]
    for _ in range(3):
        centre = data.draw(st.sampled_from(centres), label="centre")
        lo = max(0, centre - data.draw(st.integers(0, 3 * 4096), label="before"))
        size = data.draw(st.integers(1, 5 * 4096), label="size")
        hi = min(lo + size, tr.geometry.space_end)
        size = hi - lo
        # Clipped enumeration equals the intersection of the full one.
        want = []
        for m in maps:
            a, z = max(m.vaddr, lo), min(m.end, hi)
            if a < z:
                want.append((a, m.paddr + (a - m.vaddr), z - a, m.writable, m.user, m.nx))
        got = [(m.vaddr, m.paddr, m.size, m.writable, m.user, m.nx) for m in tr.mappings(lo, hi)]
        assert got == want
        assert tr.runs(lo, hi) == want
        # Padded read equals per-page translate + physical read.
        ref = bytearray()
        pos = lo
        while pos < hi:
            n = min((pos | 0xFFF) + 1, hi) - pos
            try:
                p = tr.translate(pos).paddr
            except PageFault:
                ref += bytes(n)
            else:
                ref += src.read_padded(p, n)
            pos += n
        assert asp.read(lo, size, pad=True) == bytes(ref)
        into = bytearray(size)
        asp.read_into(lo, into, pad=True)
        assert into == ref
        # Unpadded: succeeds exactly when every byte is mapped onto RAM.
        try:
            plain = asp.read(lo, size)
        except PageFault:
            assert not asp.is_readable(lo, size)
        else:
            assert plain == bytes(ref) and asp.is_readable(lo, size)


# -- well-formed tables from a list of pages --------------------------------------------------


@st.composite
def page_lists(draw: st.DrawFn, mode: PagingMode) -> list[tuple[int, int, int, dict[str, bool]]]:
    out = []
    for _ in range(draw(st.integers(1, 40))):
        size = draw(st.sampled_from(SIZES[mode]))
        region = draw(st.sampled_from(REGIONS[mode]))
        va = (
            region
            + draw(st.integers(0, 15)) * max(size, 2 * MiB)
            + (draw(st.integers(0, 511)) * size if size == 4 * KiB else 0)
        )
        # Frames: mostly in RAM, often following each other, sometimes beyond RAM.
        frame_slot = draw(st.integers(0, (RAM // size) + 2))
        pa = frame_slot * size
        flags = {
            "writable": draw(st.booleans()),
            "user": draw(st.booleans()),
            "nx": draw(st.booleans()),
        }
        run = draw(st.integers(1, 6))
        for k in range(run):
            out.append((va + k * size, pa + k * size, size, flags))
    return out


@SETTINGS
@given(data=st.data(), mode=modes, zero_copy=st.booleans())
def test_well_formed_tables(data: st.DataObject, mode: PagingMode, zero_copy: bool) -> None:
    b = PageTableBuilder(mode, ram_size=RAM, table_start=0x1000)
    expected: dict[int, tuple[int, int, dict[str, bool]]] = {}
    taken: list[tuple[int, int]] = []
    for va, pa, size, flags in data.draw(page_lists(mode), label="pages"):
        if va + size > mode.spec.address_space_end:
            continue
        if any(a < va + size and va < z for a, z in taken):
            continue
        try:
            b.map(va, pa, size, **flags)
        except Exception:  # builder ran out of table space: fine, skip the page
            continue
        taken.append((va, va + size))
        expected[va] = (pa, size, flags)
    for i in range(len(b.ram[b._next :]) // 4096):  # scribble on free RAM: data, not tables
        b.ram[b._next + i * 4096 : b._next + i * 4096 + 8] = struct.pack("<Q", i * 0x9E37)
    src = b.source(zero_copy=zero_copy)
    tr = Translator(src, b.dtb, mode)
    maps = check_consistency(tr, data)
    # Against the oracle: every page we mapped translates as mapped...
    for va, (pa, size, flags) in expected.items():
        t = tr.translate(va + size // 2)
        assert t.paddr == pa + size // 2 and t.page_size == size
        assert t.writable == flags["writable"] and t.user == flags["user"]
        assert t.nx == (flags["nx"] and mode.spec.nx_capable)
    # ... and the runs cover exactly those pages.
    assert sum(m.size for m in maps) == sum(size for _, size, _ in expected.values())
    check_windows(tr, maps, data)


# -- hostile tables: random entries that alias, loop and point anywhere -----------------------


@st.composite
def hostile_memory(draw: st.DrawFn, mode: PagingMode) -> tuple[bytearray, int]:
    pages = draw(st.integers(2, 10))
    ram = bytearray(pages * 4096)
    esz = mode.spec.entry_size
    per_table = 4096 // esz
    wide = esz == 8
    for page in range(pages):
        for _ in range(draw(st.integers(0, 12))):
            index = draw(st.integers(0, per_table - 1))
            if page == 0 and mode is PagingMode.PAE and draw(st.booleans()):
                index = draw(st.integers(0, 3))  # hit the 4 PDPTEs often
            # Mostly frames of this RAM (so entries chain into tables), a few beyond it.
            frame = draw(st.one_of(st.integers(0, pages - 1), st.integers(0, pages + 3)))
            big = draw(st.sampled_from([0, 0, 0, 1, 2]))  # large-page-aligned frames
            addr = frame << (12 + 9 * big) if wide else frame << (12 + 10 * (big > 0))
            flags = draw(st.integers(0, 0x17F))  # low flags, PS clear ...
            flags |= 0x80 if draw(st.integers(0, 3)) == 0 else 0  # ... set one time in four
            flags |= 1 if draw(st.integers(0, 7)) else 0  # mostly present
            high = 0
            if wide:
                high = draw(st.sampled_from([0, 0, 1 << 63, 0x7FF << 52, 1 << 51]))
            value = (addr | flags | high | draw(st.sampled_from([0, 1 << 12, 0x55 << 13]))) & (
                (1 << (8 * esz)) - 1
            )
            struct.pack_into("<Q" if wide else "<I", ram, page * 4096 + index * esz, value)
    dtb = draw(st.sampled_from([0, 0x20, 0x1000])) if mode is PagingMode.PAE else 0
    # Spines: chains of present entries from the top table down, through random
    # pages (so tables alias), so that most examples map something.
    levels = mode.spec.levels
    for _ in range(draw(st.integers(1, 4))):
        table = dtb
        for depth, lvl in enumerate(levels):
            index = draw(st.integers(0, lvl.entries - 1))
            last = depth == len(levels) - 1
            rights = draw(st.integers(0, 7)) | 1 if lvl.permissions else 1
            if last or (lvl.large_page and draw(st.integers(0, 3)) == 0):
                frame = draw(st.integers(0, 64)) << lvl.shift if not last else 0
                frame = frame or draw(st.integers(0, pages + 2)) << 12
                nx = (1 << 63) if wide and draw(st.booleans()) else 0
                # Large pages: PAT (bit 12) and, in legacy mode, PSE-36 bits 20:13.
                low = 0 if last else 0x80 | draw(st.sampled_from([0, 1 << 12, 0x55 << 13]))
                value = frame | rights | low | nx
            else:
                value = draw(st.integers(0, pages - 1)) << 12 | rights
            struct.pack_into(
                "<Q" if wide else "<I", ram, table + index * esz, value & ((1 << (8 * esz)) - 1)
            )
            if value & 0x80 or last:
                break
            table = value & ~0xFFF & ((1 << (8 * esz)) - 1)
    return ram, dtb


@SETTINGS
@given(data=st.data(), mode=modes, nxe=st.booleans(), maxphyaddr=st.sampled_from([36, 46, 52]))
def test_hostile_tables_agree_and_stay_bounded(
    data: st.DataObject, mode: PagingMode, nxe: bool, maxphyaddr: int
) -> None:
    ram, dtb = data.draw(hostile_memory(mode), label="ram")
    src = BufferSource([(0, ram)])
    tr = Translator(src, dtb, mode, nxe=nxe, maxphyaddr=maxphyaddr, max_mapping_work=200_000)
    maps = check_consistency(tr, data)
    check_windows(tr, maps, data)
    # walk() never raises and agrees with translate().
    for m in maps[:10]:
        w = tr.walk(m.vaddr)
        assert w.translation is not None and w.translation.paddr == m.paddr
        assert len(w.steps) <= len(mode.spec.levels)
