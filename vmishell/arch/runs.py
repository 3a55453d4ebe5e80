"""Enumerating an address space as arrays: leaf tables decoded by numpy, in batches.

`scan.py` yields one `Mapping` per run, and on a real guest (tens of
thousands of runs of a few pages in vmalloc and module space) the time goes
into Python objects and the per-entry loop. Here the upper levels are walked
as in `scan.py` (same order, same work charges, same bound on memory: one
frame per level), but every page table met is only noted; once a batch of
them is collected, their entries are gathered into one `(tables, entries)`
array and decoded at once: present mask, frame, effective rights and XD, then
coalesced into runs with vector operations. Large pages and tables that are
one contiguous run are single units, merged into the batch in address order.

The work charged is the scanner's, entry for entry: a table looked through
costs `_TABLE_WORK`, a table recognised as one run `_WHOLE_TABLE_WORK`, every
present upper entry and every present leaf entry one. The leaves of a batch
are charged when the batch is decoded, so the cap may be passed by one batch
(at most `BATCH_TABLES` tables of work) before GuestDataError is raised.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

from vmishell.arch.entries import PAGE_SIZE, RIGHTS
from vmishell.arch.geometry import Geometry, LevelGeometry
from vmishell.arch.scan import (
    _NX_FLAG,
    _TABLE_WORK,
    _WHOLE_TABLE_WORK,
    _over_budget,
    _RunTable,
)

if TYPE_CHECKING:
    import numpy as np

    from vmishell.arch.translator import Translator

#: Page tables decoded together (~1 MiB of entries with 8-byte entries).
BATCH_TABLES = 256


class RunArrays(NamedTuple):
    """Coalesced runs as parallel arrays (uint64 addresses and sizes, uint8 flags).

    `flags` has bit 1 for writable, bit 2 for user and bit 3 (8) for XD, as
    in `Mapping`'s fields; runs are in address order, as `mappings()` gives them.
    """

    vaddr: np.ndarray
    paddr: np.ndarray
    size: np.ndarray
    flags: np.ndarray

    def tuples(self) -> list[tuple[int, int, int, bool, bool, bool]]:
        """(vaddr, paddr, size, writable, user, nx) per run: `Mapping(*t)` builds one."""
        f = self.flags
        return list(
            zip(
                self.vaddr.tolist(),
                self.paddr.tolist(),
                self.size.tolist(),
                (f & 2 != 0).tolist(),
                (f & 4 != 0).tolist(),
                (f & _NX_FLAG != 0).tolist(),
                strict=True,
            )
        )


def run_arrays(tr: Translator, start: int, end: int, max_work: int) -> RunArrays:
    """Coalesced runs of `tr` within virtual [start, end) (see Translator.run_arrays)."""
    import numpy as np

    geo = tr.geometry
    runs = {lvl.name: _RunTable(geo, lvl) for lvl in geo.levels if lvl.last or lvl.large_ok}
    work = [0]
    parts: list[tuple[np.ndarray, ...]] = []
    for lo, hi, voff in geo.linear_ranges(start, end):
        pieces = list(_batches(tr, lo, hi, runs, work, max_work))
        if not pieces:
            continue
        v, key, s = _coalesce(*(np.concatenate(c) for c in zip(*pieces, strict=True)))
        if len(v):
            # Clip the first and last runs to [lo, hi) (large pages may reach past them).
            if int(v[0]) < lo:
                s[0] -= np.uint64(lo - int(v[0]))
                v[0] = lo
            last_end = int(v[-1]) + int(s[-1])
            if last_end > hi:
                s[-1] -= np.uint64(last_end - hi)
        p = v + (key & np.uint64(~0xFFF & (1 << 64) - 1))
        if voff:
            v = v + np.uint64(voff)
        parts.append((v, p, s, (key & np.uint64(0xFFF)).astype(np.uint8)))
    if not parts:
        empty = np.zeros(0, np.uint64)
        return RunArrays(empty, empty.copy(), empty.copy(), np.zeros(0, np.uint8))
    v, p, s, f = (np.concatenate(c) for c in zip(*parts, strict=True))
    return RunArrays(v, p, s, f)


def _coalesce(v: np.ndarray, key: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, ...]:
    """Merge address-ordered units that follow on virtually and physically with equal flags.

    `key` is (paddr - vaddr) | flags (both addresses are page aligned, so the
    flags fit below bit 12): two units are one run exactly when the second
    starts where the first ends and their keys are equal.
    """
    import numpy as np

    n = len(v)
    if n <= 1:
        return v, key, s
    ve = v + s
    brk = np.empty(n, dtype=bool)
    brk[0] = True
    np.not_equal(v[1:], ve[:-1], out=brk[1:])
    brk[1:] |= key[1:] != key[:-1]
    first = np.flatnonzero(brk)
    ends = np.empty(len(first), np.uint64)
    ends[:-1] = ve[first[1:] - 1]
    ends[-1] = ve[-1]
    start = v[first]
    return start, key[first], ends - start


def _pages_to_runs(v: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, ...]:
    """`_coalesce` for 4 KiB pages (no size array needed)."""
    import numpy as np

    n = len(v)
    if not n:
        return v, key, v.copy()
    brk = np.empty(n, dtype=bool)
    brk[0] = True
    np.not_equal(v[1:], v[:-1] + np.uint64(4096), out=brk[1:])
    brk[1:] |= key[1:] != key[:-1]
    first = np.flatnonzero(brk)
    ends = np.empty(len(first), np.uint64)
    ends[:-1] = v[first[1:] - 1]
    ends[-1] = v[-1]
    start = v[first]
    return start, key[first], ends + np.uint64(4096) - start


class _Batch:
    """Units and page tables noted by the upper walk, in address order, until decoded."""

    __slots__ = ("pt_base", "pt_first", "pt_last", "pt_nx", "pt_rights", "pt_table", "units")

    def __init__(self) -> None:
        self.units: tuple[list[int], list[int], list[int], list[int]] = ([], [], [], [])
        self.pt_table: list[int] = []
        self.pt_base: list[int] = []
        self.pt_first: list[int] = []
        self.pt_last: list[int] = []
        self.pt_rights: list[int] = []
        self.pt_nx: list[int] = []

    def unit(self, v: int, p: int, size: int, flags: int) -> None:
        u = self.units
        u[0].append(v)
        u[1].append(p)
        u[2].append(size)
        u[3].append(flags)

    def clear(self) -> None:
        for column in (*self.units, self.pt_table, self.pt_base, self.pt_first, self.pt_last):
            column.clear()
        self.pt_rights.clear()
        self.pt_nx.clear()


def _batches(
    tr: Translator,
    lo: int,
    hi: int,
    runs: dict[str, _RunTable],
    work: list[int],
    max_work: int,
) -> Iterator[tuple[np.ndarray, ...]]:
    """Address-ordered units of index-space [lo, hi), a batch of page tables at a time.

    Yields (vaddr, paddr, size, flags) arrays, not yet coalesced.
    """
    import numpy as np

    geo = tr.geometry
    reader = tr.reader
    levels = geo.levels
    depth_count = len(levels)
    amask = geo.address_mask
    nx8 = _NX_FLAG if geo.nxe else 0
    pse36 = geo.pse36_bits
    esz = geo.entry_size
    unpack_entry = reader.entry.unpack_from
    leaf = levels[-1]
    above_leaf = depth_count - 2
    decoder = _Decoder(tr, leaf, runs[leaf.name], nx8, work, max_work)
    batch = _Batch()

    def flush() -> tuple[np.ndarray, ...]:
        """The batch as coalesced (vaddr, key, size) arrays (see `_coalesce`)."""
        decoded = decoder.decode(batch)
        uv, up, us, uf = (np.array(c, np.uint64) for c in batch.units)
        batch.clear()
        if not len(uv):
            return decoded
        units: tuple[np.ndarray, ...] = (uv, (up - uv) | uf, us)
        if len(decoded[0]):
            at = np.searchsorted(decoded[0], uv)
            units = tuple(np.insert(b, at, u) for b, u in zip(decoded, units, strict=True))
        return _coalesce(*units)

    f_table = [0] * depth_count
    f_ents: list[tuple[int, ...] | None] = [None] * depth_count
    f_next = [0] * depth_count
    f_last = [0] * depth_count
    f_base = [0] * depth_count
    f_rights = [0] * depth_count
    f_nx = [0] * depth_count
    top = levels[0]
    f_table[0] = tr.dtb
    f_next[0] = lo >> top.shift
    f_last[0] = (hi - 1) >> top.shift
    f_rights[0] = RIGHTS
    work[0] += 1

    try:
        depth = 0
        while depth >= 0:
            lvl = levels[depth]
            first = f_next[depth]
            last = f_last[depth]
            base = f_base[depth]
            prights = f_rights[depth]
            pnx = f_nx[depth]
            shift = lvl.shift
            span = 1 << shift
            ents = f_ents[depth]
            if ents is None:
                table = f_table[depth]
                loc = reader.locate(table, lvl.table_size)
                if loc is None:
                    depth -= 1  # table outside guest RAM: translate() faults there too
                    continue
                buf, off = loc
                rt = runs.get(lvl.name)
                if rt is not None and first == 0 and last == lvl.count - 1:
                    # The whole table one contiguous run? (direct map, big buffers)
                    e0 = unpack_entry(buf, off)[0]
                    m0 = e0 & rt.mask
                    if (
                        e0 & rt.need == rt.need
                        and (e0 & rt.field) + (last << shift) <= rt.field
                        and unpack_entry(buf, off + last * esz)[0] & rt.mask == m0 + (last << shift)
                        and int.from_bytes(buf[off : off + lvl.table_size], "little") & rt.mask_rep
                        == m0 * rt.ones + span * rt.ramp
                    ):
                        work[0] += _WHOLE_TABLE_WORK
                        if work[0] > max_work:
                            raise _over_budget(tr, max_work)
                        f = prights | pnx
                        if lvl.permissions:
                            f = (e0 & prights) | pnx | (e0 >> 60 & nx8)
                        p = e0 & amask if lvl.last else geo.large_frame(e0, lvl)
                        batch.unit(base, p, lvl.count << shift, f)
                        depth -= 1
                        continue
                work[0] += _TABLE_WORK
                if work[0] > max_work:
                    raise _over_budget(tr, max_work)
                ents = reader.table_struct(lvl.count).unpack_from(buf, off)
                if depth == above_leaf:
                    # The children are page tables: note them all for the decoder.
                    # One unit of work per entry followed, as when descending.
                    work[0] += _note_tables(
                        geo, lvl, ents, first, last, base, prights, pnx, lo, hi, batch
                    )
                    if work[0] > max_work:
                        raise _over_budget(tr, max_work)
                    if len(batch.pt_table) >= BATCH_TABLES:
                        yield flush()
                    depth -= 1
                    continue
                f_ents[depth] = ents

            descended = False
            for i in range(first, last + 1):
                e = ents[i]
                if not e & 1:
                    continue
                if lvl.permissions:
                    crights = e & prights
                    cnx = pnx | (e >> 60 & nx8)
                else:
                    crights, cnx = prights, pnx
                v = base + (i << shift)
                if lvl.large_ok and e & PAGE_SIZE:
                    work[0] += 1
                    p = geo.large_frame(e, lvl) if pse36 else e & lvl.large_frame_mask
                    batch.unit(v, p, span, crights | cnx)
                    continue
                if lvl.ps_reserved and e & PAGE_SIZE:
                    continue  # the CPU faults on this entry: nothing is mapped below it
                work[0] += 1
                if work[0] > max_work:
                    raise _over_budget(tr, max_work)
                child = levels[depth + 1]
                f_next[depth] = i + 1
                d = depth + 1
                f_table[d] = e & amask
                f_ents[d] = None
                f_base[d] = v
                f_rights[d] = crights
                f_nx[d] = cnx
                f_next[d] = (max(lo, v) - v) >> child.shift
                f_last[d] = (min(hi, v + span) - 1 - v) >> child.shift
                depth = d
                descended = True
                break
            if not descended:
                if work[0] > max_work:
                    raise _over_budget(tr, max_work)
                depth -= 1
        if batch.pt_table or batch.units[0]:
            yield flush()
    finally:
        decoder.close()


def _note_tables(
    geo: Geometry,
    lvl: LevelGeometry,
    ents: tuple[int, ...],
    first: int,
    last: int,
    base: int,
    prights: int,
    pnx: int,
    lo: int,
    hi: int,
    batch: _Batch,
) -> int:
    """Note the page tables (and large pages) a directory's entries [first, last] lead to.

    Returns how many entries were followed (the caller charges one each; the
    decoder charges the tables themselves).
    """
    amask = geo.address_mask
    nx8 = _NX_FLAG if geo.nxe else 0
    shift = lvl.shift
    span = 1 << shift
    large_ok = lvl.large_ok
    pse36 = geo.pse36_bits
    perms = lvl.permissions
    ps_reserved = lvl.ps_reserved
    pt_table = batch.pt_table
    pt_base = batch.pt_base
    pt_first = batch.pt_first
    pt_last = batch.pt_last
    pt_rights = batch.pt_rights
    pt_nx = batch.pt_nx
    followed = 0
    for i in range(first, last + 1):
        e = ents[i]
        if not e & 1:
            continue
        if perms:
            crights = e & prights
            cnx = pnx | (e >> 60 & nx8)
        else:
            crights, cnx = prights, pnx
        v = base + (i << shift)
        if large_ok and e & PAGE_SIZE:
            p = geo.large_frame(e, lvl) if pse36 else e & lvl.large_frame_mask
            batch.unit(v, p, span, crights | cnx)
            followed += 1
            continue
        if ps_reserved and e & PAGE_SIZE:
            continue
        followed += 1
        pt_table.append(e & amask)
        pt_base.append(v)
        pt_first.append((max(lo, v) - v) >> 12)
        pt_last.append((min(hi, v + span) - 1 - v) >> 12)
        pt_rights.append(crights)
        pt_nx.append(cnx)
    return followed


class _Decoder:
    """Decodes a batch of page tables with vector operations (see the module docstring)."""

    def __init__(
        self,
        tr: Translator,
        leaf: LevelGeometry,
        rt: _RunTable,
        nx8: int,
        work: list[int],
        max_work: int,
    ) -> None:
        import numpy as np

        self.tr = tr
        self.count = leaf.count
        self.size = leaf.table_size
        self.esz = tr.geometry.entry_size
        self.dtype = np.dtype("<u4" if self.esz == 4 else "<u8")
        self.amask = np.uint64(tr.geometry.address_mask)
        self.nx8 = nx8
        self.work = work
        self.max_work = max_work
        self.rt_mask = np.uint64(rt.mask)
        self.rt_field = np.uint64(rt.field)
        #: The first frame of a table that is one run may be at most this (no carry).
        self.rt_room = np.uint64(rt.field - ((self.count - 1) << 12))
        self.ramp = np.arange(self.count, dtype=np.uint64) << np.uint64(12)
        # Row of a flat entry index: a shift when a table has 2**n entries.
        self.shift_rows = (
            self.count.bit_length() - 1 if self.count & (self.count - 1) == 0 else None
        )
        self.index = np.arange(self.count)
        seg = tr.reader.single_segment
        #: RAM as rows of one page (zero-copy) when it is one page-aligned segment of whole
        #: pages and tables are a page: one gather per batch. Dropped by close(), since an
        #: array over the map would keep it from being unmapped.
        self.pages: np.ndarray | None = None
        if (
            seg is not None
            and self.size == 4096
            and seg.start % 4096 == 0
            and len(seg.view) % 4096 == 0
        ):
            self.pages = np.frombuffer(seg.view, self.dtype).reshape(-1, self.count)
            self.seg_start = seg.start
            self.seg_len = len(seg.view)

    def close(self) -> None:
        self.pages = None

    def decode(self, batch: _Batch) -> tuple[np.ndarray, ...]:
        """Present 4 KiB pages of the batch's page tables as (vaddr, paddr, size, flags)."""
        import numpy as np

        count = self.count
        got = self._gather(batch)
        if got is None:
            z = np.zeros(0, np.uint64)
            return z, z, z
        e, keep = got
        k = len(e)
        first = np.array(batch.pt_first, np.int64)[keep]
        last = np.array(batch.pt_last, np.int64)[keep]
        present = (e & np.uint64(1)).astype(bool)
        full = (first == 0) & (last == count - 1)
        if not full.all():
            present &= (self.index >= first[:, None]) & (self.index <= last[:, None])
        # Work as the scanner charges it: a full table that is one contiguous run costs
        # _WHOLE_TABLE_WORK, any other _TABLE_WORK plus one per present leaf. Only
        # tables whose first and last entries fit a run are compared entry by entry.
        m0 = e[:, 0] & self.rt_mask
        cand = np.flatnonzero(
            full
            & (m0 & np.uint64(1)).astype(bool)
            & ((e[:, 0] & self.rt_field) <= self.rt_room)
            & ((e[:, -1] & self.rt_mask) == m0 + self.ramp[-1])
        )
        if len(cand):
            same = ((e[cand] & self.rt_mask) == m0[cand, None] + self.ramp).all(axis=1)
            n_whole = int(same.sum())
        else:
            n_whole = 0
        flat = np.flatnonzero(present.ravel())
        seen = len(flat) - n_whole * count
        self.work[0] += _WHOLE_TABLE_WORK * n_whole + _TABLE_WORK * (k - n_whole) + seen
        if self.work[0] > self.max_work:
            raise _over_budget(self.tr, self.max_work)
        if self.shift_rows is not None:
            rows = flat >> self.shift_rows
            cols = (flat & (count - 1)).astype(np.uint64)
        else:
            rows, cols_i = np.divmod(flat, count)
            cols = cols_i.astype(np.uint64)
        e = e.ravel()[flat]
        vaddr = np.array(batch.pt_base, np.uint64)[keep][rows] + (cols << np.uint64(12))
        flags = (e & np.array(batch.pt_rights, np.uint64)[keep][rows]) | np.array(
            batch.pt_nx, np.uint64
        )[keep][rows]
        if self.nx8:
            flags |= (e >> np.uint64(60)) & np.uint64(self.nx8)
        key = ((e & self.amask) - vaddr) | flags
        return _pages_to_runs(vaddr, key)

    def _gather(self, batch: _Batch) -> tuple[np.ndarray, np.ndarray] | None:
        """The entries of the batch's tables inside RAM as a (tables, entries) uint64 array,
        and which of the batch's tables those are (tables outside RAM map nothing)."""
        import numpy as np

        tables = np.array(batch.pt_table, np.int64)
        if not len(tables):
            return None
        if self.pages is not None:
            rel = tables - self.seg_start
            keep = np.flatnonzero((rel >= 0) & (rel + self.size <= self.seg_len))
            if not len(keep):
                return None
            # Tables are page aligned: one row of RAM-as-pages each.
            return self.pages[rel[keep] >> 12].astype(np.uint64, copy=False), keep
        found = []
        picks = []
        locate = self.tr.reader.locate
        for i, table in enumerate(batch.pt_table):
            loc = locate(table, self.size)
            if loc is not None:
                found.append(np.frombuffer(loc[0], self.dtype, self.count, loc[1]))
                picks.append(i)
        if not found:
            return None
        return np.stack(found).astype(np.uint64, copy=False), np.array(picks, np.int64)
