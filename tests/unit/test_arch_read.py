"""AddressSpace.read: page boundaries, holes, frames outside RAM, large reads."""

from __future__ import annotations

import pytest

from tests.support.pagetables import P, PageTableBuilder
from vmishell.arch import AddressSpace, PagingMode, Translator
from vmishell.errors import PageFault, PhysicalReadError, TranslationError

MiB = 1 << 20
LONG = (PagingMode.LEVEL4, PagingMode.LEVEL5)


def base_va(mode: PagingMode) -> int:
    return 0xFFFF_8880_0000_0000 if mode in LONG else 0xC000_0000


def fill(b: PageTableBuilder, paddr: int, size: int, seed: int) -> bytes:
    """Put a recognisable pattern in RAM and return it."""
    data = bytes((seed + i * 7 + (i >> 12)) & 0xFF for i in range(size))
    b.ram[paddr : paddr + size] = data
    return data


def space(b: PageTableBuilder, **kw: object) -> AddressSpace:
    zero_copy = bool(kw.pop("zero_copy", True))
    src = b.source(zero_copy=zero_copy)
    return AddressSpace(Translator(src, b.dtb, b.mode, **kw))  # type: ignore[arg-type]


@pytest.fixture(params=list(PagingMode), ids=lambda m: m.name)
def mode(request: pytest.FixtureRequest) -> PagingMode:
    return request.param


@pytest.fixture(params=[True, False], ids=["mmap", "copying"])
def zero_copy(request: pytest.FixtureRequest) -> bool:
    return request.param


def test_read_within_and_across_pages(mode: PagingMode, zero_copy: bool) -> None:
    b = PageTableBuilder(mode)
    va = base_va(mode)
    a = fill(b, 0x40_0000, 0x2000, 1)  # two contiguous frames
    c = fill(b, 0x60_0000, 0x1000, 2)  # a distant frame
    b.map_range(va, 0x40_0000, 0x2000)
    b.map(va + 0x2000, 0x60_0000)
    asp = space(b, zero_copy=zero_copy)
    assert asp.read(va + 0x10, 0x20) == a[0x10:0x30]
    assert asp.read(va + 0xFF0, 0x20) == a[0xFF0:0x1010]  # contiguous boundary
    assert asp.read(va + 0x1FF0, 0x20) == a[0x1FF0:] + c[:0x10]  # discontiguous boundary
    assert asp.read(va, 0x3000) == a + c
    assert asp.read(va + 5, 0) == b""


def test_holes_fault_or_pad(mode: PagingMode, zero_copy: bool) -> None:
    b = PageTableBuilder(mode)
    va = base_va(mode)
    a = fill(b, 0x40_0000, 0x1000, 3)
    c = fill(b, 0x50_0000, 0x1000, 4)
    b.map(va, 0x40_0000)
    b.map(va + 0x2000, 0x50_0000)  # va+0x1000 is a hole
    asp = space(b, zero_copy=zero_copy)
    with pytest.raises(PageFault) as err:
        asp.read(va + 0x800, 0x2000)
    assert err.value.vaddr == va + 0x1000
    assert err.value.level == "PT" and err.value.reason == "not present"
    assert err.value.entry == 0 and err.value.entry_address is not None
    got = asp.read(va + 0x800, 0x2000, pad=True)
    assert got == a[0x800:] + bytes(0x1000) + c[:0x800]
    # A read starting in a hole.
    assert asp.read(va + 0x1F00, 0x200, pad=True) == bytes(0x100) + c[:0x100]
    with pytest.raises(PageFault):
        asp.read(va + 0x1F00, 0x200)


def test_pad_skips_absent_upper_levels_quickly() -> None:
    b = PageTableBuilder(PagingMode.LEVEL4)
    a = fill(b, 0x40_0000, 0x1000, 5)
    b.map(0x80_0000_0000 - 0x1000, 0x40_0000)  # last page of PML4 slot 0
    asp = space(b)
    # 64 MiB of hole after it: PML4 slot 1 is absent, skipped in one step.
    got = asp.read(0x80_0000_0000 - 0x1000, 0x1000 + 64 * MiB, pad=True)
    assert got[:0x1000] == a and got[0x1000:] == bytes(64 * MiB)


def test_non_canonical_gap_pads(mode: PagingMode) -> None:
    b = PageTableBuilder(PagingMode.LEVEL4)
    a = fill(b, 0x40_0000, 0x1000, 6)
    b.map(0x7FFF_FFFF_F000, 0x40_0000)
    asp = space(b)
    assert asp.read(0x7FFF_FFFF_F000, 0x2000, pad=True) == a + bytes(0x1000)
    with pytest.raises(PageFault, match="non-canonical"):
        asp.read(0x7FFF_FFFF_F000, 0x2000)
    # Past the top of a 32-bit space.
    b32 = PageTableBuilder(PagingMode.PAE)
    b32.map(0xFFFF_F000, 0x40_0000)
    asp32 = space(b32)
    assert asp32.read(0xFFFF_F000, 0x2000, pad=True)[0x1000:] == bytes(0x1000)


def test_frame_outside_ram(mode: PagingMode, zero_copy: bool) -> None:
    b = PageTableBuilder(mode)
    va = base_va(mode)
    a = fill(b, 0x40_0000, 0x1000, 7)
    b.map(va, 0x40_0000)
    b.map(va + 0x1000, 0xE000_0000)  # a frame past the 16 MiB of RAM (think MMIO)
    entry = b.entry_address(va + 0x1000, "PT")
    asp = space(b, zero_copy=zero_copy)
    assert asp.translator.translate(va + 0x1000).paddr == 0xE000_0000  # translating is fine
    with pytest.raises(PageFault, match="outside guest RAM") as err:
        asp.read(va + 0xF00, 0x200)
    assert err.value.vaddr == va + 0x1000
    assert err.value.level == "PT" and err.value.entry_address == entry
    assert isinstance(err.value.__cause__, PhysicalReadError)
    assert isinstance(err.value, TranslationError)
    assert asp.read(va + 0xF00, 0x200, pad=True) == a[0xF00:] + bytes(0x100)
    assert not asp.is_readable(va + 0xF00, 0x200)
    assert asp.is_readable(va, 0x1000)


def test_large_page_partly_outside_ram() -> None:
    b = PageTableBuilder(PagingMode.LEVEL4, ram_size=0x50_0000)  # RAM ends 1 MiB into the page
    va = base_va(PagingMode.LEVEL4)
    b.map(va, 0x40_0000, 2 * MiB)
    asp = space(b)
    assert len(asp.read(va, MiB)) == MiB
    with pytest.raises(PageFault, match="outside guest RAM") as err:
        asp.read(va + 0x1000, MiB)
    assert err.value.vaddr == va + MiB  # the first unbacked 4 KiB, inside the large page
    assert err.value.level == "PD"
    padded = asp.read(va + MiB - 0x10, 0x20, pad=True)
    assert padded[0x10:] == bytes(0x10)


def test_large_reads_over_large_and_small_pages(mode: PagingMode) -> None:
    b = PageTableBuilder(mode, ram_size=32 * MiB)
    va = base_va(mode)
    big = 4 * MiB if mode is PagingMode.LEGACY else 2 * MiB
    data = fill(b, 0x80_0000, 2 * big, 8)
    b.map(va, 0x80_0000, big)
    b.map_range(va + big, 0x80_0000 + big, big // 2)  # small pages continuing it
    b.map_range(va + big + big // 2, 0x80_0000 + big + big // 2, big // 2)
    asp = space(b)
    assert asp.read(va + 3, 2 * big - 6) == data[3:-3]
    # Cold and warm give the same bytes.
    assert asp.read(va + 3, 2 * big - 6) == data[3:-3]


def test_scattered_pages_read_in_order() -> None:
    b = PageTableBuilder(PagingMode.LEVEL4, ram_size=8 * MiB)
    va = 0x7F00_0000_0000
    frames = [0x70_0000 - i * 0x3000 for i in range(64)]  # descending, gapped
    expect = b""
    for i, f in enumerate(frames):
        expect += fill(b, f, 0x1000, i)
        b.map(va + i * 0x1000, f)
    asp = space(b)
    assert asp.read(va + 0x10, 64 * 0x1000 - 0x20) == expect[0x10:-0x10]


def test_read_sees_refreshed_tables() -> None:
    b = PageTableBuilder(PagingMode.LEVEL4)
    va = base_va(PagingMode.LEVEL4)
    a = fill(b, 0x40_0000, 0x1000, 9)
    c = fill(b, 0x50_0000, 0x1000, 10)
    b.map(va, 0x40_0000)
    src = b.source(live=True, writable=True)
    asp = AddressSpace(Translator(src, b.dtb, PagingMode.LEVEL4))
    assert asp.read(va, 16) == a[:16]
    b.set_entry(va, "PT", 0x50_0000 | P)
    assert asp.read(va, 16) == a[:16]
    src.refresh()
    assert asp.read(va, 16) == c[:16]


def test_negative_size_is_an_error() -> None:
    b = PageTableBuilder(PagingMode.LEVEL4)
    with pytest.raises(TranslationError, match="negative"):
        space(b).read(0x1000, -1)
    assert "AddressSpace" in repr(space(b))


def test_cold_read_across_a_page_table_boundary_uses_the_next_table() -> None:
    """Run detection inside a leaf table must stop at its end, not read the next page."""
    b = PageTableBuilder(PagingMode.LEVEL4, ram_size=16 * MiB)
    va = 0x7F00_0000_0000
    b.map_range(va, 0x40_0000, 2 * MiB)  # one full PT, physically contiguous
    pt_a = b.entry_address(va, "PT") & ~0xFFF
    decoy = b.new_table()  # the page right after that PT...
    assert decoy == pt_a + 0x1000
    b.write_entry(decoy, (0x40_0000 + 2 * MiB) | P)  # ... looks like its continuation
    b.map(va + 2 * MiB, 0xA0_0000)  # the real next page is elsewhere
    tail = fill(b, 0x40_0000 + 2 * MiB - 0x10, 0x10, 11)
    real = fill(b, 0xA0_0000, 0x10, 12)
    fill(b, 0x40_0000 + 2 * MiB, 0x10, 13)
    asp = space(b)
    assert asp.read(va + 2 * MiB - 0x10, 0x20) == tail + real
