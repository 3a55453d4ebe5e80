"""AArch64 stage-1 page tables written in bytes, straight from the ARM ARM's layout.

Deliberately independent of vmishell's walker: the geometry (levels of
`granule_shift - 3` index bits each, the top one taking what is left of the
VA width) and the descriptor bits are spelled out here, so a test that
locates a kernel through these tables checks the walker too.
"""

from __future__ import annotations

from collections.abc import Callable

VALID, TABLE_OR_PAGE = 1 << 0, 1 << 1
AF = 1 << 10
AP_EL0 = 1 << 6
AP_RO = 1 << 7
NG = 1 << 11
PXN, UXN = 1 << 53, 1 << 54
ATTR_NORMAL = 0 << 2  # AttrIndx 0
_OA = ((1 << 48) - 1) & ~0xFFF


class Arm64Tables:
    """One translation table tree (one TTBR) in `ram`, which starts at physical `ram_base`.

    The top table is at `top` (zeroed by the caller) or allocated; lower tables
    are allocated, one granule each.
    """

    def __init__(
        self,
        ram: bytearray,
        ram_base: int,
        granule: int,
        va_bits: int,
        allocate: Callable[[int], int],
        top: int | None = None,
    ) -> None:
        self.ram, self.ram_base = ram, ram_base
        self.granule = granule
        self.page_shift = granule.bit_length() - 1
        self.stride = self.page_shift - 3
        self.va_bits = va_bits
        count = -(-(va_bits - self.page_shift) // self.stride)
        #: (lowest VA bit, index bits) of each level, top first.
        self.levels = [
            (self.page_shift + self.stride * (count - 1 - i), self.stride) for i in range(count)
        ]
        top_shift = self.levels[0][0]
        self.levels[0] = (top_shift, va_bits - top_shift)
        self.allocate = allocate
        self.top = allocate(max(8 << self.levels[0][1], 64)) if top is None else top

    def _entry_address(self, table: int, vaddr: int, level: int) -> int:
        shift, bits = self.levels[level]
        return table + 8 * ((vaddr >> shift) & ((1 << bits) - 1))

    def _get(self, paddr: int) -> int:
        off = paddr - self.ram_base
        return int.from_bytes(self.ram[off : off + 8], "little")

    def _set(self, paddr: int, value: int) -> None:
        off = paddr - self.ram_base
        self.ram[off : off + 8] = value.to_bytes(8, "little")

    def map(self, vaddr: int, paddr: int, size: int, *, user: bool = False, attrs: int = 0) -> None:
        """Map [vaddr, vaddr+size) with pages, or with blocks where `size` is a block's."""
        last = len(self.levels) - 1
        level = next(i for i, (shift, _) in enumerate(self.levels) if size == 1 << shift)
        leaf = paddr | AF | ATTR_NORMAL | attrs | (AP_EL0 if user else UXN)
        leaf |= VALID | (TABLE_OR_PAGE if level == last else 0)
        table = self.top
        for i in range(level):
            ea = self._entry_address(table, vaddr, i)
            entry = self._get(ea)
            if not entry & VALID:
                nxt = self.allocate(self.granule)
                self._set(ea, nxt | VALID | TABLE_OR_PAGE)
                table = nxt
            else:
                table = entry & _OA & ~(self.granule - 1)
        self._set(self._entry_address(table, vaddr, level), leaf)

    def map_range(self, vaddr: int, paddr: int, size: int, step: int, **kw: bool | int) -> None:
        for off in range(0, size, step):
            self.map(vaddr + off, paddr + off, step, **kw)  # type: ignore[arg-type]
