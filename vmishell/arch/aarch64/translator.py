"""AArch64 stage-1 translation of one EL1&0 address space: walk, TLB, enumeration.

One translator covers both halves of the regime as the MMU does: VA bit 55
selects TTBR0 (user, low half) or TTBR1 (kernel, high half); the bits above
the half's VA width must all equal bit 55, except bits 63:56 when top-byte
ignore (TBI) is on for that half. Each half is data (`HalfSpec`: granule,
levels, descriptor format) over one walker, which reads at most one
descriptor per level. Like the x86 `Translator`, results are cached per 4 KiB
of VA in a dict dropped when the source's generation changes, and the
interface (`translate`, `page`, `walk`, `mappings`, `run_arrays`, `runs`,
`frames_after`) is the same, so `AddressSpace` reads through either.

Rights are mapped onto `Page`/`Mapping` as a user-space caller needs them,
after the hierarchical APTable/UXNTable/PXNTable of every table on the way
(unless HPD), following AArch64.S1DirectBasePermissions:

- `user`: EL0 may access (AP[1], and no APTable[0] above);
- `writable`: the page may be written (AP[2] clear and no APTable[1] above;
  with TCR_EL1.HD, a DBM page counts as writable: the CPU sets AP[2] itself);
- `nx`: execute-never for whoever may access it: UXN (or UXNTable) for an
  EL0 page, PXN (or PXNTable) for a kernel-only page;
- `global_`: nG clear; `accessed`: AF (a page with AF clear still translates:
  Linux ages pages that way, and the CPU sets AF itself under TCR_EL1.HA);
  `dirty`: hardware dirty state (HD on, DBM set and AP[2] clear).

The arm64 bits themselves (AP, UXN, PXN, nG, AF, contiguous, table bits)
are in the walk trace (`WalkStep.flags` as Arm64Flags, `WalkStep.detail`).
The contiguous hint is shown but never changes a result.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from vmishell.arch.aarch64 import descriptors as d
from vmishell.arch.aarch64.geometry import Arm64Geometry
from vmishell.arch.aarch64.registers import settings_from_tcr, system_registers
from vmishell.arch.aarch64.spec import OA_LPA, OA_LPA2, ArmLevel, HalfSpec, half_spec, ttbr_base
from vmishell.arch.results import Mapping, Page, Translation, Walk, WalkStep
from vmishell.arch.results import _new as _new
from vmishell.arch.tables import DEFAULT_MAX_CACHED_TABLES, TableReader
from vmishell.arch.tlb import CachedWalks
from vmishell.arch.translator import DEFAULT_MAX_MAPPING_WORK, DEFAULT_TLB_SIZE
from vmishell.errors import PageFault, TranslationError
from vmishell.sources.base import PhysicalSource, Registers

if TYPE_CHECKING:
    from vmishell.arch.runs import RunArrays

_tuple_new = tuple.__new__
_U64 = (1 << 64) - 1


class _Half:
    """One TTBR region ready for walking: spec, top table and the hot loop's constants."""

    __slots__ = (
        "base",
        "by_name",
        "hi",
        "hier",
        "lo",
        "oa_format",
        "pa_bits",
        "plan",
        "spec",
        "table_mask",
        "top_mask",
        "top_want",
        "va_bits",
    )

    def __init__(self, spec: HalfSpec, ttbr: int) -> None:
        self.spec = spec
        self.base = ttbr_base(ttbr, spec)
        self.va_bits = spec.va_bits
        # vaddr >> va_bits, masked, must equal top_want (bit 55 repeated; 63:56 free with TBI).
        self.top_mask = (1 << ((56 if spec.tbi else 64) - spec.va_bits)) - 1
        self.top_want = self.top_mask if spec.half else 0
        self.hier = not spec.hpd
        self.oa_format = spec.oa_format
        self.pa_bits = spec.pa_bits
        self.lo, self.hi = spec.region
        self.by_name = {lvl.name: lvl for lvl in spec.levels}
        self.table_mask = spec.table_mask
        #: What the walker's loop unpacks per level.
        self.plan = tuple(
            (lvl, lvl.shift, lvl.index_mask, lvl.table_size, lvl.block_ok, lvl.last, lvl.out_mask)
            for lvl in spec.levels
        )


class Arm64Translator(CachedWalks):
    """Translates virtual addresses of one AArch64 EL1&0 address space (TTBR0 and/or TTBR1).

    `ttbr0`/`ttbr1` are TTBRn_EL1 values (a table's physical address is one:
    the ASID in bits 63:48 and CnP in bit 0 are dropped; with a 52-bit output
    format bits 5:2 hold address bits 51:48, see `ttbr_for_table`). A half
    whose TTBR is None is not translated (its addresses fault). `granule`
    and `va_bits` (64 - TnSZ) apply to both halves unless `granule1` /
    `va_bits1` give TTBR1's own. `lpa2` is TCR_EL1.DS (52-bit addresses with
    4/16 KiB granules); `pa_bits` the output size (TCR_EL1.IPS; 52 with a
    64 KiB granule is FEAT_LPA's descriptor format; default 52 with lpa2,
    else 48): output addresses at or above it are address-size faults.
    `tbi0`/`tbi1` are top-byte ignore (Linux: on for user space), `hpd0`/
    `hpd1` hierarchical permission disable, `hd` hardware dirty management.
    """

    def __init__(
        self,
        source: PhysicalSource,
        *,
        ttbr0: int | None = None,
        ttbr1: int | None = None,
        granule: int = 4096,
        va_bits: int = 48,
        granule1: int | None = None,
        va_bits1: int | None = None,
        lpa2: bool = False,
        pa_bits: int | None = None,
        tbi0: bool = False,
        tbi1: bool = False,
        hpd0: bool = False,
        hpd1: bool = False,
        hd: bool = False,
        tlb_size: int = DEFAULT_TLB_SIZE,
        max_cached_tables: int = DEFAULT_MAX_CACHED_TABLES,
        max_mapping_work: int = DEFAULT_MAX_MAPPING_WORK,
    ) -> None:
        if ttbr0 is None and ttbr1 is None:
            raise TranslationError("an AArch64 address space needs TTBR0, TTBR1 or both")
        pa = (52 if lpa2 else 48) if pa_bits is None else pa_bits
        spec0 = half_spec(0, granule, va_bits, ds=lpa2, pa_bits=pa, tbi=tbi0, hpd=hpd0)
        spec1 = half_spec(
            1,
            granule if granule1 is None else granule1,
            va_bits if va_bits1 is None else va_bits1,
            ds=lpa2,
            pa_bits=pa,
            tbi=tbi1,
            hpd=hpd1,
        )
        self.source = source
        self.hd = hd
        self.lpa2 = lpa2
        self.pa_bits = pa
        self._halves = (
            _Half(spec0, ttbr0) if ttbr0 is not None else None,
            _Half(spec1, ttbr1) if ttbr1 is not None else None,
        )
        self.geometry = Arm64Geometry(
            (spec0 if ttbr0 is not None else None, spec1 if ttbr1 is not None else None)
        )
        self.max_mapping_work = max_mapping_work
        self.reader = TableReader(source, 8, max_cached_tables=max_cached_tables)
        self._start_caches(tlb_size)

    @classmethod
    def from_tcr(
        cls,
        source: PhysicalSource,
        tcr: int,
        ttbr0: int | None,
        ttbr1: int | None,
        **kw: Any,
    ) -> Arm64Translator:
        """The translator the MMU would use with these TCR_EL1, TTBR0_EL1, TTBR1_EL1 values.

        A half switched off by EPD0/EPD1, or whose TTBR is None, faults.
        `kw` passes on the cache and work limits.
        """
        s = settings_from_tcr(tcr)
        enabled0, enabled1 = s.pop("enabled0"), s.pop("enabled1")
        return cls(
            source,
            ttbr0=ttbr0 if enabled0 else None,
            ttbr1=ttbr1 if enabled1 else None,
            **s,
            **kw,
        )

    @classmethod
    def from_registers(
        cls, source: PhysicalSource, regs: Registers | None = None, **kw: Any
    ) -> Arm64Translator:
        """The translator for the vCPU's EL1&0 space (`regs.extra`: TCR_EL1, TTBR0/1_EL1).

        `regs` defaults to `source.registers()`.
        """
        regs = source.registers() if regs is None else regs
        tcr, ttbr0, ttbr1 = system_registers(regs)
        return cls.from_tcr(source, tcr, ttbr0, ttbr1, **kw)

    @property
    def halves(self) -> tuple[HalfSpec | None, HalfSpec | None]:
        """The TTBR0 and TTBR1 halves' specs (None where that TTBR is not used)."""
        return self.geometry.halves

    def table_base(self, half: int) -> int | None:
        """Physical address of the top table of TTBR`half` (None when unused)."""
        h = self._halves[half]
        return None if h is None else h.base

    @property
    def dtb(self) -> int:
        """The top table of the user half if there is one, else the kernel's (for messages)."""
        h = self._halves[0] or self._halves[1]
        assert h is not None
        return h.base

    # -- translation ------------------------------------------------------------------------
    def translate_many(self, vaddrs: Iterator[int] | list[int]) -> list[Translation]:
        """`translate` of each address, in order (the first fault raises)."""
        return [self.translate(v) for v in vaddrs]

    def _half(self, vaddr: int) -> _Half:
        """The half VA bit 55 selects, after the range check (PageFault outside it)."""
        if not 0 <= vaddr <= _U64:
            raise PageFault(vaddr, "VA", reason="not a 64-bit virtual address")
        n = (vaddr >> 55) & 1
        h = self._halves[n]
        if h is None:
            raise PageFault(
                vaddr, f"TTBR{n}", reason=f"VA bit 55 selects TTBR{n}, which is not in use"
            )
        if (vaddr >> h.va_bits) & h.top_mask != h.top_want:
            hi = 55 if h.spec.tbi else 63
            want = "1" if n else "0"
            raise PageFault(
                vaddr,
                h.spec.levels[0].name,
                reason=(
                    f"outside TTBR{n}'s {h.va_bits}-bit range (bits {hi}:{h.va_bits} must all be "
                    f"{want}{', top byte ignored' if h.spec.tbi else ''})"
                ),
            )
        return h

    def _walk(self, vaddr: int, steps: list[WalkStep] | None) -> Page:
        """The walk proper: at most one descriptor per level, then a Page or a PageFault."""
        h = self._half(vaddr)
        unpack_from = self._unpack_entry
        seg_view = self._seg_view
        seg_start, seg_len = self._seg_start, self._seg_len
        oa_format = h.oa_format
        pa_bits = h.pa_bits
        hier = h.hier
        table = h.base
        table_mask = h.table_mask
        acc = 0  # hierarchical restrictions: PXNTable 1, UXNTable 2, no EL0 4, read-only 8
        for lvl, shift, index_mask, table_size, block_ok, last, out_mask in h.plan:
            index = (vaddr >> shift) & index_mask
            eaddr = table + index * 8
            if seg_view is not None:
                off = table - seg_start
                if off < 0 or off + table_size > seg_len:
                    raise _outside(vaddr, lvl.name, table, eaddr)
                e = unpack_from(seg_view, off + index * 8)[0]
            else:
                loc = self.reader.locate(table, table_size)
                if loc is None:
                    raise _outside(vaddr, lvl.name, table, eaddr)
                e = unpack_from(loc[0], loc[1] + index * 8)[0]
            kind = e & 3
            if steps is not None:
                steps.append(self._step(h, lvl, table, index, eaddr, e, len(steps) == 0))
            if not e & 1:
                raise PageFault(vaddr, lvl.name, e, eaddr, "invalid descriptor (bit 0 clear)")
            if last:
                if kind != 3:
                    raise PageFault(
                        vaddr, lvl.name, e, eaddr, "reserved descriptor (bits[1:0] = 01 at level 3)"
                    )
            elif kind == 1 and not block_ok:
                raise PageFault(
                    vaddr,
                    lvl.name,
                    e,
                    eaddr,
                    f"block descriptor not allowed at level {lvl.number} "
                    f"with a {h.spec.granule >> 10} KiB granule",
                )
            # Output address (next table, block or page).
            oa = e & out_mask if (last or kind == 1) else e & table_mask
            if oa_format == OA_LPA2:
                oa |= (e & 0x300) << 42
            elif oa_format == OA_LPA:
                oa |= (e & 0xF000) << 36
            if oa >> pa_bits:
                raise PageFault(
                    vaddr,
                    lvl.name,
                    e,
                    eaddr,
                    f"address size fault: output address {oa:#x} above {pa_bits} bits",
                )
            if last or kind == 1:
                ap = e >> 6
                user = ap & 1 != 0 and not acc & 4
                writable = not acc & 8 and (not ap & 2 or (self.hd and e & d.DBM != 0))
                nx = (e & d.UXN != 0 or acc & 2 != 0) if user else (e & d.PXN != 0 or acc & 1 != 0)
                size = 1 << shift
                return _tuple_new(
                    Page,
                    (
                        vaddr & -size,
                        oa,
                        size,
                        writable,
                        user,
                        nx,
                        not e & d.NG,
                        self.hd and e & d.DBM != 0 and not ap & 2,
                        e & d.AF != 0,
                        lvl.name,
                        e,
                        eaddr,
                    ),
                )
            if hier:
                acc |= (e >> 59) & 0xF
            table = oa
        raise AssertionError("level 3 always ends the walk")  # pragma: no cover

    def _step(
        self, h: _Half, lvl: ArmLevel, table: int, index: int, eaddr: int, e: int, first: bool
    ) -> WalkStep:
        kind = e & 3
        valid = bool(e & 1)
        leaf = valid and ((lvl.last and kind == 3) or (not lvl.last and kind == 1 and lvl.block_ok))
        mask = lvl.out_mask if (leaf or (kind == 1 and not lvl.last)) else h.table_mask
        target = e & mask
        if h.oa_format == OA_LPA2:
            target |= (e & 0x300) << 42
        elif h.oa_format == OA_LPA:
            target |= (e & 0xF000) << 36
        ds = h.oa_format == OA_LPA2
        detail = d.describe(e, leaf=leaf, last=lvl.last, ds=ds, hpd=not h.hier)
        if first:
            detail = f"{h.spec.describe()}; {detail}"
        return WalkStep(
            level=lvl.name,
            table=table,
            index=index,
            entry_address=eaddr,
            entry=e,
            present=valid,
            flags=d.decode_flags(e, leaf=leaf, last=lvl.last, ds=ds, hpd=not h.hier),
            leaf=leaf,
            target=target,
            page_size=lvl.span if leaf else None,
            detail=detail,
        )

    def walk(self, vaddr: int) -> Walk:
        """Every level's table, index, descriptor and decoded bits for `vaddr`; faults recorded."""
        self.sync()
        vaddr = operator.index(vaddr)
        steps: list[WalkStep] = []
        try:
            page = self._walk(vaddr, steps)
        except PageFault as fault:
            return Walk(vaddr, tuple(steps), None, fault)
        return Walk(
            vaddr, tuple(steps), Translation(vaddr, page.paddr + vaddr - page.vaddr, page), None
        )

    def frames_after(self, page: Page, limit: int) -> list[int]:
        """Frames of the leaves that follow `page` in its own table, up to `limit` bytes.

        The bulk path of reads (see the x86 `Translator.frames_after`): stops
        at the table's end or the first descriptor that is not a valid leaf of
        the same kind, or whose output address faults.
        """
        h = self._halves[(page.vaddr >> 55) & 1]
        if h is None:
            return []
        lvl = h.by_name.get(page.level)
        if lvl is None:
            return []
        size = page.size
        ea = page.entry_address
        tsize = lvl.table_size
        table = ea - ea % tsize
        count = min(lvl.entries - (ea - table) // 8 - 1, -(-limit // size))
        if count <= 0:
            return []
        loc = self.reader.locate(table, tsize)
        if loc is None:
            return []
        buf, off = loc
        ents = self.reader.table_struct(count).unpack_from(buf, off + (ea - table) + 8)
        want = 3 if lvl.last else 1
        mask = lvl.out_mask
        oa_format, pa_bits = h.oa_format, h.pa_bits
        out: list[int] = []
        for e in ents:
            if e & 3 != want:
                break
            oa = e & mask
            if oa_format == OA_LPA2:
                oa |= (e & 0x300) << 42
            elif oa_format == OA_LPA:
                oa |= (e & 0xF000) << 36
            if oa >> pa_bits:
                break
            out.append(oa)
        return out

    # -- enumeration ------------------------------------------------------------------------
    def mappings(
        self, start: int = 0, end: int | None = None, *, max_work: int | None = None
    ) -> Iterator[Mapping]:
        """Coalesced runs of mapped memory within virtual [start, end), in address order.

        Untagged addresses only (TBI aliases are not repeated). Same clipping,
        work charges and cap (GuestDataError) as the x86 `Translator.mappings`.
        """
        from vmishell.arch.aarch64.scan import scan_mappings

        self.sync()
        stop = 1 << 64 if end is None else end
        limit = self.max_mapping_work if max_work is None else max_work
        return scan_mappings(self, start, stop, limit)

    def run_arrays(
        self, start: int = 0, end: int | None = None, *, max_work: int | None = None
    ) -> RunArrays:
        """The runs `mappings()` yields, as numpy arrays (vaddr, paddr, size, flags)."""
        from vmishell.arch.aarch64.scan import scan_arrays

        self.sync()
        stop = 1 << 64 if end is None else end
        limit = self.max_mapping_work if max_work is None else max_work
        return scan_arrays(self, start, stop, limit)

    def runs(
        self, start: int = 0, end: int | None = None, *, max_work: int | None = None
    ) -> list[tuple[int, int, int, bool, bool, bool]]:
        """`mappings()` as plain tuples (vaddr, paddr, size, writable, user, nx)."""
        return self.run_arrays(start, end, max_work=max_work).tuples()

    def __repr__(self) -> str:
        halves = "; ".join(
            f"{h.spec.describe()} at {h.base:#x}" for h in self._halves if h is not None
        )
        return f"<Arm64Translator {halves} over {self.source.description}>"


def ttbr_for_table(paddr: int, *, lpa52: bool = False) -> int:
    """The TTBRn_EL1 value designating a top table at `paddr` (ASID 0, as Linux's phys_to_ttbr).

    With a 52-bit output format (`lpa52`), address bits 51:48 go to bits 5:2.
    """
    if lpa52:
        return (paddr & 0x0000_FFFF_FFFF_FFC0) | ((paddr >> 48) & 0xF) << 2
    return paddr & 0x0000_FFFF_FFFF_FFFF


def _outside(vaddr: int, level: str, table: int, eaddr: int) -> PageFault:
    return PageFault(vaddr, level, None, eaddr, f"{level} table {table:#x} outside guest RAM")
