"""AArch64 mappings()/runs() and reads: coalescing, clipping, both halves, hostile tables."""

from __future__ import annotations

import pytest

from tests.support.arm64tables import AF, AP_EL0, AP_RO, UXN, Arm64TableBuilder
from vmishell.arch import AddressSpace
from vmishell.arch.aarch64 import Arm64Translator
from vmishell.errors import GuestDataError, PageFault

KiB, MiB = 1 << 10, 1 << 20
RAM = 0x4000_0000
KERNEL = 0xFFFF_8000_0000_0000


def translator(b: Arm64TableBuilder, **kw: object) -> Arm64Translator:
    return b.translator(kw.pop("source", None), va_bits1=b.va[1], **kw)  # type: ignore[arg-type]


def runs(
    tr: Arm64Translator, *args: int, **kw: int
) -> list[tuple[int, int, int, bool, bool, bool]]:
    """The runs mappings() yields; runs() must give the very same."""
    got = [(m.vaddr, m.paddr, m.size, m.writable, m.user, m.nx) for m in tr.mappings(*args, **kw)]
    assert tr.runs(*args, **kw) == got
    return got


@pytest.mark.parametrize("granule", [4096, 16384, 65536])
def test_pages_and_blocks_coalesce_and_rights_split(granule: int) -> None:
    b = Arm64TableBuilder(granule, 48, ram_size=64 * granule)
    block = 1 << (2 * granule.bit_length() - 5)  # the level-2 block: 2, 32 or 512 MiB
    va = 4 * block
    b.map(va, 8 * block, block)
    for i in range(3):  # pages continuing the block, virtually and physically
        b.map(va + block + i * granule, 9 * block + i * granule)
    b.map(va + block + 3 * granule, 9 * block + 3 * granule, attrs=AF | AP_EL0 | UXN)
    b.map(va + block + 4 * granule, 9 * block + 4 * granule, attrs=AF | AP_EL0 | AP_RO)
    assert runs(translator(b)) == [
        (va, 8 * block, block + 3 * granule, True, True, False),
        (va + block + 3 * granule, 9 * block + 3 * granule, granule, True, True, True),
        (va + block + 4 * granule, 9 * block + 4 * granule, granule, False, True, False),
    ]


def test_both_halves_in_address_order_and_clipped() -> None:
    b = Arm64TableBuilder(16384, 48, va_bits1=47)
    b.map(0x4000, RAM + 0x80_0000)
    b.map(KERNEL, RAM, 32 * MiB, attrs=AF)
    tr = translator(b)
    assert runs(tr) == [
        (0x4000, RAM + 0x80_0000, 0x4000, True, True, False),
        (KERNEL, RAM, 32 * MiB, True, False, False),
    ]
    assert runs(tr, KERNEL + 0x1000, KERNEL + 0x3000) == [
        (KERNEL + 0x1000, RAM + 0x1000, 0x2000, True, False, False)
    ]
    assert runs(tr, 0x8000, KERNEL) == []


def test_descriptors_the_walker_faults_on_map_nothing() -> None:
    b = Arm64TableBuilder(4096, 48)
    good = b.map(0x1000, RAM + 0x10_0000)
    b.write(good + 8, (RAM + 0x11_0000) | 1 | AF)  # bits 01 at level 3: reserved
    b.map(0x20_0000, RAM + 0x20_0000)
    b.write(b.entry_address(0x20_0000, 2), (RAM + 0xFF00_0000) | 3)  # table outside RAM
    tr = translator(b)
    assert runs(tr) == [(0x1000, RAM + 0x10_0000, 0x1000, True, True, False)]
    with pytest.raises(PageFault, match="outside guest RAM"):
        tr.translate(0x20_0000)


def fill(b: Arm64TableBuilder, table: int, value: int) -> None:
    for i in range(b.granule // 8):
        b.write(table + 8 * i, value)


@pytest.mark.parametrize("granule", [4096, 16384, 65536])
def test_a_table_pointing_at_itself_everywhere_is_bounded(granule: int) -> None:
    b = Arm64TableBuilder(granule, 48)
    for half in (0, 1):
        fill(b, b.roots[half], b.roots[half] | 3)
    sub = b.new_table()
    fill(b, b.roots[0], sub | 3)
    fill(b, sub, sub | 3)  # level 1 and below point back at the same table
    tr = translator(b)
    with pytest.raises(GuestDataError, match="max_work"):
        list(tr.mappings(max_work=20_000))
    with pytest.raises(GuestDataError, match="max_work"):
        tr.runs(max_work=20_000)
    with pytest.raises(GuestDataError):
        list(translator(b, max_mapping_work=5_000).mappings())
    # A walk reads one descriptor per level: at level 3 the self-pointer is a page
    # descriptor mapping the table itself (a recursive mapping, as on the CPU).
    assert tr.translate(0x10).paddr == sub + 0x10
    assert len(tr.walk(0x10).steps) == len(b.shifts(0))


def test_shared_last_level_tables_enumerate_within_budget() -> None:
    b = Arm64TableBuilder(4096, 48)
    b.map(0x1000, RAM + 0x50_0000)
    pt = b.entry_address(0x1000, 3) & ~0xFFF
    b.write(b.entry_address(0x20_0000, 2), pt | 3)
    got = runs(translator(b))
    assert [(v, p) for v, p, *_ in got] == [(0x1000, RAM + 0x50_0000), (0x20_1000, RAM + 0x50_0000)]


def test_copying_source_and_generations() -> None:
    b = Arm64TableBuilder(16384, 48)
    b.map(0x4000, RAM + 0x40_0000)
    src = b.source(live=True, zero_copy=False)
    tr = translator(b, source=src)
    assert len(runs(tr)) == 1
    b.map(0xC000, RAM + 0x80_0000)
    assert len(runs(tr)) == 1  # tables cached until the source says it changed
    src.refresh()
    assert len(runs(tr)) == 2
    assert tr.translate(0xC010).paddr == RAM + 0x80_0010


# -- reads -----------------------------------------------------------------------------------


@pytest.mark.parametrize("granule", [4096, 16384, 65536])
@pytest.mark.parametrize("zero_copy", [True, False])
def test_scattered_reads_across_pages_and_holes(granule: int, zero_copy: bool) -> None:
    b = Arm64TableBuilder(granule, 48, ram_size=96 * granule)
    data = RAM + 64 * granule
    for i in range(8):
        b.ram[64 * granule + i * granule : 64 * granule + (i + 1) * granule] = (
            bytes([i + 1]) * granule
        )
    va = 16 * granule
    order = [3, 1, 2, 0, 5]  # scattered frames, then a hole, then one more page
    for k, frame in enumerate(order):
        b.map(va + k * granule, data + frame * granule)
    b.map(va + 6 * granule, data + 7 * granule)
    tr = translator(b, source=b.source(zero_copy=zero_copy))
    space = AddressSpace(tr)
    want = b"".join(bytes([f + 1]) * granule for f in order)
    assert space.read(va + 5, 5 * granule - 10) == want[5:-5]
    buf = bytearray(5 * granule)
    assert space.read_into(va, buf) == len(buf) and bytes(buf) == want
    padded = space.read(va + 4 * granule, 3 * granule, pad=True)
    assert padded == bytes([6]) * granule + bytes(granule) + bytes([8]) * granule
    with pytest.raises(PageFault):
        space.read(va + 4 * granule, 3 * granule)
    with space.view(va + granule, granule) as v:
        assert bytes(v) == bytes([2]) * granule


def test_padded_read_across_the_end_of_the_user_range() -> None:
    b = Arm64TableBuilder(4096, 39)
    top = (1 << 39) - 0x1000
    b.map(top, RAM + 0x10_0000)
    b.ram[0x10_0000:0x10_1000] = b"\x77" * 0x1000
    space = AddressSpace(translator(b))
    got = space.read(top, 0x3000, pad=True)
    assert got == b"\x77" * 0x1000 + bytes(0x2000)
    assert space.is_readable(top, 0x1000) and not space.is_readable(top, 0x1001)
