"""The shape of an AArch64 EL1&0 address space: which addresses each half translates.

What `AddressSpace` (holes to skip when padding) and the scanner (ranges to
enumerate) ask of a translator's `geometry`, for the two TTBR halves: a VA
is walkable when the bits above its half's width all equal bit 55, the top
byte excepted where TBI is on.
"""

from __future__ import annotations

from vmishell.arch.aarch64.spec import HalfSpec, half_spec

_U64 = (1 << 64) - 1


class Arm64Geometry:
    """The address-space shape `AddressSpace` and the scanner ask about (both halves)."""

    entry_size = 8
    space_end = 1 << 64

    def __init__(self, halves: tuple[HalfSpec | None, HalfSpec | None]) -> None:
        self.halves = halves

    def half_of(self, vaddr: int) -> HalfSpec | None:
        """The half that VA bit 55 selects (None when that TTBR is not in use)."""
        return self.halves[(vaddr >> 55) & 1]

    def _spec_for(self, half: int) -> HalfSpec:
        """The half's spec, or a placeholder giving its default range (48 bits)."""
        spec = self.halves[half]
        if spec is not None:
            return spec
        other = self.halves[1 - half]
        return half_spec(half, 4096, other.va_bits if other else 48)

    def is_walkable(self, vaddr: int) -> bool:
        """Whether `vaddr` lies in either half's range (tags allowed where TBI is on)."""
        if not 0 <= vaddr <= _U64:
            return False
        spec = self._spec_for((vaddr >> 55) & 1)
        top_mask = (1 << ((56 if spec.tbi else 64) - spec.va_bits)) - 1
        return (vaddr >> spec.va_bits) & top_mask == (top_mask if spec.half else 0)

    def linear_ranges(self, start: int, end: int) -> list[tuple[int, int, HalfSpec]]:
        """The untagged parts of [start, end) each half translates, as (lo, hi, spec)."""
        out: list[tuple[int, int, HalfSpec]] = []
        for spec in self.halves:
            if spec is None:
                continue
            lo, hi = spec.region
            lo, hi = max(lo, start), min(hi, end)
            if lo < hi:
                out.append((lo, hi, spec))
        return out

    def _regions(self, tag: int) -> list[tuple[int, int]]:
        """The walkable [lo, hi) ranges with top byte `tag` (both halves' ranges)."""
        out = []
        base = tag << 56
        for half in (0, 1):
            spec = self._spec_for(half)
            if not spec.tbi and tag != (0xFF if half else 0):
                continue
            size = 1 << spec.va_bits
            out.append(
                (base, base + size) if half == 0 else (base + (1 << 56) - size, base + (1 << 56))
            )
        return out

    def hole_end(self, vaddr: int, level_name: str | None) -> int:
        """Where a fault at `vaddr` stops applying: the end of the faulting entry's span.

        Outside both ranges, the next walkable address; in a half with no
        TTBR, the end of that half's range; past the top, never.
        """
        if not self.is_walkable(vaddr):
            if vaddr < 0:
                return 0
            tag = vaddr >> 56
            starts = [lo for t in (tag, tag + 1, 0xFF) if t <= 0xFF for lo, _ in self._regions(t)]
            after = [lo for lo in starts if lo > vaddr]
            return min(after) if after else 1 << max(65, vaddr.bit_length() + 1)
        spec = self.half_of(vaddr)
        if spec is not None:
            lvl = next((lv for lv in spec.levels if lv.name == level_name), None)
            if lvl is not None:
                return (vaddr | (lvl.span - 1)) + 1
        # A half without TTBR (or a fault before any level): to the end of its tagged range.
        tag = vaddr >> 56
        for lo, hi in self._regions(tag):
            if lo <= vaddr < hi:
                return hi
        return (vaddr | 0xFFF) + 1  # pragma: no cover - walkable addresses are in a region
