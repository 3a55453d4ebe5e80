"""Reading virtual memory: translate page by page, copy physical runs in one go.

Consecutive pages that are also consecutive in physical memory are merged
into one run and copied once, straight out of the source's zero-copy
segments when it has them (a 64 MiB buffer mapped contiguously costs one
copy, not 16384). Holes read as zeros with `pad=True`; otherwise they raise
the walk's PageFault.

A page that is mapped but whose frame lies outside guest RAM (MMIO, a
corrupt entry) is reported as a PageFault too, with reason "maps physical
... outside guest RAM", naming the leaf level and entry and chained to the
source's PhysicalReadError. Rationale: to a reader of virtual memory both
are "this virtual address cannot be read", so one `except PageFault` (or
TranslationError) covers them, and `pad=True` zero-fills both alike.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from vmishell.arch.fresh import IN_PLACE_MIN, fresh_bytes
from vmishell.arch.results import Page
from vmishell.arch.translator import Translator
from vmishell.errors import PageFault, PhysicalReadError, TranslationError

if TYPE_CHECKING:
    from vmishell.arch.aarch64.translator import Arm64Translator

_ZEROS = memoryview(bytes(1 << 16))


class AddressSpace:
    """The virtual memory one translator (x86 or AArch64) describes, as something to read."""

    def __init__(self, translator: Translator | Arm64Translator) -> None:
        self.translator = translator
        self.source = translator.source

    def read(self, vaddr: int, size: int, *, pad: bool = False) -> bytes:
        """`size` bytes of virtual memory at `vaddr`.

        Unmapped bytes raise PageFault (address, level, entry), or read as
        zeros when `pad` is set; so do mapped bytes whose frame is outside
        guest RAM (see the module docstring).
        """
        if size < 0:
            raise TranslationError(f"cannot read a negative size ({size}) at {vaddr:#x}")
        if size == 0:
            return b""
        tr = self.translator
        if self.source.generation != tr._generation:
            tr.sync()
        page = tr._tlb.get(vaddr >> 12)
        if page is None:
            try:  # one walk (or a large page already known), then the same one-page path
                page = tr._miss(vaddr)
            except PageFault:
                if not pad:
                    raise
                return self._copy(self._runs(vaddr, size, pad), size, pad)
        off = vaddr - page[0]
        if off + size <= page[2]:
            # Within one page (the common small read): one slice of RAM.
            view = tr._seg_view
            if view is not None:
                p = page[1] + off - tr._seg_start
                if p >= 0 and p + size <= tr._seg_len:
                    return view[p : p + size].tobytes()
            return self._copy([(page[1] + off, size, vaddr, page)], size, pad)
        return self._copy(self._runs(vaddr, size, pad), size, pad)

    def _runs(self, vaddr: int, size: int, pad: bool) -> list[tuple[int, int, int, Page | None]]:
        """Physical runs (paddr, length, vaddr, first page) covering the request.

        Holes (only with `pad`) have page None.
        """
        tr = self.translator
        tlb = tr._tlb
        miss = tr._miss
        frames_after = tr.frames_after
        geo = tr.geometry
        runs: list[tuple[int, int, int, Page | None]] = []
        pos, end = vaddr, vaddr + size
        run_p = run_len = run_v = 0
        run_page: Page | None = None
        while pos < end:
            page = tlb.get(pos >> 12)
            if page is None:
                try:
                    page = miss(pos)
                except PageFault as fault:
                    if not pad:
                        raise
                    n = min(geo.hole_end(pos, fault.level), end) - pos
                    if run_len:
                        runs.append((run_p, run_len, run_v, run_page))
                        run_len = 0
                    if runs and runs[-1][3] is None:
                        hp, hlen, hv, _ = runs[-1]
                        runs[-1] = (hp, hlen + n, hv, None)
                    else:
                        runs.append((0, n, pos, None))
                    pos += n
                    continue
            # Translate the rest of the page's leaf table in one look (warm or cold:
            # a look at the table is cheaper than a TLB lookup per page).
            off = pos - page[0]
            n = min(page[2] - off, end - pos)
            p = page[1] + off
            if pos + n < end:
                page_size = page[2]
                for frame in frames_after(page, end - pos - n):
                    if run_len and run_p + run_len == p:
                        run_len += n
                    else:
                        if run_len:
                            runs.append((run_p, run_len, run_v, run_page))
                        run_p, run_len, run_v, run_page = p, n, pos, page
                    pos += n
                    p = frame
                    n = min(page_size, end - pos)
            if run_len and run_p + run_len == p:
                run_len += n
            else:
                if run_len:
                    runs.append((run_p, run_len, run_v, run_page))
                run_p, run_len, run_v, run_page = p, n, pos, page
            pos += n
        if run_len:
            runs.append((run_p, run_len, run_v, run_page))
        return runs

    def _copy(self, runs: list[tuple[int, int, int, Page | None]], size: int, pad: bool) -> bytes:
        """Copy the runs out of physical memory, each in one piece when it sits in one segment.

        A large result is one new bytes object filled in place, on huge pages
        (see `fresh`): its own page faults, not the copy, are what a large
        read costs. Smaller ones are one slice, or joined from views of the
        map straight into the result (no bytes object per run).
        """
        if size >= IN_PLACE_MIN:
            fresh = fresh_bytes(size)
            if fresh is not None:
                data, out = fresh
                with out:
                    self._fill(runs, out, pad)
                return data
        segs = self.translator.reader.segments
        starts = self.translator.reader.starts
        parts: list[bytes | memoryview] = []
        for paddr, length, vaddr, page in runs:
            if page is None:
                parts.append(_ZEROS[:length] if length <= len(_ZEROS) else bytes(length))
                continue
            if segs:
                i = bisect.bisect_right(starts, paddr) - 1
                if i >= 0:
                    seg = segs[i]
                    off = paddr - seg.start
                    if off + length <= len(seg.view):
                        parts.append(seg.view[off : off + length])
                        continue
            parts.append(self._read_slow(paddr, length, vaddr, page, pad))
        if len(parts) == 1:
            return bytes(parts[0])
        return b"".join(parts)

    def read_into(self, vaddr: int, buffer: bytearray | memoryview, *, pad: bool = False) -> int:
        """Fill a writable `buffer` with the virtual memory at `vaddr`; returns its length.

        The allocation-free form of `read` for large or repeated reads: each
        physically contiguous run is copied once, straight from the source's
        map into the caller's buffer (no bytes object in between). Faults are
        found before anything is written; a frame outside RAM met while
        copying raises with the buffer partly filled.
        """
        out = memoryview(buffer).cast("B")
        if out.readonly:
            raise TranslationError("read_into needs a writable buffer")
        size = len(out)
        if size == 0:
            return 0
        if self.source.generation != self.translator._generation:
            self.translator.sync()
        self._fill(self._runs(vaddr, size, pad), out, pad)
        return size

    def _fill(
        self, runs: list[tuple[int, int, int, Page | None]], out: memoryview, pad: bool
    ) -> None:
        """Copy the runs, in order, into `out` (as long as they are together)."""
        segs = self.translator.reader.segments
        starts = self.translator.reader.starts
        pos = 0
        for paddr, length, v, page in runs:
            dst = out[pos : pos + length]
            pos += length
            if page is None:
                for z in range(0, length, len(_ZEROS)):
                    n = min(len(_ZEROS), length - z)
                    dst[z : z + n] = _ZEROS[:n]
                continue
            if segs:
                i = bisect.bisect_right(starts, paddr) - 1
                if i >= 0:
                    seg = segs[i]
                    off = paddr - seg.start
                    if off + length <= len(seg.view):
                        dst[:] = seg.view[off : off + length]
                        continue
            dst[:] = self._read_slow(paddr, length, v, page, pad)

    @contextmanager
    def view(self, vaddr: int, size: int, *, pad: bool = False) -> Iterator[memoryview]:
        """A read-only view of `size` bytes at `vaddr`, released when the block ends.

        Zero-copy when the bytes are one physically contiguous run inside one
        mapped RAM segment; otherwise a view of a copy (`read`). A view of a
        live guest's RAM changes as the guest writes: copy what must stay.
        No view derived from it may outlive the block (the source could not
        be unmapped at close).
        """
        if size < 0:
            raise TranslationError(f"cannot read a negative size ({size}) at {vaddr:#x}")
        tr = self.translator
        if self.source.generation != tr._generation:
            tr.sync()
        runs = self._runs(vaddr, size, pad) if size else []
        view: memoryview | None = None
        if len(runs) == 1 and runs[0][3] is not None:
            paddr, length = runs[0][0], runs[0][1]
            segs, starts = tr.reader.segments, tr.reader.starts
            i = bisect.bisect_right(starts, paddr) - 1
            if segs and i >= 0 and paddr - segs[i].start + length <= len(segs[i].view):
                off = paddr - segs[i].start
                view = segs[i].view[off : off + length].toreadonly()
        if view is None:
            view = memoryview(self._copy(runs, size, pad) if size else b"")
        try:
            yield view
        finally:
            view.release()

    def _read_slow(self, paddr: int, length: int, vaddr: int, page: Page, pad: bool) -> bytes:
        """Read a run through the source's own read(); frames outside RAM fault or pad."""
        try:
            return self.source.read(paddr, length)
        except PhysicalReadError as err:
            if pad:
                return self.source.read_padded(paddr, length)
            bad_v, bad_page = self._first_unbacked(vaddr, length, page)
            bad_p = bad_page.paddr + (bad_v - bad_page.vaddr)
            raise PageFault(
                bad_v,
                bad_page.level,
                bad_page.entry,
                bad_page.entry_address,
                f"maps physical {bad_p:#x}, outside guest RAM",
            ) from err

    def _first_unbacked(self, vaddr: int, length: int, page: Page) -> tuple[int, Page]:
        """The first page of a run whose physical bytes are not all RAM (for the error)."""
        tr = self.translator
        pos, end = vaddr, vaddr + length
        while pos < end:
            pg = tr.page(pos)
            off = pos - pg.vaddr
            n = min(pg.size - off, end - pos)
            lo = pos
            while lo < pos + n:  # narrow to the first unbacked 4 KiB, even in a large page
                chunk = min((lo | 0xFFF) + 1, pos + n) - lo
                if not self.source.is_valid(pg.paddr + (lo - pg.vaddr), chunk):
                    return lo, pg
                lo += chunk
            pos += n
        return vaddr, page  # pragma: no cover - the source disagreed with itself

    def is_readable(self, vaddr: int, size: int = 1) -> bool:
        """Whether every byte of [vaddr, vaddr+size) is mapped onto guest RAM."""
        self.translator.sync()
        try:
            for paddr, length, _, page in self._runs(vaddr, size, False):
                if page is not None and not self.source.is_valid(paddr, length):
                    return False
        except PageFault:
            return False
        return True

    def __repr__(self) -> str:
        return f"<AddressSpace {self.translator!r}>"
