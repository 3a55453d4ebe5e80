"""translate() and walk() on page tables built in bytes, for every paging mode."""

from __future__ import annotations

import pytest

from tests.support.pagetables import PS, RW, US, XD, P, PageTableBuilder
from vmishell.arch import EntryFlags, PagingMode, Translation, Translator, Walk
from vmishell.errors import PageFault, TranslationError

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
LONG = (PagingMode.LEVEL4, PagingMode.LEVEL5)

#: Page sizes each mode can map.
SIZES = {
    PagingMode.LEGACY: (4 * KiB, 4 * MiB),
    PagingMode.PAE: (4 * KiB, 2 * MiB),
    PagingMode.LEVEL4: (4 * KiB, 2 * MiB, 1 * GiB),
    PagingMode.LEVEL5: (4 * KiB, 2 * MiB, 1 * GiB),
}
MODE_SIZES = [(m, s) for m, sizes in SIZES.items() for s in sizes]


def base_va(mode: PagingMode) -> int:
    """A walkable address in each mode's kernel half (canonical in 48 and 57 bits)."""
    return 0xFFFF_8880_0000_0000 if mode in LONG else 0xC000_0000


def leaf_level(mode: PagingMode, size: int) -> str:
    return next(lvl.name for lvl in mode.spec.levels if 1 << lvl.shift == size)


def translator(b: PageTableBuilder, **kw: object) -> Translator:
    return Translator(b.source(), b.dtb, b.mode, **kw)  # type: ignore[arg-type]


# -- every mode, every page size ------------------------------------------------------------


@pytest.mark.parametrize(("mode", "size"), MODE_SIZES)
def test_every_page_size_translates(mode: PagingMode, size: int) -> None:
    b = PageTableBuilder(mode)
    va, pa = base_va(mode), 8 * size  # frames need not be RAM to translate
    b.map(va, pa, size)
    tr = translator(b)
    for off in (0, 1, size // 2 + 5, size - 1):
        t = tr.translate(va + off)
        assert t.vaddr == va + off
        assert t.paddr == pa + off
        assert t.page_size == size
        assert t.level == leaf_level(mode, size)
        assert t.page.vaddr == va and t.page.paddr == pa
    with pytest.raises(PageFault):
        tr.translate(va + size)


@pytest.mark.parametrize("mode", list(PagingMode))
def test_leaf_flags(mode: PagingMode) -> None:
    b = PageTableBuilder(mode)
    va = base_va(mode)
    b.map(va, 0x10_0000, writable=False, user=False, nx=True, global_=True)
    b.map(va + 0x1000, 0x20_0000, writable=True, user=True, dirty=True, accessed=True)
    tr = translator(b)
    ro = tr.translate(va)
    assert (ro.writable, ro.user, ro.global_, ro.dirty, ro.accessed) == (
        False,
        False,
        True,
        False,
        False,
    )
    assert ro.nx is mode.spec.nx_capable  # legacy entries have no XD bit
    rw = tr.translate(va + 0x1000)
    assert (rw.writable, rw.user, rw.nx, rw.global_, rw.dirty, rw.accessed) == (
        True,
        True,
        False,
        False,
        True,
        True,
    )


@pytest.mark.parametrize(("mode", "size"), [(m, s) for m, s in MODE_SIZES if s > 4 * KiB])
def test_large_page_flags(mode: PagingMode, size: int) -> None:
    b = PageTableBuilder(mode)
    va = base_va(mode)
    b.map(va, size, size, writable=False, nx=True, dirty=True, global_=True)
    t = translator(b).translate(va + 3)
    assert not t.writable and t.user and t.dirty and t.global_
    assert t.nx is mode.spec.nx_capable


# -- rights accumulate like the CPU's ----------------------------------------------------------


def upper_levels(mode: PagingMode) -> list[str]:
    """Non-leaf levels whose entries carry rights (not the PAE PDPT)."""
    return [lvl.name for lvl in mode.spec.levels[:-1] if lvl.permissions]


@pytest.mark.parametrize(
    ("mode", "level"), [(m, name) for m in PagingMode for name in upper_levels(m)]
)
def test_rights_accumulate_across_levels(mode: PagingMode, level: str) -> None:
    b = PageTableBuilder(mode)
    va = base_va(mode)
    b.map(va, 0x30_0000)
    tr = translator(b, tlb_size=1)
    t = tr.translate(va)
    assert t.writable and t.user and not t.nx

    b.update_entry(va, level, clear_bits=RW)
    tr.flush()
    assert not tr.translate(va).writable
    assert tr.translate(va).user

    b.update_entry(va, level, set_bits=RW, clear_bits=US)
    tr.flush()
    assert not tr.translate(va).user
    assert tr.translate(va).writable

    b.update_entry(va, level, set_bits=US)
    if mode.spec.nx_capable:
        b.update_entry(va, level, set_bits=XD)
        tr.flush()
        t = tr.translate(va)
        assert t.nx and t.writable and t.user
        # The leaf is not XD; one XD level is enough.
        assert not b.get_entry(va, "PT") & XD


def test_pae_pdpte_carries_no_rights() -> None:
    b = PageTableBuilder(PagingMode.PAE)
    va = base_va(PagingMode.PAE)
    b.map(va, 0x30_0000)
    assert b.get_entry(va, "PDPT") & (RW | US) == 0  # the builder leaves them clear
    t = translator(b).translate(va)
    assert t.writable and t.user  # PDPTE bits 1-2 do not restrict


def test_nx_ignored_without_nxe() -> None:
    b = PageTableBuilder(PagingMode.LEVEL4)
    va = base_va(PagingMode.LEVEL4)
    b.map(va, 0x30_0000, nx=True)
    assert translator(b).translate(va).nx
    assert not translator(b, nxe=False).translate(va).nx


# -- legacy specifics -----------------------------------------------------------------------


def test_legacy_4mib_pages_need_pse() -> None:
    b = PageTableBuilder(PagingMode.LEGACY)
    va = base_va(PagingMode.LEGACY)
    b.map(va, 0x40_0000, 4 * MiB)
    assert translator(b).translate(va + 5).paddr == 0x40_0005
    # Without CR4.PSE the PS bit is ignored: the PDE points at a "page table"
    # at 0x400000, which is zeroed RAM, so the walk faults one level down.
    with pytest.raises(PageFault) as err:
        translator(b, pse=False).translate(va + 5)
    assert err.value.level == "PT"
    assert err.value.entry_address == 0x40_0000


def test_pse36_high_physical_bits() -> None:
    b = PageTableBuilder(PagingMode.LEGACY)
    va = base_va(PagingMode.LEGACY)
    pa = 0x5A_8040_0000  # bits 39:32 = 0x5a
    b.map(va, pa, 4 * MiB)
    assert translator(b).translate(va + 7).paddr == pa + 7
    assert translator(b, maxphyaddr=36).translate(va).paddr == 0xA_8040_0000
    assert translator(b, maxphyaddr=32).translate(va).paddr == 0x8040_0000


# -- MAXPHYADDR and ignored bits -----------------------------------------------------------


def test_high_entry_bits_are_not_address_bits() -> None:
    b = PageTableBuilder(PagingMode.LEVEL4)
    va = base_va(PagingMode.LEVEL4)
    pk_and_ignored = (0xF << 59) | (0x7F << 52)
    b.map(va, 0x3F00_0000_0000, extra=pk_and_ignored)  # frame bit 45 set
    assert translator(b).translate(va).paddr == 0x3F00_0000_0000
    assert translator(b, maxphyaddr=40).translate(va).paddr == 0
    assert translator(b, maxphyaddr=46).translate(va).paddr == 0x3F00_0000_0000


@pytest.mark.parametrize("mode", [PagingMode.PAE, *LONG])
def test_pat_bit_of_a_large_page_is_not_an_address_bit(mode: PagingMode) -> None:
    b = PageTableBuilder(mode)
    va = base_va(mode)
    b.map(va, 0x60_0000, 2 * MiB, extra=1 << 12)
    assert translator(b).translate(va + 0x1234).paddr == 0x60_1234


# -- CR3 decoding -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", LONG)
def test_pcid_and_noflush_bits_are_masked(mode: PagingMode) -> None:
    b = PageTableBuilder(mode)
    va = base_va(mode)
    b.map(va, 0x30_0000)
    tr = Translator(b.source(), b.dtb | 0xFFF | (1 << 63), mode)
    assert tr.dtb == b.dtb
    assert tr.translate(va).paddr == 0x30_0000


def test_pae_pdpt_is_32_byte_aligned() -> None:
    b = PageTableBuilder(PagingMode.PAE, pdpt_offset=0x60)
    va = base_va(PagingMode.PAE)
    b.map(va, 0x30_0000)
    assert b.dtb % 0x1000 == 0x60
    tr = Translator(b.source(), b.dtb | 0x18, PagingMode.PAE)  # PWT|PCD in CR3
    assert tr.dtb == b.dtb
    assert tr.translate(va + 1).paddr == 0x30_0001


# -- faults -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "level"), [(m, lvl.name) for m in PagingMode for lvl in m.spec.levels]
)
def test_not_present_at_each_level(mode: PagingMode, level: str) -> None:
    b = PageTableBuilder(mode)
    va = base_va(mode)
    b.map(va, 0x30_0000)
    b.map(va + 0x1000, 0x31_0000)  # a neighbour keeps the tables alive
    addr = b.entry_address(va, level)
    b.update_entry(va, level, clear_bits=P)
    raw = b.read_entry(addr)
    with pytest.raises(PageFault) as err:
        translator(b).translate(va + 0x10)
    fault = err.value
    assert fault.vaddr == va + 0x10
    assert fault.level == level
    assert fault.entry == raw
    assert fault.entry_address == addr
    assert fault.reason == "not present"
    assert level in str(fault) and f"{addr:#x}" in str(fault)


@pytest.mark.parametrize(
    ("mode", "vaddr"),
    [
        (PagingMode.LEVEL4, 0x0000_8000_0000_0000),
        (PagingMode.LEVEL4, 0xFFFF_7FFF_FFFF_FFFF),
        (PagingMode.LEVEL4, 0x0100_0000_0000_0000),
        (PagingMode.LEVEL4, 1 << 64),
        (PagingMode.LEVEL4, -1),
        (PagingMode.LEVEL5, 0x0100_0000_0000_0000),
        (PagingMode.LEVEL5, 0xFEFF_FFFF_FFFF_FFFF),
        (PagingMode.LEGACY, 1 << 32),
        (PagingMode.PAE, 1 << 32),
        (PagingMode.PAE, -4096),
    ],
)
def test_unwalkable_addresses_fault_before_any_read(mode: PagingMode, vaddr: int) -> None:
    b = PageTableBuilder(mode)
    tr = translator(b)
    with pytest.raises(PageFault) as err:
        tr.translate(vaddr)
    assert err.value.level == mode.spec.levels[0].name
    assert err.value.entry is None and err.value.entry_address is None
    walk = tr.walk(vaddr)
    assert walk.steps == () and walk.fault is not None


def test_la57_reaches_beyond_48_bits() -> None:
    b = PageTableBuilder(PagingMode.LEVEL5)
    va = 0x00FF_8000_0000_0000  # non-canonical with 4 levels, fine with 5
    b.map(va, 0x30_0000)
    assert translator(b).translate(va + 1).paddr == 0x30_0001
    hi = 0xFF00_0000_0000_0000  # lowest upper-half address with 57 bits
    b.map(hi, 0x31_0000)
    assert translator(b).translate(hi).paddr == 0x31_0000


@pytest.mark.parametrize(
    ("mode", "level"),
    [(m, lvl.name) for m in PagingMode for lvl in m.spec.levels[1:]],
)
def test_table_outside_guest_ram(mode: PagingMode, level: str) -> None:
    """An entry pointing past RAM faults at the level of the missing table."""
    b = PageTableBuilder(mode)
    va = base_va(mode)
    b.map(va, 0x30_0000)
    names = [lvl.name for lvl in mode.spec.levels]
    parent = names[names.index(level) - 1]
    child_entry = b.entry_address(va, level)
    beyond = 0xF000_0000  # RAM is 16 MiB
    old = b.get_entry(va, parent)
    b.set_entry(va, parent, (old & 0xFFF) | beyond)
    tr = translator(b)
    with pytest.raises(PageFault) as err:
        tr.translate(va)
    fault = err.value
    assert fault.level == level
    assert "outside guest RAM" in fault.reason
    assert fault.entry is None
    assert fault.entry_address == beyond + (child_entry & 0xFFF)
    # walk() records it without raising, and shows the parent entry that led there.
    walk = tr.walk(va)
    assert walk.fault is not None and walk.steps[-1].level == parent
    assert walk.steps[-1].target == beyond


def test_top_table_outside_guest_ram() -> None:
    b = PageTableBuilder(PagingMode.LEVEL4)
    tr = Translator(b.source(), 0x40_0000_0000, PagingMode.LEVEL4)
    with pytest.raises(PageFault, match="outside guest RAM") as err:
        tr.translate(0x1000)
    assert err.value.level == "PML4"


def test_table_straddling_the_end_of_ram_faults() -> None:
    b = PageTableBuilder(PagingMode.LEVEL4, ram_size=0x10_0800)
    va = base_va(PagingMode.LEVEL4)
    b.map(va, 0x30_0000)
    b.set_entry(va, "PD", 0x10_0000 | P | RW)  # half of the PT would be beyond RAM
    with pytest.raises(PageFault, match="outside guest RAM"):
        translator(b).translate(va)


@pytest.mark.parametrize(
    ("mode", "level"),
    [
        (PagingMode.LEVEL4, "PML4"),
        (PagingMode.LEVEL5, "PML5"),
        (PagingMode.LEVEL5, "PML4"),
        (PagingMode.PAE, "PDPT"),
    ],
)
def test_ps_where_no_large_page_exists_is_a_reserved_bit_fault(
    mode: PagingMode, level: str
) -> None:
    b = PageTableBuilder(mode)
    va = base_va(mode)
    b.map(va, 0x30_0000)
    b.update_entry(va, level, set_bits=PS)
    with pytest.raises(PageFault, match="reserved") as err:
        translator(b).translate(va)
    assert err.value.level == level


def test_non_integer_address_is_rejected() -> None:
    b = PageTableBuilder(PagingMode.LEVEL4)
    with pytest.raises(TypeError):
        translator(b).translate(1.5)  # type: ignore[arg-type]


# -- hostile tables stay bounded --------------------------------------------------------------


@pytest.mark.parametrize("mode", list(PagingMode))
def test_self_referencing_table_walk_is_bounded(mode: PagingMode) -> None:
    """Every entry of the top table points at the top table itself."""
    b = PageTableBuilder(mode)
    top = b.dtb & ~0xFFF
    count = mode.spec.levels[0].entries
    for i in range(count):
        b.write_entry(b.dtb + i * mode.spec.entry_size, top | P | RW | US)
    tr = translator(b)
    if mode is PagingMode.PAE:
        # PAE PDPTEs point at the PDPT page as a PD whose entries are the PDPTEs again.
        t = tr.translate(0)
        assert t.paddr == top
    else:
        t = tr.translate(0x1234)
        assert t.paddr == top + 0x234  # the top table, seen as a page
        assert len(tr.walk(0x1234).steps) == len(mode.spec.levels)


# -- walk() for teaching ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(PagingMode))
def test_walk_reports_every_level(mode: PagingMode) -> None:
    b = PageTableBuilder(mode)
    va = base_va(mode) + 0x5000
    b.map(va, 0x30_0000, writable=False, nx=True, accessed=True)
    tr = translator(b)
    w = tr.walk(va + 0x42)
    assert isinstance(w, Walk) and w.ok and w.fault is None
    assert isinstance(w.translation, Translation)
    assert w.translation.paddr == 0x30_0042
    assert [s.level for s in w.steps] == [lvl.name for lvl in mode.spec.levels]
    table = tr.dtb
    for step, lvl in zip(w.steps, mode.spec.levels, strict=True):
        assert step.table == table
        assert step.index == ((va + 0x42) >> lvl.shift) & lvl.index_mask
        assert step.entry_address == table + step.index * mode.spec.entry_size
        assert step.entry == b.read_entry(step.entry_address)
        assert step.present and EntryFlags.PRESENT in step.flags
        table = step.target
    last = w.steps[-1]
    assert last.leaf and last.page_size == 4096 and last.target == 0x30_0000
    assert not any(s.leaf for s in w.steps[:-1])
    assert EntryFlags.WRITABLE not in last.flags
    assert EntryFlags.ACCESSED in last.flags
    assert (EntryFlags.NX in last.flags) is mode.spec.nx_capable
    text = str(w)
    for lvl in mode.spec.levels:
        assert lvl.name in text


def test_walk_of_a_large_page_and_pat_naming() -> None:
    b = PageTableBuilder(PagingMode.LEVEL4)
    va = base_va(PagingMode.LEVEL4)
    b.map(va, 0x40_0000, 2 * MiB, extra=1 << 12)  # PAT of a large page
    b.map(va + 2 * MiB, 0x30_0000, extra=1 << 7)  # PAT of a 4 KiB page (bit 7)
    tr = translator(b)
    big = tr.walk(va).steps[-1]
    assert big.level == "PD" and big.leaf and big.page_size == 2 * MiB
    assert EntryFlags.PAGE_SIZE in big.flags and EntryFlags.PAT in big.flags
    small = tr.walk(va + 2 * MiB).steps[-1]
    assert EntryFlags.PAT in small.flags and EntryFlags.PAGE_SIZE not in small.flags


def test_walk_records_a_fault_without_raising() -> None:
    b = PageTableBuilder(PagingMode.LEVEL4)
    va = base_va(PagingMode.LEVEL4)
    b.map(va, 0x30_0000)
    w = translator(b).walk(va + 0x1000)
    assert not w.ok and w.translation is None
    assert isinstance(w.fault, PageFault) and w.fault.level == "PT"
    assert len(w.steps) == 4 and not w.steps[-1].present
    assert "not present" in str(w)


def test_translation_values() -> None:
    b = PageTableBuilder(PagingMode.LEVEL4)
    va = base_va(PagingMode.LEVEL4)
    b.map(va, 0x30_0000)
    tr = translator(b)
    a, c = tr.translate(va + 8), tr.translate(va + 8)
    assert a == c and hash(a) == hash(c)
    assert a == Translation(va + 8, 0x30_0008, a.page)
    assert "0x300008" in repr(a)
    with pytest.raises(AttributeError):
        a.paddr = 0  # type: ignore[misc]


# -- caches follow the source's generation --------------------------------------------------


@pytest.mark.parametrize("zero_copy", [True, False])
def test_cache_holds_until_refresh(zero_copy: bool) -> None:
    b = PageTableBuilder(PagingMode.LEVEL4)
    va = base_va(PagingMode.LEVEL4)
    b.map(va, 0x30_0000)
    src = b.source(live=True, writable=True, zero_copy=zero_copy)
    tr = Translator(src, b.dtb, PagingMode.LEVEL4)
    assert tr.translate(va).paddr == 0x30_0000
    entry = b.entry_address(va, "PT")
    src.write(entry, (0x77_7000 | P | RW).to_bytes(8, "little"))
    assert tr.translate(va).paddr == 0x30_0000  # cached until the caller asks afresh
    src.refresh()
    assert tr.translate(va).paddr == 0x77_7000
    # An upper-level change too (tables are cached for copying sources).
    src.write(b.entry_address(va, "PD"), bytes(8))
    assert tr.translate(va).paddr == 0x77_7000
    src.refresh()
    with pytest.raises(PageFault):
        tr.translate(va)


def test_a_large_page_is_walked_once_for_all_its_small_pages_until_refresh() -> None:
    b = PageTableBuilder(PagingMode.LEVEL4, ram_size=16 * MiB)
    va = base_va(PagingMode.LEVEL4)
    b.map(va, 0x20_0000, 2 * MiB)
    src = b.source(live=True, writable=True)
    tr = Translator(src, b.dtb, PagingMode.LEVEL4)
    walks = []
    walk = tr._walk
    tr._walk = lambda vaddr, steps: walks.append(vaddr) or walk(vaddr, steps)  # type: ignore[method-assign]
    for off in range(0, 2 * MiB, 0x1000):
        assert tr.translate(va + off + 5).paddr == 0x20_0005 + off
    assert walks == [va + 5]  # one walk, 512 small pages answered from it
    src.write(b.entry_address(va, "PD"), (0x60_0000 | P | PS).to_bytes(8, "little"))
    src.refresh()
    assert tr.translate(va + 0x3000).paddr == 0x60_3000  # the new mapping, seen afresh
    assert len(walks) == 2


def test_non_live_source_keeps_caches_until_flush() -> None:
    b = PageTableBuilder(PagingMode.LEVEL4)
    va = base_va(PagingMode.LEVEL4)
    b.map(va, 0x30_0000)
    src = b.source(zero_copy=False)
    tr = Translator(src, b.dtb, PagingMode.LEVEL4)
    assert tr.translate(va).paddr == 0x30_0000
    b.set_entry(va, "PT", 0x44_4000 | P)
    src.refresh()  # not live: generation does not move
    assert tr.translate(va).paddr == 0x30_0000
    tr.flush()
    assert tr.translate(va).paddr == 0x44_4000


def test_tlb_and_table_cache_are_bounded() -> None:
    b = PageTableBuilder(PagingMode.LEVEL4, ram_size=64 * MiB)
    va = base_va(PagingMode.LEVEL4)
    for i in range(64):
        b.map(va + i * 2 * MiB, 0x100_0000 + i * 0x1000)  # one PT per page
    tr = Translator(
        b.source(zero_copy=False), b.dtb, PagingMode.LEVEL4, tlb_size=8, max_cached_tables=5
    )
    for _ in range(2):
        for i in range(64):
            assert tr.translate(va + i * 2 * MiB + 1).paddr == 0x100_0001 + i * 0x1000
            assert len(tr._tlb) <= 8
            assert len(tr.reader._cache) <= 5


def test_maxphyaddr_validation_and_repr() -> None:
    b = PageTableBuilder(PagingMode.PAE)
    tr = translator(b)
    assert "PAE" in repr(tr)
    with pytest.raises(TranslationError):
        translator(b, maxphyaddr=31)


def test_walk_flag_decoding_per_level() -> None:
    """PWT/PCD/A/D/G/PAT/NX are named where they mean something, per level and mode."""
    pwt, pcd, acc, dirty, glob = 1 << 3, 1 << 4, 1 << 5, 1 << 6, 1 << 8
    b = PageTableBuilder(PagingMode.PAE)
    va = base_va(PagingMode.PAE)
    b.map(va, 0x30_0000, extra=pwt | pcd | dirty | glob | XD)
    b.update_entry(va, "PDPT", set_bits=pwt | acc | RW | US)  # A, R/W, U/S mean nothing here
    b.update_entry(va, "PD", set_bits=pcd | dirty | glob)  # D and G are ignored in a table pointer
    pdpt, pd, pt = translator(b).walk(va).steps
    assert pdpt.flags == EntryFlags.PRESENT | EntryFlags.WRITE_THROUGH
    assert pd.flags == (
        EntryFlags.PRESENT | EntryFlags.WRITABLE | EntryFlags.USER | EntryFlags.CACHE_DISABLE
    )
    assert pt.flags == (
        EntryFlags.PRESENT
        | EntryFlags.WRITABLE
        | EntryFlags.USER
        | EntryFlags.WRITE_THROUGH
        | EntryFlags.CACHE_DISABLE
        | EntryFlags.DIRTY
        | EntryFlags.GLOBAL
        | EntryFlags.NX
    )
    assert "WRITE_THROUGH" in str(pt) and "NX" in str(pt)
    # Without NXE the XD bit is not reported (nor honoured).
    assert EntryFlags.NX not in translator(b, nxe=False).walk(va).steps[-1].flags


def test_legacy_walk_has_no_nx_and_reports_4mib_pages() -> None:
    b = PageTableBuilder(PagingMode.LEGACY)
    va = base_va(PagingMode.LEGACY)
    b.map(va, 0x80_0000, 4 * MiB, global_=True)
    (pd,) = translator(b).walk(va).steps
    assert pd.leaf and pd.page_size == 4 * MiB and pd.target == 0x80_0000
    assert pd.flags & EntryFlags.PAGE_SIZE and pd.flags & EntryFlags.GLOBAL
    assert not pd.flags & EntryFlags.NX
