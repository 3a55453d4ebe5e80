"""Bits of x86 paging-structure entries and how they read at each level.

Kept apart from the walker so the decoding shown to a student (`walk()`) and
the masks used on the hot paths come from one place.
"""

from __future__ import annotations

from vmishell.arch.results import EntryFlags

PRESENT = 1 << 0
WRITABLE = 1 << 1
USER = 1 << 2
ACCESSED = 1 << 5
DIRTY = 1 << 6
PAGE_SIZE = 1 << 7
GLOBAL = 1 << 8
PAT_LARGE = 1 << 12
NX = 1 << 63

#: Bits 1 and 2: the rights that accumulate by AND across levels.
RIGHTS = WRITABLE | USER

_TABLE_FLAGS = (
    EntryFlags.PRESENT
    | EntryFlags.WRITABLE
    | EntryFlags.USER
    | EntryFlags.WRITE_THROUGH
    | EntryFlags.CACHE_DISABLE
    | EntryFlags.ACCESSED
)
_PDPTE_PAE_FLAGS = EntryFlags.PRESENT | EntryFlags.WRITE_THROUGH | EntryFlags.CACHE_DISABLE
_PTE_FLAGS = _TABLE_FLAGS | EntryFlags.DIRTY | EntryFlags.GLOBAL


def decode_flags(
    entry: int, *, leaf: bool, page_table: bool, permissions: bool, nx: bool
) -> EntryFlags:
    """The meaningful flags of `entry` at its level.

    `page_table` says the entry is in a PT, where bit 7 is PAT rather than
    PAGE_SIZE; `leaf` says it maps a page (so DIRTY and GLOBAL mean something);
    `permissions` is False for PAE PDPTEs; `nx` whether XD is enabled.
    """
    if not permissions:
        flags = EntryFlags(entry & _PDPTE_PAE_FLAGS)
    elif page_table:
        flags = EntryFlags(entry & _PTE_FLAGS)
        if entry & PAGE_SIZE:
            flags |= EntryFlags.PAT
    elif leaf:
        flags = EntryFlags(entry & (_PTE_FLAGS | EntryFlags.PAGE_SIZE | EntryFlags.PAT))
    else:
        flags = EntryFlags(entry & _TABLE_FLAGS)
    if nx and permissions and entry & NX:
        flags |= EntryFlags.NX
    return flags
