"""Page tables laid out in a bytearray: for tests and the synthetic benchmark.

Writing tables by hand for each paging mode is error-prone, and both the
test suites and benchmarks/bench_translate.py need them; this builder uses
the same mode data as the walker (`PagingMode.spec`) but none of its code,
so a test built with it still checks the walker against an independent
layout. It is test support, not part of the installed package.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from vmishell.arch.modes import Level, PagingMode
from vmishell.errors import TranslationError
from vmishell.sources.base import Registers
from vmishell.sources.memory import BufferSource

P, RW, US, PWT, PCD, A, D, PS, G = (1 << b for b in range(9))
PAT_LARGE = 1 << 12
XD = 1 << 63
#: What the builder puts in entries pointing to lower tables: let the leaf decide rights.
TABLE_FLAGS = P | RW | US


class PageTableBuilder:
    """Builds one address space's tables in guest "RAM" starting at physical 0.

    Tables are allocated upwards from `table_start`; data frames are whatever
    physical addresses the caller maps. `pdpt_offset` places the PAE PDPT
    inside its page (CR3 only needs 32-byte alignment there).
    """

    def __init__(
        self,
        mode: PagingMode,
        ram_size: int = 1 << 24,
        *,
        table_start: int = 0x1000,
        pdpt_offset: int = 0,
        ram: bytearray | None = None,
        allocate: Callable[[], int] | None = None,
        top: int | None = None,
    ) -> None:
        """`ram` and `allocate` let several address spaces share one RAM and one
        table allocator (a kernel and its processes); `top` puts the top-level
        table at a given physical address (where a kernel symbol says it is).
        """
        self.mode = mode
        self.spec = mode.spec
        self.ram = bytearray(ram_size) if ram is None else ram
        self._next = table_start
        self._allocate = allocate
        self._fmt = "<I" if self.spec.entry_size == 4 else "<Q"
        if top is None:
            top = self.new_table()
        else:
            self.ram[top : top + 0x1000] = bytes(0x1000)
        self.dtb = top + (pdpt_offset if mode is PagingMode.PAE else 0)

    # -- raw access -------------------------------------------------------------------------
    def new_table(self) -> int:
        """A zeroed 4 KiB-aligned table frame (physical address)."""
        if self._allocate is not None:
            addr = self._allocate()
            self.ram[addr : addr + 0x1000] = bytes(0x1000)
            return addr
        addr = self._next
        if addr + 0x1000 > len(self.ram):
            raise TranslationError("page-table builder ran out of RAM for tables")
        self._next += 0x1000
        return addr

    def read_entry(self, address: int) -> int:
        return struct.unpack_from(self._fmt, self.ram, address)[0]

    def write_entry(self, address: int, value: int) -> None:
        struct.pack_into(self._fmt, self.ram, address, value)

    # -- structure --------------------------------------------------------------------------
    def _index(self, vaddr: int, level: Level) -> int:
        return (vaddr >> level.shift) & level.index_mask

    def entry_address(self, vaddr: int, level: str) -> int:
        """Physical address of the `level` entry used to translate `vaddr` (tables must exist)."""
        table = self.dtb
        for lvl in self.spec.levels:
            addr = table + self._index(vaddr, lvl) * self.spec.entry_size
            if lvl.name == level:
                return addr
            entry = self.read_entry(addr)
            if not entry & P or (lvl.large_page and entry & PS):
                raise TranslationError(f"no {level} table for {vaddr:#x}")
            table = entry & 0x000F_FFFF_FFFF_F000
        raise TranslationError(f"{self.spec.name} has no level {level}")

    def get_entry(self, vaddr: int, level: str) -> int:
        return self.read_entry(self.entry_address(vaddr, level))

    def set_entry(self, vaddr: int, level: str, value: int) -> None:
        self.write_entry(self.entry_address(vaddr, level), value)

    def update_entry(
        self, vaddr: int, level: str, *, set_bits: int = 0, clear_bits: int = 0
    ) -> None:
        """Set and clear flag bits of an existing entry."""
        addr = self.entry_address(vaddr, level)
        self.write_entry(addr, (self.read_entry(addr) | set_bits) & ~clear_bits)

    def map(
        self,
        vaddr: int,
        paddr: int,
        page_size: int = 0x1000,
        *,
        writable: bool = True,
        user: bool = True,
        nx: bool = False,
        global_: bool = False,
        dirty: bool = False,
        accessed: bool = False,
        extra: int = 0,
    ) -> int:
        """Map one page of `page_size` at `vaddr` onto `paddr`; returns the leaf entry's address.

        Missing tables are created with P|RW|US so the leaf's rights decide,
        unless a test tightens an upper entry afterwards.
        """
        levels = self.spec.levels
        leaf_at = next((i for i, lvl in enumerate(levels) if 1 << lvl.shift == page_size), None)
        if leaf_at is None or (leaf_at < len(levels) - 1 and not levels[leaf_at].large_page):
            raise TranslationError(f"{self.spec.name} cannot map a {page_size:#x}-byte page")
        if vaddr % page_size or paddr % page_size:
            raise TranslationError(f"{vaddr:#x} -> {paddr:#x} is not {page_size:#x}-aligned")
        table = self.dtb
        esz = self.spec.entry_size
        for lvl in levels[:leaf_at]:
            addr = table + self._index(vaddr, lvl) * esz
            entry = self.read_entry(addr)
            if not entry & P:
                new = self.new_table()
                # PAE PDPTEs have no R/W or U/S bits (they are reserved there).
                flags = P if not lvl.permissions else TABLE_FLAGS
                self.write_entry(addr, new | flags)
                table = new
            else:
                table = entry & 0x000F_FFFF_FFFF_F000
        lvl = levels[leaf_at]
        addr = table + self._index(vaddr, lvl) * esz
        entry = P | (RW if writable else 0) | (US if user else 0)
        entry |= (G if global_ else 0) | (D if dirty else 0) | (A if accessed else 0)
        entry |= XD if nx and esz == 8 else 0  # legacy entries have no XD bit
        if leaf_at < len(levels) - 1:
            entry |= PS
            if esz == 4:  # legacy 4 MiB page: PSE-36 keeps physical bits 39:32 in bits 20:13
                entry |= (paddr & 0xFFC0_0000) | ((paddr >> 32) & 0xFF) << 13
                paddr = 0
        self.write_entry(addr, entry | paddr | extra)
        return addr

    def map_range(
        self, vaddr: int, paddr: int, size: int, page_size: int = 0x1000, **kw: Any
    ) -> None:
        """Map `size` bytes page by page (contiguous physically)."""
        for off in range(0, size, page_size):
            self.map(vaddr + off, paddr + off, page_size, **kw)

    # -- results ----------------------------------------------------------------------------
    def registers(self, *, cr3_extra: int = 0, nxe: bool = True) -> Registers:
        """Control registers a vCPU in this mode would report with this CR3."""
        cr0 = 1 << 31 | 1
        cr4 = 1 << 4  # PSE
        efer = (1 << 11) if nxe else 0
        arch = "i386"
        if self.mode is not PagingMode.LEGACY:
            cr4 |= 1 << 5
        if self.mode in (PagingMode.LEVEL4, PagingMode.LEVEL5):
            efer |= (1 << 8) | (1 << 10)
            arch = "x86_64"
        if self.mode is PagingMode.LEVEL5:
            cr4 |= 1 << 12
        return Registers(arch=arch, cr0=cr0, cr3=self.dtb | cr3_extra, cr4=cr4, efer=efer)

    def source(
        self, *, live: bool = False, writable: bool = False, zero_copy: bool = True
    ) -> BufferSource:
        """The RAM as a BufferSource (shares the bytearray: later edits show through).

        `zero_copy=False` hides the segments, like a source read over a file or
        socket, so the translator's table cache is what gets exercised.
        """
        cls = BufferSource if zero_copy else CopyingSource
        return cls(
            [(0, self.ram)],
            registers=self.registers(),
            description=f"page tables ({self.spec.name})",
            live=live,
            writable=writable,
        )


class CopyingSource(BufferSource):
    """A BufferSource that offers no zero-copy segments (every read copies)."""

    def segments(self) -> None:  # type: ignore[override]
        return None
