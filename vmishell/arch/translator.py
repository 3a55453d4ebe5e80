"""Virtual-to-physical translation for one address space: walk, TLB, enumeration.

One walker serves every mode (the mode is data, see `geometry`); it reads at
most one entry per level, so a walk is bounded by the number of levels
whatever the guest's tables point at. Results are cached per page in a
dict (the "TLB") that is dropped whenever the source's generation changes,
so a live guest is seen afresh after `source.refresh()` and never before.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterator
from typing import TYPE_CHECKING

from vmishell.arch.entries import PAGE_SIZE, PRESENT, RIGHTS
from vmishell.arch.entries import decode_flags as _decode_flags
from vmishell.arch.geometry import Geometry, LevelGeometry
from vmishell.arch.modes import PagingMode
from vmishell.arch.registers import (
    dtb_from_cr3,
    kernel_dtb,
    mode_from_registers,
    nxe_from_registers,
    pse_from_registers,
)
from vmishell.arch.results import Mapping, Page, Translation, Walk, WalkStep
from vmishell.arch.results import _new as _new
from vmishell.arch.tables import DEFAULT_MAX_CACHED_TABLES, TableReader
from vmishell.arch.tlb import CachedWalks
from vmishell.errors import PageFault, TranslationError

if TYPE_CHECKING:
    from vmishell.arch.runs import RunArrays
from vmishell.sources.base import PhysicalSource, Registers

#: Pages remembered by the TLB before it is emptied (~100 bytes each).
DEFAULT_TLB_SIZE = 1 << 18
#: Work units (tables visited + leaf entries seen) before `mappings()` gives up on the
#: guest's tables: 2**25 is ~128 GiB of individually mapped 4 KiB pages, and bounds the
#: worst case (every entry aliasing one table) to roughly 20 s.
DEFAULT_MAX_MAPPING_WORK = 1 << 25

_tuple_new = tuple.__new__


class Translator(CachedWalks):
    """Translates virtual addresses of one address space (source, DTB, mode).

    `dtb` may be a raw CR3: PCID bits, the no-flush bit 63 and bits above
    MAXPHYADDR are dropped (see `dtb_from_cr3`; use `kernel_dtb` for a Linux
    PTI user CR3). `nxe` says whether EFER.NXE makes the XD bit count (always
    off in legacy mode, whose entries have no such bit); `pse` is CR4.PSE,
    which enables 4 MiB pages in legacy mode only. Physical bits of every
    entry are masked to `maxphyaddr`; reserved bits are not otherwise checked
    except PS where no large page can be (PML5, PML4, PAE PDPTE), which
    faults as the CPU would.
    """

    def __init__(
        self,
        source: PhysicalSource,
        dtb: int,
        mode: PagingMode,
        *,
        nxe: bool = True,
        maxphyaddr: int = 52,
        pse: bool = True,
        tlb_size: int = DEFAULT_TLB_SIZE,
        max_cached_tables: int = DEFAULT_MAX_CACHED_TABLES,
        max_mapping_work: int = DEFAULT_MAX_MAPPING_WORK,
    ) -> None:
        self.source = source
        self.mode = mode
        self.geometry = _geometry(mode, maxphyaddr, nxe, pse)
        self.dtb = dtb_from_cr3(dtb, mode, maxphyaddr)
        self.max_mapping_work = max_mapping_work
        self.reader = TableReader(source, mode.spec.entry_size, max_cached_tables=max_cached_tables)
        self._start_caches(tlb_size)

    @classmethod
    def from_registers(
        cls,
        source: PhysicalSource,
        regs: Registers | None = None,
        *,
        pti_kernel: bool = False,
        maxphyaddr: int = 52,
    ) -> Translator:
        """The translator for the address space the vCPU was in (CR3, mode, NXE, PSE).

        `regs` defaults to `source.registers()`. With `pti_kernel`, a Linux
        PTI user CR3 is turned into its kernel PGD (see `kernel_dtb`).
        """
        regs = source.registers() if regs is None else regs
        if regs.cr3 is None:
            raise TranslationError("the registers carry no CR3")
        mode = mode_from_registers(regs)
        dtb = kernel_dtb(regs.cr3, mode, maxphyaddr) if pti_kernel else regs.cr3
        return cls(
            source,
            dtb,
            mode,
            nxe=nxe_from_registers(regs),
            pse=pse_from_registers(regs),
            maxphyaddr=maxphyaddr,
        )

    # -- translation ------------------------------------------------------------------------
    def frames_after(self, page: Page, limit: int) -> list[int]:
        """Frames of the pages that follow `page` in its own table, up to `limit` bytes.

        The bulk path of reads: one look at the leaf table translates the
        next pages without a walk each (they share every upper-level entry
        with `page`). Stops at the table's end or at the first entry that is
        not a present leaf of the same size. Rights are not returned: a
        reader does not need them.
        """
        geo = self.geometry
        lvl = geo.by_name[page.level]
        esz = geo.entry_size
        size = page.size
        ea = page.entry_address
        table = ea - ea % lvl.table_size
        count = min(lvl.count - (ea - table) // esz - 1, -(-limit // size))
        if count <= 0:
            return []
        loc = self.reader.locate(table, lvl.table_size)
        if loc is None:
            return []
        buf, off = loc
        ents = self.reader.table_struct(count).unpack_from(buf, off + (ea - table) + esz)
        out: list[int] = []
        if lvl.last:
            amask = geo.address_mask
            for e in ents:
                if not e & 1:
                    break
                out.append(e & amask)
        else:
            for e in ents:
                if e & (PRESENT | PAGE_SIZE) != PRESENT | PAGE_SIZE:
                    break
                out.append(geo.large_frame(e, lvl))
        return out

    def walk(self, vaddr: int) -> Walk:
        """Every level's table, index, raw entry and flags for `vaddr`; faults are recorded."""
        self.sync()
        vaddr = operator.index(vaddr)
        steps: list[WalkStep] = []
        try:
            page = self._walk(vaddr, steps)
        except PageFault as fault:
            return Walk(vaddr, tuple(steps), None, fault)
        tr = Translation(vaddr, page.paddr + vaddr - page.vaddr, page)
        return Walk(vaddr, tuple(steps), tr, None)

    def _walk(self, vaddr: int, steps: list[WalkStep] | None) -> Page:
        """The page walk proper: at most one entry read per level, then a Page or a PageFault."""
        geo = self.geometry
        if (vaddr >> geo.top_shift) not in geo.valid_tops:
            why = (
                f"non-canonical address (bits 63:{geo.address_bits - 1} must all equal "
                f"bit {geo.address_bits - 1})"
                if geo.canonical
                else "address above 4 GiB in a 32-bit paging mode"
            )
            raise PageFault(vaddr, geo.levels[0].name, reason=why)
        unpack_from = self._unpack_entry
        esz = geo.entry_size
        amask = geo.address_mask
        nxe = geo.nxe
        seg_view = self._seg_view  # the only RAM segment, or None: then ask the reader
        seg_start, seg_len = self._seg_start, self._seg_len
        table = self.dtb
        rights = RIGHTS
        nx = 0
        for lvl, shift, index_mask, table_size, large_ok, last, perms, ps_reserved in geo.walk_plan:
            index = (vaddr >> shift) & index_mask
            eaddr = table + index * esz
            if seg_view is not None:
                off = table - seg_start
                if off < 0 or off + table_size > seg_len:
                    raise _outside(vaddr, lvl.name, table, eaddr)
                entry = unpack_from(seg_view, off + index * esz)[0]
            else:
                loc = self.reader.locate(table, table_size)
                if loc is None:
                    raise _outside(vaddr, lvl.name, table, eaddr)
                entry = unpack_from(loc[0], loc[1] + index * esz)[0]
            leaf = last or (large_ok and entry & PAGE_SIZE != 0)
            if steps is not None:
                steps.append(self._step(lvl, table, index, eaddr, entry, leaf and entry & 1 != 0))
            if not entry & 1:
                raise PageFault(vaddr, lvl.name, entry, eaddr, "not present")
            if perms:
                rights &= entry
                if nxe:
                    nx |= entry >> 63
            if leaf:
                size = 1 << shift
                return _tuple_new(
                    Page,
                    (
                        vaddr & -size,
                        entry & amask if last else geo.large_frame(entry, lvl),
                        size,
                        rights & 2 != 0,
                        rights & 4 != 0,
                        nx != 0,
                        entry & 0x100 != 0,
                        entry & 0x40 != 0,
                        entry & 0x20 != 0,
                        lvl.name,
                        entry,
                        eaddr,
                    ),
                )
            if ps_reserved and entry & PAGE_SIZE:
                raise PageFault(vaddr, lvl.name, entry, eaddr, "reserved bit set (PS)")
            table = entry & amask
        raise AssertionError("the last level always maps a page")  # pragma: no cover

    def _step(
        self, lvl: LevelGeometry, table: int, index: int, eaddr: int, entry: int, leaf: bool
    ) -> WalkStep:
        geo = self.geometry
        if leaf:
            target = entry & geo.address_mask if lvl.last else geo.large_frame(entry, lvl)
        else:
            target = entry & geo.address_mask
        flags = _decode_flags(
            entry,
            leaf=leaf,
            page_table=lvl.last,
            permissions=lvl.permissions,
            nx=geo.nxe,
        )
        return WalkStep(
            level=lvl.name,
            table=table,
            index=index,
            entry_address=eaddr,
            entry=entry,
            present=bool(entry & PRESENT),
            flags=flags,
            leaf=leaf,
            target=target,
            page_size=(1 << lvl.shift) if leaf else None,
        )

    # -- enumeration ------------------------------------------------------------------------
    def mappings(
        self, start: int = 0, end: int | None = None, *, max_work: int | None = None
    ) -> Iterator[Mapping]:
        """Coalesced runs of mapped memory within virtual [start, end), in address order.

        Whole tables are read at once and absent upper-level entries skip
        their whole span. Runs are clipped to [start, end). The work (tables
        visited plus leaf entries seen) is capped by `max_work` (default
        `max_mapping_work`): tables that alias each other, or point back at
        themselves, can describe 2**36 pages with a few KiB, and exceeding
        the cap raises GuestDataError instead of running for days.
        """
        from vmishell.arch.scan import scan_mappings

        self.sync()
        stop = self.geometry.space_end if end is None else end
        limit = self.max_mapping_work if max_work is None else max_work
        return scan_mappings(self, start, stop, limit)

    def run_arrays(
        self, start: int = 0, end: int | None = None, *, max_work: int | None = None
    ) -> RunArrays:
        """The runs `mappings()` yields, as numpy arrays (vaddr, paddr, size, flags).

        The bulk form for whole address spaces: page tables are decoded a
        batch at a time with vector operations and no object is built per
        run. Same clipping, work charges and cap as `mappings()`.
        """
        from vmishell.arch.runs import run_arrays

        self.sync()
        stop = self.geometry.space_end if end is None else end
        limit = self.max_mapping_work if max_work is None else max_work
        return run_arrays(self, start, stop, limit)

    def runs(
        self, start: int = 0, end: int | None = None, *, max_work: int | None = None
    ) -> list[tuple[int, int, int, bool, bool, bool]]:
        """`mappings()` as plain tuples (vaddr, paddr, size, writable, user, nx).

        `Mapping(*t)` turns one into a Mapping when it is wanted.
        """
        return self.run_arrays(start, end, max_work=max_work).tuples()

    def __repr__(self) -> str:
        return (
            f"<Translator {self.geometry.spec.name} dtb={self.dtb:#x} "
            f"over {self.source.description}>"
        )


@functools.lru_cache(maxsize=64)
def _geometry(mode: PagingMode, maxphyaddr: int, nxe: bool, pse: bool) -> Geometry:
    """One Geometry per setting, shared by translators: `processes()` makes one translator
    per process (for its cmdline), and building the per-level constants was a third of that."""
    return Geometry(mode, maxphyaddr=maxphyaddr, nxe=nxe, pse=pse)


def _outside(vaddr: int, level: str, table: int, eaddr: int) -> PageFault:
    """The fault for a table the guest placed beyond its RAM (hostile or corrupt entry)."""
    return PageFault(vaddr, level, None, eaddr, f"{level} table {table:#x} outside guest RAM")
