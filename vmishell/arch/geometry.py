"""A paging mode specialised for one translator: masks and per-level constants.

The generic `ModeSpec` says what a mode is; a `Geometry` folds in the
translator's settings (MAXPHYADDR, NXE, PSE) and precomputes everything the
hot loops would otherwise recompute per entry: the address masks, which
levels may end in a large page, which treat the PS bit as reserved, and how
canonical addresses map onto the tables' linear index space.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmishell.arch.entries import NX
from vmishell.arch.modes import ModeSpec, PagingMode
from vmishell.errors import TranslationError

_PAGE_MASK = ~0xFFF


@dataclass(frozen=True, slots=True)
class LevelGeometry:
    """One level with the translator's settings folded in."""

    name: str
    shift: int
    index_mask: int
    count: int
    table_size: int
    #: A present entry with PS set ends the walk with a page of `1 << shift`.
    large_ok: bool
    #: PS set here is a reserved-bit violation (PML4/PML5, PAE PDPTE).
    ps_reserved: bool
    #: Entries carry R/W, U/S and XD.
    permissions: bool
    #: The last level: every present entry maps a 4 KiB page.
    last: bool
    #: Frame bits of a large page mapped at this level (MAXPHYADDR applied).
    large_frame_mask: int

    @property
    def span(self) -> int:
        return 1 << self.shift


class Geometry:
    """Per-translator constants shared by the walker, the scanner and the reader."""

    def __init__(
        self, mode: PagingMode, *, maxphyaddr: int = 52, nxe: bool = True, pse: bool = True
    ) -> None:
        if not 32 <= maxphyaddr <= 52:
            raise TranslationError(f"MAXPHYADDR must be within 32..52, not {maxphyaddr}")
        spec: ModeSpec = mode.spec
        self.mode = mode
        self.spec = spec
        self.maxphyaddr = maxphyaddr
        self.nxe = nxe and spec.nx_capable
        self.pse = pse
        self.entry_size = spec.entry_size
        width = min(maxphyaddr, spec.max_entry_address_bits)
        #: Frame bits of an entry pointing at a table or a 4 KiB page.
        self.address_mask = ((1 << width) - 1) & _PAGE_MASK
        self.nx_mask = NX if self.nxe else 0
        legacy = mode is PagingMode.LEGACY
        #: PSE-36: a legacy 4 MiB PDE keeps physical bits 39:32 in its bits 20:13.
        self.pse36_bits = max(0, min(maxphyaddr, 40) - 32) if legacy else 0
        levels = []
        for lvl in spec.levels:
            last = lvl is spec.levels[-1]
            large_ok = lvl.large_page and (pse or not legacy)
            levels.append(
                LevelGeometry(
                    name=lvl.name,
                    shift=lvl.shift,
                    index_mask=lvl.index_mask,
                    count=lvl.entries,
                    table_size=lvl.entries * spec.entry_size,
                    large_ok=large_ok,
                    ps_reserved=not legacy and not last and not lvl.large_page,
                    permissions=lvl.permissions,
                    last=last,
                    large_frame_mask=self.address_mask & ~(lvl.span - 1),
                )
            )
        self.levels: tuple[LevelGeometry, ...] = tuple(levels)
        #: What the walker's loop unpacks per level (tuple unpacking beats attribute reads).
        self.walk_plan = tuple(
            (
                lvl,
                lvl.shift,
                lvl.index_mask,
                lvl.table_size,
                lvl.large_ok,
                lvl.last,
                lvl.permissions,
                lvl.ps_reserved,
            )
            for lvl in self.levels
        )
        self.by_name = {lvl.name: lvl for lvl in self.levels}
        bits = spec.address_bits
        self.address_bits = bits
        self.canonical = spec.canonical
        #: vaddr >> top_shift must be one of these for the address to be walkable.
        if spec.canonical:
            self.top_shift = bits - 1
            self.valid_tops: tuple[int, ...] = (0, (1 << (65 - bits)) - 1)
            #: Added to a linear index-space address in the upper half to sign-extend it.
            self.high_offset = (1 << 64) - (1 << bits)
            self.high_start = (1 << 64) - (1 << (bits - 1))
            self.low_end = 1 << (bits - 1)
        else:
            self.top_shift = bits
            self.valid_tops = (0,)
            self.high_offset = 0
            self.high_start = 1 << bits
            self.low_end = 1 << bits
        self.space_end = spec.address_space_end

    def large_frame(self, entry: int, level: LevelGeometry) -> int:
        """Physical base of the large page a PS entry maps (PSE-36 aware)."""
        frame = entry & level.large_frame_mask
        if self.pse36_bits:
            frame |= ((entry >> 13) & ((1 << self.pse36_bits) - 1)) << 32
        return frame

    def is_walkable(self, vaddr: int) -> bool:
        """Whether `vaddr` is canonical (64-bit) or below 4 GiB (32-bit)."""
        return (vaddr >> self.top_shift) in self.valid_tops

    def linear_ranges(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """Split virtual [start, end) into (lo, hi, offset) runs of the tables' index space.

        Canonical addresses of the upper half are walked as their low
        `address_bits` bits; `offset` turns such an index-space address back
        into the virtual address (sign extension). The non-canonical gap is
        dropped.
        """
        start = max(start, 0)
        end = min(end, self.space_end)
        out = []
        lo, hi = start, min(end, self.low_end)
        if lo < hi:
            out.append((lo, hi, 0))
        if self.canonical:
            lo, hi = max(start, self.high_start), end
            if lo < hi:
                out.append((lo - self.high_offset, hi - self.high_offset, self.high_offset))
        return out

    def hole_end(self, vaddr: int, level_name: str | None) -> int:
        """Where a fault at `vaddr` stops applying: end of the faulting entry's span.

        A non-canonical address faults up to the next walkable one; past the
        top of the address space, the hole never ends (a value above `vaddr`
        and any real request).
        """
        if not self.is_walkable(vaddr):
            if vaddr < 0:
                return 0
            if vaddr < self.high_start:
                return self.high_start
            return 1 << max(65, vaddr.bit_length() + 1)
        lvl = self.by_name.get(level_name or "")
        span = lvl.span if lvl is not None else 1 << 12
        return (vaddr | (span - 1)) + 1
