"""AArch64 stage-1 tables laid out in a bytearray: for tests and the synthetic benchmark.

Written from the ARM ARM's descriptor formats with its own arithmetic (none
of vmishell's walker or spec code), so a test built with it checks the
walker against an independent layout. RAM starts at 0x40000000 as on
QEMU's `virt` machine. Test support, not part of the installed package.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from tests.support.pagetables import CopyingSource
from vmishell.sources.memory import BufferSource

if TYPE_CHECKING:
    from vmishell.arch.aarch64 import Arm64Translator
    from vmishell.sources.base import PhysicalSource

VIRT_RAM = 0x4000_0000
#: Descriptor bits.
VALID, TABLE, AF, NG = 1, 2, 1 << 10, 1 << 11
AP_EL0, AP_RO = 1 << 6, 1 << 7
DBM, CONT, PXN, UXN = 1 << 51, 1 << 52, 1 << 53, 1 << 54
PXN_T, UXN_T, NOEL0_T, RO_T = 1 << 59, 1 << 60, 1 << 61, 1 << 62


class Arm64TableBuilder:
    """Builds the TTBR0 and TTBR1 tables of one EL1&0 space in one RAM buffer.

    `fmt` is the output-address format: "48", "lpa2" (OA[51:50] in bits 9:8,
    4/16 KiB) or "lpa" (OA[51:48] in bits 15:12, 64 KiB). Both halves use
    `granule`; `va_bits1` may differ from `va_bits`.
    """

    def __init__(
        self,
        granule: int = 4096,
        va_bits: int = 48,
        *,
        va_bits1: int | None = None,
        fmt: str = "48",
        ram_size: int = 1 << 24,
        ram_base: int = VIRT_RAM,
    ) -> None:
        self.granule = granule
        self.gshift = granule.bit_length() - 1
        self.va = (va_bits, va_bits if va_bits1 is None else va_bits1)
        self.fmt = fmt
        self.ram = bytearray(ram_size)
        self.ram_base = ram_base
        self._next = ram_base
        self.roots = (self.new_table(), self.new_table())

    # -- layout arithmetic (ARM DDI 0487 D8.2) -------------------------------------------------
    def shifts(self, half: int) -> list[int]:
        """The lowest VA bit indexing each level, top level first."""
        s, b = self.gshift, self.gshift - 3
        out = [s]
        while out[-1] + b < self.va[half]:
            out.append(out[-1] + b)
        return out[::-1]

    def index(self, vaddr: int, half: int, depth: int) -> int:
        shifts = self.shifts(half)
        top = self.va[half] if depth == 0 else shifts[depth - 1]
        return (vaddr >> shifts[depth]) & ((1 << (top - shifts[depth])) - 1)

    def encode_oa(self, paddr: int) -> int:
        if self.fmt == "lpa2":
            return (paddr & ((1 << 50) - 1)) | ((paddr >> 50) & 3) << 8
        if self.fmt == "lpa":
            return (paddr & ((1 << 48) - 1)) | ((paddr >> 48) & 0xF) << 12
        return paddr

    def ttbr(self, half: int, asid: int = 0) -> int:
        """The TTBRn_EL1 value for a half's root (52-bit formats put bits 51:48 in 5:2)."""
        root = self.roots[half]
        if self.fmt != "48":
            return (root & ((1 << 48) - 1)) | ((root >> 48) & 0xF) << 2 | asid << 48
        return root | asid << 48

    # -- raw access -----------------------------------------------------------------------
    def new_table(self) -> int:
        addr = self._next
        self._next += self.granule
        if self._next > self.ram_base + len(self.ram):
            raise MemoryError("arm64 table builder ran out of RAM")
        off = addr - self.ram_base
        self.ram[off : off + self.granule] = bytes(self.granule)
        return addr

    def read(self, addr: int) -> int:
        return struct.unpack_from("<Q", self.ram, addr - self.ram_base)[0]

    def write(self, addr: int, value: int) -> None:
        struct.pack_into("<Q", self.ram, addr - self.ram_base, value)

    def source(self, *, live: bool = False, zero_copy: bool = True) -> BufferSource:
        """The RAM as a source (shares the bytearray); `zero_copy=False` hides its
        segments, like a source read over a socket, to exercise the table cache."""
        cls = BufferSource if zero_copy else CopyingSource
        return cls([(self.ram_base, self.ram)], description="arm64 test tables", live=live)

    def translator(self, source: PhysicalSource | None = None, **options: Any) -> Arm64Translator:
        """vmishell's walker over these tables (both TTBRs, the granule, TTBR0's width);
        `options` (lpa2, va_bits1, pa_bits, ...) go to it as given."""
        from vmishell.arch.aarch64 import Arm64Translator

        return Arm64Translator(
            source or self.source(),
            ttbr0=self.ttbr(0),
            ttbr1=self.ttbr(1),
            granule=self.granule,
            va_bits=self.va[0],
            **options,
        )

    def entry_address(self, vaddr: int, depth: int) -> int:
        """Where the descriptor of `vaddr` at walk depth `depth` (0 = top) lives."""
        half = (vaddr >> 55) & 1
        table = self.roots[half]
        for dd in range(depth):
            e = self.read(table + 8 * self.index(vaddr, half, dd))
            assert e & 3 == 3, f"no table at depth {dd + 1} for {vaddr:#x}"
            table = self.decode_table(e)
        return table + 8 * self.index(vaddr, half, depth)

    def decode_table(self, e: int) -> int:
        g = self.granule
        if self.fmt == "lpa2":
            return (e & ((1 << 50) - 1) & ~(g - 1)) | ((e >> 8) & 3) << 50
        if self.fmt == "lpa":
            return (e & ((1 << 48) - 1) & ~(g - 1)) | ((e >> 12) & 0xF) << 48
        return e & ((1 << 48) - 1) & ~(g - 1)

    # -- mapping --------------------------------------------------------------------------
    def map(
        self,
        vaddr: int,
        paddr: int,
        size: int | None = None,
        *,
        attrs: int = AF | AP_EL0,
        table_attrs: int = 0,
    ) -> int:
        """Map a page (granule) or block of `size` at `vaddr`; returns the leaf's address.

        `attrs` are the leaf's bits besides type and address; `table_attrs`
        are OR-ed into tables created on the way.
        """
        size = self.granule if size is None else size
        half = (vaddr >> 55) & 1
        shifts = self.shifts(half)
        depth = shifts.index(size.bit_length() - 1)
        assert vaddr % size == 0 and paddr % size == 0
        table = self.roots[half]
        for dd in range(depth):
            addr = table + 8 * self.index(vaddr, half, dd)
            e = self.read(addr)
            if e & 3 != 3:
                child = self.new_table()
                e = self.encode_oa(child) | 3 | table_attrs
                self.write(addr, e)
            table = self.decode_table(e)
        addr = table + 8 * self.index(vaddr, half, depth)
        kind = 3 if depth == len(shifts) - 1 else 1
        self.write(addr, self.encode_oa(paddr) | kind | attrs)
        return addr
