"""mappings() and its array form runs(): coalesced runs, range clipping, hostile tables
stay bounded, and both forms charge the same work."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.support.pagetables import PS, RW, US, XD, P, PageTableBuilder
from vmishell.arch import Mapping, PagingMode, Translator
from vmishell.errors import GuestDataError

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
LONG = (PagingMode.LEVEL4, PagingMode.LEVEL5)


def base_va(mode: PagingMode) -> int:
    return 0xFFFF_8880_0000_0000 if mode in LONG else 0xC000_0000


def translator(b: PageTableBuilder, **kw: object) -> Translator:
    return Translator(b.source(), b.dtb, b.mode, **kw)  # type: ignore[arg-type]


def runs(tr: Translator, *args: int, **kw: int) -> list[tuple[int, int, int, bool, bool, bool]]:
    """The runs mappings() yields; runs() (numpy, batched) must give the very same."""
    got = [(m.vaddr, m.paddr, m.size, m.writable, m.user, m.nx) for m in tr.mappings(*args, **kw)]
    assert tr.runs(*args, **kw) == got
    return got


def least_work(enumerate_all: Callable[[int], object]) -> int:
    """The smallest max_work with which `enumerate_all(max_work)` completes."""
    lo, hi = 0, 1 << 20
    while lo < hi:
        mid = (lo + hi) // 2
        try:
            enumerate_all(mid)
        except GuestDataError:
            lo = mid + 1
        else:
            hi = mid
    return lo


@pytest.mark.parametrize("mode", list(PagingMode))
def test_contiguous_pages_coalesce_and_breaks_split(mode: PagingMode) -> None:
    b = PageTableBuilder(mode)
    va = base_va(mode)
    b.map_range(va, 0x40_0000, 0x5000)  # 5 contiguous pages
    b.map(va + 0x5000, 0x50_0000)  # physical gap
    b.map(va + 0x6000, 0x50_1000, writable=False)  # rights change
    b.map(va + 0x8000, 0x50_3000, writable=False)  # virtual gap (phys contiguous-looking)
    tr = translator(b)
    assert runs(tr) == [
        (va, 0x40_0000, 0x5000, True, True, False),
        (va + 0x5000, 0x50_0000, 0x1000, True, True, False),
        (va + 0x6000, 0x50_1000, 0x1000, False, True, False),
        (va + 0x8000, 0x50_3000, 0x1000, False, True, False),
    ]
    assert all(isinstance(m, Mapping) for m in tr.mappings())


def test_runs_coalesce_across_tables_and_page_sizes() -> None:
    b = PageTableBuilder(PagingMode.LEVEL4, ram_size=32 * MiB)
    va = 0x7F00_0000_0000
    # The last 2 pages of one PT, a 2 MiB page, then the first page of the next PT.
    b.map_range(va + 2 * MiB - 0x2000, 0x20_0000 - 0x2000, 0x2000)
    b.map(va + 2 * MiB, 0x20_0000, 2 * MiB)
    b.map(va + 4 * MiB, 0x40_0000)
    tr = translator(b)
    assert runs(tr) == [(va + 2 * MiB - 0x2000, 0x1F_E000, 2 * MiB + 0x3000, True, True, False)]


def test_nx_and_user_split_runs() -> None:
    b = PageTableBuilder(PagingMode.LEVEL4)
    va = 0x40_0000
    b.map(va, 0x10_0000)
    b.map(va + 0x1000, 0x10_1000, nx=True)
    b.map(va + 0x2000, 0x10_2000, nx=True, user=False)
    assert [(m.nx, m.user) for m in translator(b).mappings()] == [
        (False, True),
        (True, True),
        (True, False),
    ]


@pytest.mark.parametrize("mode", list(PagingMode))
def test_upper_level_rights_apply_to_runs(mode: PagingMode) -> None:
    b = PageTableBuilder(mode)
    va = base_va(mode)
    b.map_range(va, 0x40_0000, 0x3000)
    b.update_entry(va, "PD", clear_bits=RW | US, set_bits=XD if mode.spec.nx_capable else 0)
    (m,) = translator(b).mappings()
    assert (m.writable, m.user, m.nx) == (False, False, mode.spec.nx_capable)


def test_high_half_addresses_are_sign_extended() -> None:
    b = PageTableBuilder(PagingMode.LEVEL4)
    b.map(0x1000, 0x10_0000)
    b.map(0xFFFF_8000_0000_0000, 0x20_0000)
    b.map(0xFFFF_FFFF_FFFF_F000, 0x30_0000)
    got = [(m.vaddr, m.paddr) for m in translator(b).mappings()]
    assert got == [(0x1000, 0x10_0000), (0xFFFF_8000_0000_0000, 0x20_0000),
                   (0xFFFF_FFFF_FFFF_F000, 0x30_0000)]  # fmt: skip


def test_five_level_upper_half() -> None:
    b = PageTableBuilder(PagingMode.LEVEL5)
    b.map(0xFF00_0000_0000_0000, 0x10_0000)
    b.map(0x00FF_FFFF_FFFF_F000, 0x20_0000)
    got = [(m.vaddr, m.paddr) for m in translator(b).mappings()]
    assert got == [(0x00FF_FFFF_FFFF_F000, 0x20_0000), (0xFF00_0000_0000_0000, 0x10_0000)]


@pytest.mark.parametrize("mode", list(PagingMode))
def test_start_end_clip_runs(mode: PagingMode) -> None:
    b = PageTableBuilder(mode)
    va = base_va(mode)
    big = 4 * MiB if mode is PagingMode.LEGACY else 2 * MiB
    b.map(va, 0x80_0000, big)
    b.map_range(va + big, 0x80_0000 + big, 0x4000)
    tr = translator(b)
    assert runs(tr) == [(va, 0x80_0000, big + 0x4000, True, True, False)]
    assert runs(tr, va + 0x1234, va + big + 0x1800) == [
        (va + 0x1234, 0x80_1234, big + 0x1800 - 0x1234, True, True, False)
    ]
    assert runs(tr, va + big + 0x4000, va + 2 * big) == []
    assert runs(tr, va + 5, va + 5) == []


def test_large_pages_in_every_mode() -> None:
    for mode, size in [
        (PagingMode.LEGACY, 4 * MiB),
        (PagingMode.PAE, 2 * MiB),
        (PagingMode.LEVEL4, GiB),
        (PagingMode.LEVEL5, GiB),
    ]:
        b = PageTableBuilder(mode)
        va = base_va(mode)
        b.map(va, 2 * size, size)
        b.map(va + size, 3 * size, size, writable=False)
        assert runs(translator(b)) == [
            (va, 2 * size, size, True, True, False),
            (va + size, 3 * size, size, False, True, False),
        ]


def test_full_contiguous_tables_take_the_whole_table_path() -> None:
    """A PT / PD whose leaves are one run is recognised and still reported exactly."""
    b = PageTableBuilder(PagingMode.LEVEL4, ram_size=64 * MiB)
    va = 0xFFFF_8880_0000_0000
    b.map_range(va, 0x100_0000, 4 * MiB)  # two full PTs of 4 KiB pages
    b.map_range(va + GiB, 0, GiB, 2 * MiB)  # a full PD of 2 MiB pages
    b.update_entry(va + 0x5000, "PT", set_bits=1 << 5 | 1 << 6)  # A/D differ: still one run
    tr = translator(b)
    assert runs(tr) == [
        (va, 0x100_0000, 4 * MiB, True, True, False),
        (va + GiB, 0, GiB, True, True, False),
    ]
    # One NX page in the middle of a full table splits it in three.
    b.update_entry(va + 0x7000, "PT", set_bits=XD)
    tr.flush()
    assert [m.size for m in tr.mappings()] == [0x7000, 0x1000, 4 * MiB - 0x8000, GiB]


def test_pse36_frames_in_runs() -> None:
    b = PageTableBuilder(PagingMode.LEGACY)
    b.map(0x4000_0000, 0x1_0000_0000, 4 * MiB)
    b.map(0x4040_0000, 0x1_0040_0000, 4 * MiB)
    assert runs(translator(b)) == [(0x4000_0000, 0x1_0000_0000, 8 * MiB, True, True, False)]


def test_skips_reserved_ps_and_tables_outside_ram() -> None:
    b = PageTableBuilder(PagingMode.LEVEL4)
    b.map(0x1000, 0x10_0000)
    b.map(0x80_0000_0000, 0x20_0000)  # PML4 slot 1
    b.map(0x100_0000_0000, 0x30_0000)  # PML4 slot 2
    b.update_entry(0x80_0000_0000, "PML4", set_bits=PS)  # reserved: the CPU faults
    b.set_entry(0x100_0000_0000, "PDPT", 0xF000_0000 | P | RW | US)  # PD beyond RAM
    assert runs(translator(b)) == [(0x1000, 0x10_0000, 0x1000, True, True, False)]


def test_absent_upper_entries_are_skipped_in_one_step() -> None:
    """Two pages 128 TiB apart: the scan must not visit what lies between."""
    b = PageTableBuilder(PagingMode.LEVEL4)
    b.map(0, 0x10_0000)
    b.map(0xFFFF_FFFF_FFFF_F000, 0x20_0000)
    tr = translator(b)
    # Two paths of four tables and 257 leaf pages: a scan that skipped nothing
    # would need work beyond counting (and would hang, not pass).
    assert len(list(tr.mappings(max_work=300))) == 2


# -- hostile tables -----------------------------------------------------------------------------


def fill_table(b: PageTableBuilder, table: int, value: int) -> None:
    esz = b.spec.entry_size
    for i in range(0x1000 // esz):
        b.write_entry(table + i * esz, value)


@pytest.mark.parametrize("mode", list(PagingMode))
def test_every_entry_pointing_at_one_table_is_bounded(mode: PagingMode) -> None:
    """One table, every entry pointing at itself: 2**36 pages described by 4 KiB."""
    b = PageTableBuilder(mode)
    top = b.dtb & ~0xFFF
    fill_table(b, top, top | P | RW | US)
    tr = translator(b)
    with pytest.raises(GuestDataError, match="max_work"):
        for _ in tr.mappings(max_work=20_000):
            pass
    with pytest.raises(GuestDataError, match="max_work"):
        tr.run_arrays(max_work=20_000)
    # The translator-wide default can be lowered too.
    tr2 = translator(b, max_mapping_work=5_000)
    with pytest.raises(GuestDataError):
        list(tr2.mappings())
    with pytest.raises(GuestDataError):
        tr2.runs()


def test_heavily_shared_tables_are_bounded() -> None:
    """Every upper entry points at the same next table (KASAN-style sharing, gone wild)."""
    b = PageTableBuilder(PagingMode.LEVEL4)
    pdpt, pd, pt = b.new_table(), b.new_table(), b.new_table()
    fill_table(b, b.dtb, pdpt | P | RW | US)
    fill_table(b, pdpt, pd | P | RW | US)
    fill_table(b, pd, pt | P | RW | US)
    fill_table(b, pt, 0x50_0000 | P | RW | US)  # every page maps the same frame
    tr = translator(b)
    seen = 0
    with pytest.raises(GuestDataError):
        for m in tr.mappings(max_work=100_000):
            seen += 1
            assert m.size == 0x1000  # never coalesced: same frame each time
    assert seen <= 100_000
    with pytest.raises(GuestDataError):
        tr.run_arrays(max_work=100_000)
    # A bounded window is fine.
    assert len(list(tr.mappings(0, 0x10_0000))) == 256
    assert len(runs(tr, 0, 0x10_0000)) == 256


@pytest.mark.parametrize("mode", list(PagingMode))
def test_runs_charge_exactly_the_work_of_mappings(mode: PagingMode) -> None:
    """The batched form is exactly as strict: the same least budget completes both."""
    b = PageTableBuilder(mode, ram_size=64 * MiB)
    va = base_va(mode)
    large = 4 * MiB if mode is PagingMode.LEGACY else 2 * MiB
    b.map_range(va, 8 * MiB, 4 * large, large)  # large pages
    b.map_range(va + 8 * large, 24 * MiB, 2 * large)  # whole page tables that are one run
    for i in range(300):  # scattered pages over a few tables, some holes
        if i % 7:
            b.map(va + 16 * large + i * 0x3000, 40 * MiB + ((i * 37) % 500) * 0x1000)
    tr = translator(b)
    need = least_work(lambda w: list(tr.mappings(max_work=w)))
    assert least_work(lambda w: tr.run_arrays(max_work=w)) == need
    clipped = least_work(lambda w: list(tr.mappings(va + 0x5000, va + 17 * large, max_work=w)))
    assert least_work(lambda w: tr.runs(va + 0x5000, va + 17 * large, max_work=w)) == clipped
    assert runs(tr) and runs(tr, va + 0x5000, va + 17 * large)


def test_shared_tables_within_budget_enumerate_fully() -> None:
    b = PageTableBuilder(PagingMode.LEVEL4)
    va = 0x7F00_0000_0000
    b.map_range(va, 0x40_0000, 0x3000)
    pt = b.entry_address(va, "PT") & ~0xFFF
    # Three PD entries share that PT: the same three pages appear thrice.
    for k in (1, 2):
        b.set_entry(va + k * 2 * MiB, "PD", pt | P | RW | US)
    got = runs(translator(b))
    assert [(v - va, p) for v, p, *_ in got] == [
        (0, 0x40_0000),
        (2 * MiB, 0x40_0000),
        (4 * MiB, 0x40_0000),
    ]


def test_generation_change_is_seen_by_mappings() -> None:
    b = PageTableBuilder(PagingMode.LEVEL4)
    b.map(0x1000, 0x10_0000)
    src = b.source(live=True, writable=True, zero_copy=False)
    tr = Translator(src, b.dtb, PagingMode.LEVEL4)
    assert len(list(tr.mappings())) == 1
    b.map(0x3000, 0x30_0000)
    assert len(list(tr.mappings())) == 1  # copying source: tables cached
    assert len(tr.runs()) == 1
    src.refresh()
    assert len(list(tr.mappings())) == 2
    b.map(0x5000, 0x50_0000)
    src.refresh()
    assert len(tr.runs()) == 3  # runs() looks again after a refresh too


def test_copying_source_gives_the_same_runs() -> None:
    b = PageTableBuilder(PagingMode.PAE, pdpt_offset=0x20)
    b.map_range(0xC000_0000, 0x40_0000, 0x8000)
    b.map(0x8000_0000, 0x20_0000, 2 * MiB, nx=True)
    direct = runs(translator(b))
    copied = runs(Translator(b.source(zero_copy=False), b.dtb, PagingMode.PAE))
    assert direct == copied and len(direct) == 2


def test_mapping_value_helpers() -> None:
    m = Mapping(0x1000, 0x5000, 0x2000, True, False, True)
    assert m.end == 0x3000
    assert 0x2FFF in m and 0x3000 not in m and "x" not in m
    assert "0x1000-0x3000" in repr(m)
