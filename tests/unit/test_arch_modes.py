"""Paging mode selection, CR3 decoding and the PTI helper."""

from __future__ import annotations

import pytest

from tests.support.pagetables import PageTableBuilder
from vmishell.arch import (
    PagingMode,
    Translator,
    dtb_from_cr3,
    kernel_dtb,
    mode_for,
    mode_from_profile_hints,
    mode_from_registers,
    nxe_from_registers,
    pse_from_registers,
)
from vmishell.errors import TranslationError
from vmishell.sources.base import Registers

PG = 1 << 31
PSE, PAE, LA57 = 1 << 4, 1 << 5, 1 << 12
LME, LMA, NXE = 1 << 8, 1 << 10, 1 << 11


@pytest.mark.parametrize(
    ("cr4", "efer", "arch", "mode"),
    [
        (0, 0, "i386", PagingMode.LEGACY),
        (PSE, 0, "i386", PagingMode.LEGACY),
        (PAE, 0, "i386", PagingMode.PAE),
        (PAE, NXE, "x86_64", PagingMode.PAE),  # 64-bit CPU running a PAE kernel
        (PAE, LME | LMA, "x86_64", PagingMode.LEVEL4),
        (PAE, LME, "x86_64", PagingMode.LEVEL4),  # LMA lagging: LME + PG means long mode
        (PAE | LA57, LME | LMA, "x86_64", PagingMode.LEVEL5),
        (PAE, None, "x86_64", PagingMode.LEVEL4),  # no EFER: trust the architecture
        (PAE, None, "i386", PagingMode.PAE),
        (PAE | LA57, None, "x86_64", PagingMode.LEVEL5),
    ],
)
def test_mode_from_registers(cr4: int, efer: int | None, arch: str, mode: PagingMode) -> None:
    regs = Registers(arch=arch, cr0=PG | 1, cr3=0x1000, cr4=cr4, efer=efer)
    assert mode_from_registers(regs) is mode


def test_paging_off_is_an_error() -> None:
    regs = Registers(arch="x86_64", cr0=1, cr3=0x1000, cr4=PAE, efer=LME | LMA)
    with pytest.raises(TranslationError, match="paging is off"):
        mode_from_registers(regs)


@pytest.mark.parametrize("missing", ["cr0", "cr4"])
def test_missing_control_registers_are_an_error(missing: str) -> None:
    cr0 = None if missing == "cr0" else PG
    cr4 = None if missing == "cr4" else PAE
    with pytest.raises(TranslationError, match="cannot tell the paging mode"):
        mode_from_registers(Registers(arch="x86_64", cr0=cr0, cr3=0, cr4=cr4, efer=LMA))


def test_nxe_and_pse_from_registers() -> None:
    assert nxe_from_registers(Registers("x86_64", PG, 0, PAE, NXE | LMA))
    assert not nxe_from_registers(Registers("x86_64", PG, 0, PAE, LMA))
    assert nxe_from_registers(Registers("x86_64", PG, 0, PAE, None))
    assert not nxe_from_registers(Registers("i386", PG, 0, PAE, None))
    assert pse_from_registers(Registers("i386", PG, 0, PSE))
    assert not pse_from_registers(Registers("i386", PG, 0, 0))


def test_mode_for_profile_hints() -> None:
    assert mode_for(4) is PagingMode.LEGACY
    assert mode_for(4, pae=True) is PagingMode.PAE
    assert mode_for(8) is PagingMode.LEVEL4
    assert mode_for(8, la57=True) is PagingMode.LEVEL5
    assert mode_from_profile_hints(8, pae=True, la57=False) is PagingMode.LEVEL4
    with pytest.raises(TranslationError):
        mode_for(2)


def test_dtb_drops_pcid_noflush_and_high_bits() -> None:
    cr3 = (1 << 63) | 0x1_2345_6000 | 0xABC
    assert dtb_from_cr3(cr3, PagingMode.LEVEL4) == 0x1_2345_6000
    assert dtb_from_cr3(cr3, PagingMode.LEVEL5) == 0x1_2345_6000
    # Bits at or above MAXPHYADDR are not address bits.
    assert dtb_from_cr3((1 << 45) | 0x5000, PagingMode.LEVEL4, maxphyaddr=40) == 0x5000


def test_dtb_in_32_bit_modes() -> None:
    assert dtb_from_cr3(0x1234_5FFF, PagingMode.LEGACY) == 0x1234_5000
    # The PAE PDPT is only 32-byte aligned: PWT/PCD (bits 3, 4) and below are dropped.
    assert dtb_from_cr3(0x1234_567F, PagingMode.PAE) == 0x1234_5660
    assert dtb_from_cr3(0x1234_5678, PagingMode.PAE) == 0x1234_5660


def test_kernel_dtb_clears_the_pti_user_bit_only_in_64_bit_modes() -> None:
    user_cr3 = 0x7_6543_3000 | 0x801  # user PGD (odd page), PCID 0x801
    assert kernel_dtb(user_cr3, PagingMode.LEVEL4) == 0x7_6543_2000
    assert kernel_dtb(user_cr3, PagingMode.LEVEL5) == 0x7_6543_2000
    assert kernel_dtb(0x7_6543_2000, PagingMode.LEVEL4) == 0x7_6543_2000
    assert kernel_dtb(0x3000, PagingMode.PAE) == 0x3000
    assert kernel_dtb(0x3000, PagingMode.LEGACY) == 0x3000
    # Without asking, bit 12 stays: it is an ordinary address bit when PTI is off.
    assert dtb_from_cr3(user_cr3, PagingMode.LEVEL4) == 0x7_6543_3000


@pytest.mark.parametrize("mode", list(PagingMode))
def test_translator_from_registers(mode: PagingMode) -> None:
    b = PageTableBuilder(mode)
    b.map(0x40_0000, 0x80_0000)
    src = b.source()
    tr = Translator.from_registers(src)
    assert tr.mode is mode
    assert tr.dtb == b.dtb
    assert tr.translate(0x40_0123).paddr == 0x80_0123


def test_translator_from_registers_with_pti_user_cr3() -> None:
    b = PageTableBuilder(PagingMode.LEVEL4, table_start=0x2000)  # kernel PGD on an even page
    b.map(0xFFFF_FFFF_8100_0000, 0x20_0000)
    regs = b.registers(cr3_extra=0x1000 | 0x5)  # user copy + PCID 5
    tr = Translator.from_registers(b.source(), regs, pti_kernel=True)
    assert tr.dtb == b.dtb
    assert tr.translate(0xFFFF_FFFF_8100_0010).paddr == 0x20_0010


def test_translator_from_registers_needs_cr3() -> None:
    b = PageTableBuilder(PagingMode.LEVEL4)
    regs = Registers("x86_64", PG, None, PAE, LMA)
    with pytest.raises(TranslationError, match="CR3"):
        Translator.from_registers(b.source(), regs)


def test_maxphyaddr_out_of_range() -> None:
    b = PageTableBuilder(PagingMode.LEVEL4)
    with pytest.raises(TranslationError, match="MAXPHYADDR"):
        Translator(b.source(), b.dtb, PagingMode.LEVEL4, maxphyaddr=60)


def test_mode_specs_are_consistent() -> None:
    for mode in PagingMode:
        spec = mode.spec
        assert spec.levels[-1].shift == 12
        covered = spec.levels[-1].shift + sum(lvl.bits for lvl in spec.levels)
        assert covered == spec.address_bits
        assert spec.level(spec.levels[0].name) is spec.levels[0]
    assert PagingMode.PAE.spec.top_table_size == 32
    assert PagingMode.LEVEL5.spec.address_space_end == 1 << 64
    assert PagingMode.LEGACY.spec.address_space_end == 1 << 32
