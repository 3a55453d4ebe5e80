"""VMCOREINFO text as the kernel writes it: which numbers are hex, which decimal, and bad input."""

from __future__ import annotations

import pytest

from vmishell.errors import GuestDataError
from vmishell.os.linux.vmcoreinfo import VmcoreInfo, vmcoreinfo_of
from vmishell.sources.memory import BufferSource

# Cut from the note of a Debian 6.1 guest (QEMU -device vmcoreinfo + qemu_fw_cfg).
TEXT = """\
OSRELEASE=6.1.0-57-amd64
PAGESIZE=4096
SYMBOL(swapper_pg_dir)=ffffffffafe10000
SYMBOL(_stext)=ffffffffae400000
NUMBER(phys_base)=1199570944
SYMBOL(init_top_pgt)=ffffffffafe10000
NUMBER(pgtable_l5_enabled)=0
KERNELOFFSET=2d400000
NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)=-129
"""


def test_symbols_and_the_kaslr_offset_are_hex_numbers_are_decimal() -> None:
    info = VmcoreInfo.parse(TEXT)
    assert info.release == "6.1.0-57-amd64"
    assert info.kernel_offset == 0x2D400000
    assert info.phys_base == 1199570944 == 0x47800000
    assert info.symbol("init_top_pgt") == 0xFFFFFFFFAFE10000
    assert info.number("pgtable_l5_enabled") == 0
    assert info.number("PAGE_BUDDY_MAPCOUNT_VALUE") == -129
    assert info.symbol("absent") is None


def test_a_value_that_is_not_a_number_is_a_guest_data_error() -> None:
    info = VmcoreInfo.parse("KERNELOFFSET=zz\nNUMBER(phys_base)=0x10\n")
    with pytest.raises(GuestDataError, match="KERNELOFFSET='zz' is not a number"):
        _ = info.kernel_offset
    with pytest.raises(GuestDataError, match="phys_base"):
        _ = info.phys_base


def test_the_first_of_repeated_keys_counts_and_huge_text_is_cut() -> None:
    info = VmcoreInfo.parse("KERNELOFFSET=1\nKERNELOFFSET=2\n" + "X=1\n" * 100_000)
    assert info.kernel_offset == 1
    assert len(info.entries) <= 4097


def test_a_source_without_the_note_has_none() -> None:
    assert vmcoreinfo_of(BufferSource([(0, bytes(4096))])) is None
