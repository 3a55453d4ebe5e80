"""What a page walk produces: translations, walk traces and coalesced mappings.

These are frozen values so they can be cached, compared and shown in a
notebook without anyone mutating a shared TLB entry. Hot paths build them
by setting their slots directly (`_slot_setter`, `fast_mapping`): a frozen dataclass's
own `__init__` costs ~80 ns per field, which alone would halve warm
translate() throughput.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntFlag
from typing import Any, NamedTuple

from vmishell.errors import PageFault


class EntryFlags(IntFlag):
    """Decoded bits of a paging-structure entry, named for what they do.

    Bit 7 means PAGE_SIZE in a directory entry but PAT in a page-table entry,
    and a large page keeps PAT in bit 12; `WalkStep.flags` already resolves
    that, so PAT is reported under one name wherever it lives.
    """

    PRESENT = 1 << 0
    WRITABLE = 1 << 1
    USER = 1 << 2
    WRITE_THROUGH = 1 << 3
    CACHE_DISABLE = 1 << 4
    ACCESSED = 1 << 5
    DIRTY = 1 << 6
    PAGE_SIZE = 1 << 7
    GLOBAL = 1 << 8
    PAT = 1 << 12
    NX = 1 << 63


class Arm64Flags(IntFlag):
    """Decoded bits of an AArch64 stage-1 descriptor, named for what they do.

    Not bit positions: a table descriptor's bits 63:59 (NSTable, APTable,
    UXNTable, PXNTable) and a leaf's (PBHA, software) share places, so each
    meaning gets its own flag. AP_EL0 is AP[1] (EL0 may access), AP_RO is
    AP[2] (read-only); the *_TABLE flags restrict everything below the table.
    """

    VALID = 1 << 0
    TABLE = 1 << 1
    BLOCK = 1 << 2
    PAGE = 1 << 3
    AP_EL0 = 1 << 4
    AP_RO = 1 << 5
    AF = 1 << 6
    NG = 1 << 7
    CONTIGUOUS = 1 << 8
    PXN = 1 << 9
    UXN = 1 << 10
    DBM = 1 << 11
    GP = 1 << 12
    NS = 1 << 13
    PXN_TABLE = 1 << 14
    UXN_TABLE = 1 << 15
    AP_TABLE_NO_EL0 = 1 << 16
    AP_TABLE_RO = 1 << 17
    NS_TABLE = 1 << 18


class Page(NamedTuple):
    """One TLB entry: a whole mapped page and its effective permissions.

    `vaddr`/`paddr` are the page's base addresses; `writable`, `user`, `nx`
    are accumulated over every level like the CPU does; `global_`, `dirty`,
    `accessed` come from the leaf entry, whose level name, raw value and
    physical address are kept for error messages and teaching. A tuple so a
    cold walk can build one in ~100 ns.
    """

    vaddr: int
    paddr: int
    size: int
    writable: bool
    user: bool
    nx: bool
    global_: bool
    dirty: bool
    accessed: bool
    level: str
    entry: int
    entry_address: int


@dataclass(frozen=True, slots=True)
class Translation:
    """A virtual address resolved to a physical one, with its page's rights.

    The per-page facts live in `page` (shared with the TLB); the properties
    expose them under the names a reader expects.
    """

    vaddr: int
    paddr: int
    page: Page

    @property
    def page_size(self) -> int:
        return self.page.size

    @property
    def writable(self) -> bool:
        return self.page.writable

    @property
    def user(self) -> bool:
        return self.page.user

    @property
    def nx(self) -> bool:
        return self.page.nx

    @property
    def global_(self) -> bool:
        return self.page.global_

    @property
    def dirty(self) -> bool:
        return self.page.dirty

    @property
    def accessed(self) -> bool:
        return self.page.accessed

    @property
    def level(self) -> str:
        """The paging level whose entry mapped the page ("PT", "PD", ...)."""
        return self.page.level

    def __repr__(self) -> str:
        rights = ("w" if self.writable else "r") + ("u" if self.user else "k")
        rights += "-" if self.nx else "x"
        return (
            f"Translation({self.vaddr:#x} -> {self.paddr:#x}, "
            f"{_size_name(self.page_size)} {rights})"
        )


@dataclass(frozen=True, slots=True)
class WalkStep:
    """One level of a page walk: which table, which slot, what it held.

    `target` is the physical address the entry designates (next table or
    page frame); `page_size` is set when the entry is the leaf. `flags` are
    EntryFlags on x86 and Arm64Flags on AArch64, where `detail` spells the
    descriptor's fields out (AP, AttrIndx, shareability, hints).
    """

    level: str
    table: int
    index: int
    entry_address: int
    entry: int
    present: bool
    flags: EntryFlags | Arm64Flags
    leaf: bool
    target: int
    page_size: int | None = None
    detail: str = ""

    def __str__(self) -> str:
        kind = f"page {_size_name(self.page_size)}" if self.page_size else "table"
        where = f"{kind} {self.target:#x}" if self.present else "not present"
        return (
            f"{self.level:<5} table {self.table:#x} [{self.index:3d}] "
            f"@ {self.entry_address:#x} = {self.entry:#018x}  {where}  {_flag_text(self.flags)}"
            + (f"  ({self.detail})" if self.detail else "")
        )


@dataclass(frozen=True, slots=True)
class Walk:
    """The whole trace of translating `vaddr`: steps, then a result or a fault."""

    vaddr: int
    steps: tuple[WalkStep, ...]
    translation: Translation | None
    fault: PageFault | None

    @property
    def ok(self) -> bool:
        return self.translation is not None

    def __str__(self) -> str:
        lines = [f"walk of {self.vaddr:#x}"]
        lines += [f"  {step}" for step in self.steps]
        if self.translation is not None:
            lines.append(f"  => {self.translation!r}")
        elif self.fault is not None:
            lines.append(f"  => {self.fault}")
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Mapping:
    """A run of virtual memory mapped contiguously onto physical memory.

    Runs are coalesced over consecutive pages whose virtual and physical
    addresses both follow on and whose effective rights are equal, whatever
    their page sizes.
    """

    vaddr: int
    paddr: int
    size: int
    writable: bool
    user: bool
    nx: bool

    @property
    def end(self) -> int:
        """One past the last virtual address of the run."""
        return self.vaddr + self.size

    def __contains__(self, vaddr: object) -> bool:
        return isinstance(vaddr, int) and self.vaddr <= vaddr < self.vaddr + self.size

    def __repr__(self) -> str:
        rights = ("w" if self.writable else "r") + ("u" if self.user else "k")
        rights += "-" if self.nx else "x"
        return f"Mapping({self.vaddr:#x}-{self.end:#x} -> {self.paddr:#x}, {rights})"


# -- fast constructors for the hot paths ------------------------------------------------

_new = object.__new__


def _slot_setter(cls: type, name: str) -> Callable[[object, Any], None]:
    """The slot descriptor's setter: writes a field of a frozen instance being built."""
    setter: Callable[[object, Any], None] = vars(cls)[name].__set__
    return setter


_set_t_vaddr = _slot_setter(Translation, "vaddr")
_set_t_paddr = _slot_setter(Translation, "paddr")
_set_t_page = _slot_setter(Translation, "page")
_set_m_vaddr = _slot_setter(Mapping, "vaddr")
_set_m_paddr = _slot_setter(Mapping, "paddr")
_set_m_size = _slot_setter(Mapping, "size")
_set_m_writable = _slot_setter(Mapping, "writable")
_set_m_user = _slot_setter(Mapping, "user")
_set_m_nx = _slot_setter(Mapping, "nx")


def fast_mapping(
    vaddr: int, paddr: int, size: int, writable: bool, user: bool, nx: bool
) -> Mapping:
    """Build a Mapping without the frozen dataclass's per-field overhead."""
    m = _new(Mapping)
    _set_m_vaddr(m, vaddr)
    _set_m_paddr(m, paddr)
    _set_m_size(m, size)
    _set_m_writable(m, writable)
    _set_m_user(m, user)
    _set_m_nx(m, nx)
    return m


def _size_name(size: int | None) -> str:
    if not size:
        return "?"
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} B"


def _flag_text(flags: EntryFlags | Arm64Flags) -> str:
    kind = type(flags)
    silent = (EntryFlags.PRESENT, Arm64Flags.VALID)
    return "|".join(f.name or "" for f in kind if f in flags and f not in silent)
