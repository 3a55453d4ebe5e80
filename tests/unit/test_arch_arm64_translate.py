"""AArch64 translate() and walk() on tables built in bytes: granules, widths, halves, rights."""

from __future__ import annotations

import pytest

from tests.support.arm64tables import (
    AF,
    AP_EL0,
    AP_RO,
    CONT,
    DBM,
    NG,
    NOEL0_T,
    PXN,
    PXN_T,
    RO_T,
    UXN,
    UXN_T,
    Arm64TableBuilder,
)
from vmishell.arch import AddressSpace
from vmishell.arch.aarch64 import Arm64Flags, Arm64Translator, settings_from_tcr
from vmishell.errors import PageFault, TranslationError
from vmishell.sources.memory import BufferSource

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
USER_VA = 0x0000_0040_0000_0000
DATA = 0x4080_0000  # a physical frame inside the builder's RAM

#: (granule, va_bits, fmt) of every regime the walker supports.
REGIMES = [
    (4096, 39, "48"),
    (4096, 42, "48"),
    (4096, 47, "48"),
    (4096, 48, "48"),
    (4096, 52, "lpa2"),
    (16384, 39, "48"),
    (16384, 42, "48"),
    (16384, 47, "48"),
    (16384, 48, "48"),
    (16384, 52, "lpa2"),
    (65536, 42, "48"),
    (65536, 48, "48"),
    (65536, 52, "lpa"),
]

#: Block sizes each granule allows (beyond its page): always the level-2 block,
#: the level-1 block with 4 KiB, or with 52-bit formats.
BLOCKS = {
    (4096, "48"): (2 * MiB, GiB),
    (4096, "lpa2"): (2 * MiB, GiB, 512 * GiB),
    (16384, "48"): (32 * MiB,),
    (16384, "lpa2"): (32 * MiB, 64 * GiB),
    (65536, "48"): (512 * MiB,),
    (65536, "lpa"): (512 * MiB, 4 << 40),
}


def kernel_va(va_bits: int) -> int:
    """The lowest TTBR1 address of a `va_bits` region, plus a little."""
    return (1 << 64) - (1 << va_bits) + (1 << (va_bits - 2))


def translator(b: Arm64TableBuilder, **kw: object) -> Arm64Translator:
    kw.setdefault("pa_bits", 52 if b.fmt != "48" else 48)
    return b.translator(va_bits1=b.va[1], lpa2=b.fmt == "lpa2", **kw)


# -- every granule and width ----------------------------------------------------------------


@pytest.mark.parametrize(("granule", "va_bits", "fmt"), REGIMES)
def test_pages_translate_in_both_halves(granule: int, va_bits: int, fmt: str) -> None:
    b = Arm64TableBuilder(granule, va_bits, fmt=fmt)
    user = 5 * granule
    kern = kernel_va(va_bits)
    b.map(user, DATA)
    b.map(kern, DATA + granule, attrs=AF)
    tr = translator(b)
    for off in (0, 1, granule - 1):
        t = tr.translate(user + off)
        assert (t.paddr, t.page_size, t.level, t.user) == (DATA + off, granule, "L3", True)
        k = tr.translate(kern + off)
        assert (k.paddr, k.page_size, k.user) == (DATA + granule + off, granule, False)
    with pytest.raises(PageFault):
        tr.translate(user + granule)


@pytest.mark.parametrize(("granule", "va_bits", "fmt"), REGIMES)
def test_walk_has_one_step_per_level_from_the_start_level(
    granule: int, va_bits: int, fmt: str
) -> None:
    b = Arm64TableBuilder(granule, va_bits, fmt=fmt)
    b.map(kernel_va(va_bits), DATA, attrs=AF)
    walk = translator(b).walk(kernel_va(va_bits) + 0x10)
    s, bits = granule.bit_length() - 1, granule.bit_length() - 4
    start = 4 - -(-(va_bits - s) // bits)
    assert [st.level for st in walk.steps] == [f"L{n}" for n in range(start, 4)]
    assert walk.ok and walk.translation is not None
    assert walk.translation.paddr == DATA + 0x10
    assert walk.steps[0].table == b.roots[1]
    assert "TTBR1" in walk.steps[0].detail
    assert all(Arm64Flags.TABLE in st.flags for st in walk.steps[:-1])
    assert Arm64Flags.PAGE in walk.steps[-1].flags and walk.steps[-1].leaf


@pytest.mark.parametrize(
    ("granule", "fmt", "size"), [(g, f, s) for (g, f), sizes in BLOCKS.items() for s in sizes]
)
def test_blocks_where_the_granule_allows_them(granule: int, fmt: str, size: int) -> None:
    b = Arm64TableBuilder(granule, 52 if fmt != "48" else 48, fmt=fmt)
    va, pa = 4 * size, size  # the frame need not be RAM to translate
    b.map(va, pa, size)
    t = translator(b).translate(va + size - 8)
    assert (t.paddr, t.page_size) == (pa + size - 8, size)
    assert t.page.vaddr == va


@pytest.mark.parametrize(
    ("granule", "depth_from_leaf"),
    [(4096, 3), (16384, 2), (65536, 2)],
)
def test_a_block_where_the_granule_allows_none_faults(granule: int, depth_from_leaf: int) -> None:
    """Level 0 with 4 KiB, level 1 with 16/64 KiB (48-bit formats): bits[1:0] = 01 faults."""
    b = Arm64TableBuilder(granule, 48)
    va = 0x10 * granule
    leaf = b.map(va, DATA)
    depth = len(b.shifts(0)) - 1 - depth_from_leaf
    b.write(b.entry_address(va, depth), DATA | 1 | AF)
    tr = translator(b)
    with pytest.raises(PageFault, match="block descriptor not allowed") as info:
        tr.translate(va)
    assert info.value.level == f"L{3 - depth_from_leaf}"
    assert leaf  # the page below is never reached


def test_level3_descriptor_with_bits_01_is_reserved() -> None:
    b = Arm64TableBuilder(4096, 48)
    leaf = b.map(0x1000, DATA)
    b.write(leaf, DATA | 1 | AF)
    with pytest.raises(PageFault, match="reserved descriptor") as info:
        translator(b).translate(0x1000)
    assert info.value.level == "L3"


def test_invalid_descriptor_faults_naming_level_and_entry() -> None:
    b = Arm64TableBuilder(16384, 48)
    leaf = b.map(0x4000, DATA)
    b.write(leaf, 0)
    tr = translator(b)
    with pytest.raises(PageFault) as info:
        tr.translate(0x4000)
    assert (info.value.level, info.value.entry_address, info.value.entry) == ("L3", leaf, 0)
    walk = tr.walk(0x4000)
    assert not walk.ok and walk.fault is not None and len(walk.steps) == 4


# -- output addresses ---------------------------------------------------------------------


@pytest.mark.parametrize(("granule", "fmt"), [(4096, "lpa2"), (16384, "lpa2"), (65536, "lpa")])
def test_52_bit_output_addresses(granule: int, fmt: str) -> None:
    b = Arm64TableBuilder(granule, 52, fmt=fmt)
    high = 0x000F_1234_5678_0000 & ~(granule - 1)
    b.map(0x10 * granule, high)
    t = translator(b).translate(0x10 * granule + 0x10)
    assert t.paddr == high + 0x10


def test_high_output_bits_are_ignored_in_the_48_bit_format() -> None:
    """Bits 51:48 of a 48-bit descriptor are DBM/GP/RES0, not address bits."""
    b = Arm64TableBuilder(4096, 48)
    leaf = b.map(0x1000, DATA)
    b.write(leaf, b.read(leaf) | 0xF << 12 << 36)  # bits 51:48 (DBM and GP among them)
    assert translator(b).translate(0x1000).paddr == DATA


def test_output_above_the_physical_size_is_an_address_size_fault() -> None:
    b = Arm64TableBuilder(4096, 48)
    b.map(0x1000, 1 << 44)
    with pytest.raises(PageFault, match="address size fault"):
        translator(b, pa_bits=40).translate(0x1000)
    assert translator(b, pa_bits=48).translate(0x1000).paddr == 1 << 44


def test_64k_bits_15_12_are_address_bits_that_fault_below_52_bits() -> None:
    b = Arm64TableBuilder(65536, 48, fmt="lpa")
    b.map(0x10000, 1 << 48)
    with pytest.raises(PageFault, match="address size fault"):
        translator(b, pa_bits=48).translate(0x10000)
    assert translator(b, pa_bits=52).translate(0x10000).paddr == 1 << 48


def test_ttbr_asid_and_cnp_are_dropped_and_52_bit_base_decoded() -> None:
    b = Arm64TableBuilder(65536, 52, fmt="lpa")
    b.map(0x10000, DATA)
    tr = Arm64Translator(
        b.source(), ttbr0=b.ttbr(0, asid=0xBEEF) | 1, granule=65536, va_bits=52, pa_bits=52
    )
    assert tr.table_base(0) == b.roots[0]
    assert tr.translate(0x10000).paddr == DATA


# -- halves, range, TBI ---------------------------------------------------------------------


def test_bit_55_selects_the_half_and_the_range_is_checked() -> None:
    b = Arm64TableBuilder(4096, 48, va_bits1=39)
    b.map(0x1000, DATA)
    b.map(0xFFFF_FF80_0000_1000, DATA + 0x1000, attrs=AF)
    tr = translator(b)
    assert tr.translate(0xFFFF_FF80_0000_1000).paddr == DATA + 0x1000
    with pytest.raises(PageFault, match="outside TTBR1's 39-bit range"):
        tr.translate(0xFFFF_FF00_0000_1000)  # a 48-bit kernel address: not in 39 bits
    with pytest.raises(PageFault, match="outside TTBR0's 48-bit range"):
        tr.translate(0x0001_0000_0000_1000)
    with pytest.raises(PageFault, match="outside TTBR0"):
        tr.translate(0x0100_0000_0000_1000)  # a tag, but TBI0 is off


def test_top_byte_ignore_per_half() -> None:
    b = Arm64TableBuilder(4096, 48)
    b.map(0x1000, DATA)
    b.map(0xFFFF_0000_0000_1000, DATA + 0x1000, attrs=AF)
    tr = translator(b, tbi0=True)
    t = tr.translate(0xAB00_0000_0000_1010)
    assert t.paddr == DATA + 0x10
    with pytest.raises(PageFault, match="outside TTBR1"):
        tr.translate(0x00FF_0000_0000_1000)  # bit 55 set: TTBR1, whose TBI1 is off
    assert translator(b, tbi1=True).translate(0x00FF_0000_0000_1000).paddr == DATA + 0x1000
    assert AddressSpace(tr).read(0x5A00_0000_0000_1000, 4) == bytes(4)


def test_a_half_without_ttbr_faults_and_one_half_is_enough() -> None:
    b = Arm64TableBuilder(4096, 48)
    b.map(0xFFFF_0000_0000_1000, DATA, attrs=AF)
    tr = Arm64Translator(b.source(), ttbr1=b.ttbr(1))
    assert tr.translate(0xFFFF_0000_0000_1000).paddr == DATA
    with pytest.raises(PageFault, match="TTBR0, which is not in use"):
        tr.translate(0x1000)
    with pytest.raises(TranslationError):
        Arm64Translator(b.source())


# -- rights ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attrs", "writable", "user", "nx"),
    [
        (AF, True, False, False),  # AP=00: EL1 rw
        (AF | AP_EL0, True, True, False),  # AP=01: EL0 rw
        (AF | AP_RO, False, False, False),  # AP=10: EL1 ro
        (AF | AP_RO | AP_EL0, False, True, False),  # AP=11: ro everywhere
        (AF | AP_EL0 | UXN, True, True, True),  # user page: nx is UXN
        (AF | AP_EL0 | PXN, True, True, False),  # ... and not PXN
        (AF | PXN, True, False, True),  # kernel page: nx is PXN
        (AF | UXN, True, False, False),  # ... and not UXN
    ],
)
def test_leaf_rights(attrs: int, writable: bool, user: bool, nx: bool) -> None:
    b = Arm64TableBuilder(4096, 48)
    b.map(0x1000, DATA, attrs=attrs)
    t = translator(b).translate(0x1000)
    assert (t.writable, t.user, t.nx) == (writable, user, nx)


@pytest.mark.parametrize(
    ("table_attrs", "writable", "user", "nx"),
    [
        (NOEL0_T, True, False, True),  # no EL0 below: a kernel page, and PXN applies
        (RO_T, False, True, False),
        (UXN_T, True, True, True),
        (PXN_T, True, True, False),  # PXNTable does not bind EL0
    ],
)
def test_hierarchical_table_bits_restrict_what_is_below(
    table_attrs: int, writable: bool, user: bool, nx: bool
) -> None:
    b = Arm64TableBuilder(4096, 48)
    b.map(0x1000, DATA, attrs=AF | AP_EL0 | PXN, table_attrs=table_attrs)
    t = translator(b).translate(0x1000)
    assert (t.writable, t.user, t.nx) == (writable, user, nx)
    # With HPD the table bits are software's: the leaf alone decides.
    free = translator(b, hpd0=True).translate(0x1000)
    assert (free.writable, free.user, free.nx) == (True, True, False)


def test_global_accessed_and_hardware_dirty() -> None:
    b = Arm64TableBuilder(4096, 48)
    b.map(0x1000, DATA, attrs=AP_EL0 | NG)  # AF clear: still translates
    b.map(0x2000, DATA, attrs=AF | AP_EL0 | AP_RO | DBM)  # writable-clean
    b.map(0x3000, DATA, attrs=AF | AP_EL0 | DBM)  # dirty
    tr = translator(b)
    old = tr.translate(0x1000)
    assert (old.global_, old.accessed, old.dirty) == (False, False, False)
    assert not tr.translate(0x2000).writable  # without TCR_EL1.HD, DBM means nothing
    hd = translator(b, hd=True)
    clean, dirty = hd.translate(0x2000), hd.translate(0x3000)
    assert (clean.writable, clean.dirty, clean.global_) == (True, False, True)
    assert (dirty.writable, dirty.dirty) == (True, True)


def test_contiguous_hint_is_shown_and_changes_nothing() -> None:
    b = Arm64TableBuilder(4096, 48)
    for i in range(16):
        b.map(0x10000 + i * 0x1000, DATA + i * 0x1000, attrs=AF | AP_EL0 | CONT)
    leaf = b.entry_address(0x13000, 3)
    b.write(leaf, (b.read(leaf) & ~0xFFFF_F000) | 0x4090_0000)  # a hint the entries break
    tr = translator(b)
    assert tr.translate(0x13008).paddr == 0x4090_0008
    assert tr.translate(0x12000).paddr == DATA + 0x2000
    step = tr.walk(0x13000).steps[-1]
    assert Arm64Flags.CONTIGUOUS in step.flags and "contiguous hint" in step.detail


def test_walk_text_shows_arm64_bits() -> None:
    b = Arm64TableBuilder(4096, 48)
    b.map(0x1000, DATA, attrs=AF | AP_EL0 | AP_RO | UXN | NG, table_attrs=PXN_T)
    text = str(translator(b).walk(0x1000))
    assert "AP_EL0|AP_RO|AF|NG" in text and "UXN" in text and "PXN_TABLE" in text
    assert "AP=11 (EL1 ro, EL0 ro)" in text


# -- registers ------------------------------------------------------------------------------


def tcr(
    t0sz: int = 16,
    t1sz: int = 16,
    tg0: int = 0,
    tg1: int = 2,
    ips: int = 5,
    extra: int = 0,
) -> int:
    return t0sz | tg0 << 14 | t1sz << 16 | tg1 << 30 | ips << 32 | extra


def test_tcr_fields_decode_as_the_mmu_reads_them() -> None:
    # Linux 16K, 48-bit user, 47-bit kernel, TBI0, HD, IPS 48 bits.
    s = settings_from_tcr(tcr(16, 17, tg0=0b10, tg1=0b01, extra=1 << 37 | 1 << 40))
    assert (s["granule"], s["granule1"], s["va_bits"], s["va_bits1"]) == (16384, 16384, 48, 47)
    assert (s["tbi0"], s["tbi1"], s["hd"], s["pa_bits"], s["lpa2"]) == (
        True,
        False,
        True,
        48,
        False,
    )
    s = settings_from_tcr(tcr(tg0=0b01, tg1=0b11, ips=6, extra=1 << 7))
    assert (s["granule"], s["granule1"], s["pa_bits"], s["enabled0"]) == (65536, 65536, 52, False)
    with pytest.raises(TranslationError, match="TG1"):
        settings_from_tcr(tcr(tg1=0))


def test_from_tcr_builds_the_space_the_registers_describe() -> None:
    b = Arm64TableBuilder(16384, 48, va_bits1=47)
    b.map(0x4000, DATA)
    b.map(0xFFFF_8000_0000_4000, DATA + 0x4000, attrs=AF)
    tr = Arm64Translator.from_tcr(
        b.source(), tcr(16, 17, tg0=0b10, tg1=0b01, extra=1 << 37), b.ttbr(0, 7), b.ttbr(1)
    )
    assert tr.translate(0x1200_0000_0000_4000).paddr == DATA
    assert tr.translate(0xFFFF_8000_0000_4000).paddr == DATA + 0x4000
    off = Arm64Translator.from_tcr(
        b.source(), tcr(16, 17, 2, 1, extra=1 << 7), b.ttbr(0), b.ttbr(1)
    )
    with pytest.raises(PageFault, match="TTBR0"):
        off.translate(0x4000)


# -- caches ---------------------------------------------------------------------------------


def test_generation_change_drops_the_tlb() -> None:
    b = Arm64TableBuilder(4096, 48)
    leaf = b.map(0x1000, DATA)
    src = BufferSource([(b.ram_base, b.ram)], live=True)
    tr = Arm64Translator(src, ttbr0=b.ttbr(0))
    assert tr.translate(0x1000).paddr == DATA
    b.write(leaf, (DATA + 0x1000) | 3 | AF)
    assert tr.translate(0x1000).paddr == DATA  # cached until the source says it changed
    src.refresh()
    assert tr.translate(0x1000).paddr == DATA + 0x1000
