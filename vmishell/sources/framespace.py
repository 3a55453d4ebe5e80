"""Which physical space page-table entries address, for sources where it is not their own.

A Xen PV guest's page tables hold machine frames while its kernel's own
physical addresses (`__pa()`, pfns, the kernel image's placement) are
pseudo-physical. Such a source offers `walk_source` (a source in the space
the entries use, which page walks read) and `to_walk(paddr)` (one of its
own addresses in that space). Every other source is its own walk space.
The OS layer calls these two where its physical arithmetic meets a page
walk: the kernel's top-level table, and addresses compared with a walk's result.
"""

from __future__ import annotations

from vmishell.sources.base import PhysicalSource


def walk_source(source: PhysicalSource) -> PhysicalSource:
    """The source page walks over `source`'s guest read table entries from."""
    view = getattr(source, "walk_source", None)
    return source if view is None else view


def to_walk(source: PhysicalSource, paddr: int) -> int:
    """`paddr` (an address of `source`) in the space page-table entries use."""
    convert = getattr(source, "to_walk", None)
    return paddr if convert is None else convert(paddr)
