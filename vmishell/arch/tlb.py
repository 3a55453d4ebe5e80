"""The page cache ("TLB") every walker shares: one place for lookups, misses and invalidation.

A walker subclasses `CachedWalks` and supplies `_walk(vaddr, steps)`; its
constructor sets `source` and `reader` (its TableReader), then calls
`_start_caches(tlb_size)`.

A large page (2 MiB, 1 GiB, an arm64 block) is also remembered whole, as a
CPU's TLB does: a miss elsewhere in it is answered without a walk. That is
what a live guest's kernel reads meet after every refresh: task_structs,
creds and mm_structs spread over the direct map's 2 MiB and 1 GiB pages.

Everything cached is dropped when the source's generation changes, so a live
guest is seen afresh after `source.refresh()` and never before.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

from vmishell.arch.results import Page, Translation, WalkStep
from vmishell.arch.results import _new as _new
from vmishell.arch.results import _set_t_paddr as _set_paddr
from vmishell.arch.results import _set_t_page as _set_page
from vmishell.arch.results import _set_t_vaddr as _set_vaddr

if TYPE_CHECKING:
    from vmishell.arch.tables import TableReader
    from vmishell.sources.base import PhysicalSource


class CachedWalks:
    """translate/page through a per-page cache, with the walker's `_walk` on a miss."""

    source: PhysicalSource
    reader: TableReader
    _tlb: dict[int, Page]
    #: Large pages by size: {shift: {vaddr >> shift: page}}.
    _large: dict[int, dict[int, Page]]
    _tlb_size: int
    _generation: int
    _unpack_entry: Any
    _seg_view: memoryview | None
    _seg_start: int
    _seg_len: int

    def _walk(self, vaddr: int, steps: list[WalkStep] | None) -> Page:
        raise NotImplementedError

    # -- caches ---------------------------------------------------------------------------
    def _start_caches(self, tlb_size: int) -> None:
        """Empty caches at the source's current generation (for the walker's constructor)."""
        self._tlb = {}
        self._large = {}
        self._tlb_size = max(1, tlb_size)
        self._generation = self.source.generation
        self._unpack_entry = self.reader.entry.unpack_from
        self._note_segments()

    def sync(self) -> None:
        """Drop every cached page and table if the source changed generation."""
        if self.source.generation != self._generation:
            self.flush()

    def flush(self) -> None:
        """Drop every cached page and table unconditionally."""
        self._tlb.clear()
        self._large.clear()
        self.reader.reload()
        self._note_segments()
        self._generation = self.source.generation

    def _note_segments(self) -> None:
        """Keep the single RAM segment at hand so walks skip the reader's lookup."""
        seg = self.reader.single_segment
        self._seg_view = seg.view if seg is not None else None
        self._seg_start = seg.start if seg is not None else 0
        self._seg_len = len(seg.view) if seg is not None else 0

    # -- translation ------------------------------------------------------------------------
    def translate(self, vaddr: int) -> Translation:
        """The physical address of `vaddr`; raises PageFault naming the level and entry."""
        if self.source.generation != self._generation:
            self.sync()
        page = self._tlb.get(vaddr >> 12)
        if page is None:
            page = self._miss(vaddr)
        t = _new(Translation)
        _set_vaddr(t, vaddr)
        _set_paddr(t, page[1] + vaddr - page[0])
        _set_page(t, page)
        return t

    def page(self, vaddr: int) -> Page:
        """The TLB entry (whole page, effective rights) holding `vaddr`; raises PageFault."""
        if self.source.generation != self._generation:
            self.sync()
        page = self._tlb.get(vaddr >> 12)
        return self._miss(vaddr) if page is None else page

    def _miss(self, vaddr: int) -> Page:
        """Walk for a page the TLB lacks and remember it (callers checked the generation)."""
        vaddr = operator.index(vaddr)
        for shift, pages in self._large.items():
            page = pages.get(vaddr >> shift)
            if page is not None:
                break
        else:
            page = self._walk(vaddr, None)
            size = page[2]
            if size > 4096:
                shift = size.bit_length() - 1
                large = self._large.get(shift)
                if large is None:
                    large = self._large[shift] = {}
                large[vaddr >> shift] = page
        tlb = self._tlb
        if len(tlb) >= self._tlb_size:
            tlb.clear()
            self._large.clear()  # entered with a TLB entry each: bounded alike
        tlb[vaddr >> 12] = page
        return page
