"""The x86 paging modes as data, so that one walker serves all four.

Each mode is a list of levels (name, which virtual-address bits index it,
whether a large page may end the walk there, whether its entries carry
permissions) plus the entry size and the linear-address width. Everything
mode-specific that the walker needs is here; nothing else branches on the
mode except the legacy PSE-36 quirk.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True, slots=True)
class Level:
    """One paging level: the table kind whose entry the walk reads next.

    `shift` is the lowest virtual-address bit that indexes this level, so one
    entry covers `1 << shift` bytes and a large page ending here has that size.
    `permissions` is False for PAE page-directory-pointer entries, which have
    no R/W, U/S or XD bits (the CPU treats them as fully permissive).
    """

    name: str
    shift: int
    bits: int
    large_page: bool
    permissions: bool = True

    @property
    def entries(self) -> int:
        """How many entries a table of this level holds."""
        return 1 << self.bits

    @property
    def span(self) -> int:
        """Bytes of virtual address space one entry covers."""
        return 1 << self.shift

    @property
    def index_mask(self) -> int:
        return (1 << self.bits) - 1


@dataclass(frozen=True, slots=True)
class ModeSpec:
    """Everything the walker needs to know about a paging mode.

    `address_bits` is the linear-address width the tables cover (32, 48, 57);
    `canonical` says whether addresses above it are sign-extended (64-bit
    modes) rather than simply out of range (32-bit modes). `cr3_mask` keeps
    the CR3 bits that locate the top table before MAXPHYADDR is applied.
    `max_entry_address_bits` caps MAXPHYADDR for the entry format (32 for
    4-byte legacy entries, 52 otherwise).
    """

    name: str
    entry_size: int
    levels: tuple[Level, ...]
    address_bits: int
    canonical: bool
    nx_capable: bool
    cr3_mask: int
    max_entry_address_bits: int

    @property
    def entry_format(self) -> str:
        """struct format of one little-endian entry."""
        return "<I" if self.entry_size == 4 else "<Q"

    @property
    def top_table_size(self) -> int:
        """Bytes of the table CR3 points at (32 for the PAE PDPT)."""
        return self.levels[0].entries * self.entry_size

    @property
    def address_space_end(self) -> int:
        """One past the highest virtual address (2**32 or 2**64)."""
        return 1 << 64 if self.canonical else 1 << self.address_bits

    def level(self, name: str) -> Level:
        """The level called `name` (KeyError when the mode has none)."""
        for lvl in self.levels:
            if lvl.name == name:
                return lvl
        raise KeyError(name)


_LOW12 = 0xFFF

LEGACY_SPEC = ModeSpec(
    name="legacy 32-bit",
    entry_size=4,
    levels=(Level("PD", 22, 10, True), Level("PT", 12, 10, False)),
    address_bits=32,
    canonical=False,
    nx_capable=False,
    cr3_mask=0xFFFF_F000,
    max_entry_address_bits=32,
)

PAE_SPEC = ModeSpec(
    name="PAE",
    entry_size=8,
    levels=(
        Level("PDPT", 30, 2, False, permissions=False),
        Level("PD", 21, 9, True),
        Level("PT", 12, 9, False),
    ),
    address_bits=32,
    canonical=False,
    nx_capable=True,
    # The PDPT is 32-byte aligned; CR3 is a 32-bit register in PAE mode.
    cr3_mask=0xFFFF_FFE0,
    max_entry_address_bits=52,
)

_LONG_LEVELS = (
    Level("PML4", 39, 9, False),
    Level("PDPT", 30, 9, True),
    Level("PD", 21, 9, True),
    Level("PT", 12, 9, False),
)

LEVEL4_SPEC = ModeSpec(
    name="IA-32e 4-level",
    entry_size=8,
    levels=_LONG_LEVELS,
    address_bits=48,
    canonical=True,
    nx_capable=True,
    # Drops the PCID (bits 11:0) and the no-flush bit 63; MAXPHYADDR does the rest.
    cr3_mask=((1 << 63) - 1) & ~_LOW12,
    max_entry_address_bits=52,
)

LEVEL5_SPEC = ModeSpec(
    name="IA-32e 5-level (LA57)",
    entry_size=8,
    levels=(Level("PML5", 48, 9, False), *_LONG_LEVELS),
    address_bits=57,
    canonical=True,
    nx_capable=True,
    cr3_mask=((1 << 63) - 1) & ~_LOW12,
    max_entry_address_bits=52,
)


class PagingMode(Enum):
    """The four x86 paging modes vmishell walks."""

    LEGACY = "legacy"
    PAE = "pae"
    LEVEL4 = "level4"
    LEVEL5 = "level5"

    @property
    def spec(self) -> ModeSpec:
        """The mode's levels, entry size and address width."""
        return _SPECS[self]


_SPECS = {
    PagingMode.LEGACY: LEGACY_SPEC,
    PagingMode.PAE: PAE_SPEC,
    PagingMode.LEVEL4: LEVEL4_SPEC,
    PagingMode.LEVEL5: LEVEL5_SPEC,
}
