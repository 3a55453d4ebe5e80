"""Enumerating an address space: every mapped run, from whole tables at a time.

`translate()` answers one address per walk; listing a whole address space
that way costs a walk per page. This scanner instead unpacks each table once
(a single `struct.unpack_from` of 4 KiB), skips an absent entry's whole span,
and recognises a table whose leaves map one physically contiguous run with
equal rights (the kernel's direct map, a large buffer) by comparing the whole
table as one integer against the arithmetic progression it would be, so such
a table costs a few microseconds instead of 512 loop turns.

The walk is iterative with one frame per level, so memory stays bounded
whatever the tables hold; the work (tables visited + leaf entries seen) is
counted and capped because aliased tables can describe 2**36 pages in a few
KiB of guest memory.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING

from vmishell.arch.entries import PAGE_SIZE, RIGHTS
from vmishell.arch.geometry import Geometry, LevelGeometry
from vmishell.arch.results import Mapping, fast_mapping
from vmishell.arch.results import _new as _new
from vmishell.arch.results import _set_m_nx as _set_nx
from vmishell.arch.results import _set_m_paddr as _set_paddr
from vmishell.arch.results import _set_m_size as _set_size
from vmishell.arch.results import _set_m_user as _set_user
from vmishell.arch.results import _set_m_vaddr as _set_vaddr
from vmishell.arch.results import _set_m_writable as _set_writable
from vmishell.errors import GuestDataError

if TYPE_CHECKING:
    from vmishell.arch.translator import Translator

#: XD in the scanner's small-int flags (entry bit 63 shifted down by 60).
_NX_FLAG = 8
#: Work charged for a table recognised as one run: what it costs, in leaf-entry units
#: (~10 us against ~0.6 us per leaf), not the 512 pages it maps, so that a 1 TiB direct
#: map of 2 MiB pages does not eat the budget of a process with scattered 4 KiB pages.
_WHOLE_TABLE_WORK = 16
#: Work charged for unpacking a table and looking through its entries (~20 us), so that
#: the cap bounds time even when shared tables hold almost nothing.
_TABLE_WORK = 32


class _RunTable:
    """Constants to test a whole table against `first + i * span` in one comparison."""

    __slots__ = ("field", "mask", "mask_rep", "need", "ones", "ramp", "span")

    def __init__(self, geo: Geometry, lvl: LevelGeometry) -> None:
        width = geo.entry_size * 8
        count = lvl.count
        self.span = lvl.span
        self.field = geo.address_mask if lvl.last else lvl.large_frame_mask
        pse36 = ((1 << geo.pse36_bits) - 1) << 13 if not lvl.last else 0
        need = 1 if lvl.last else 1 | PAGE_SIZE
        self.need = need
        self.mask = self.field | pse36 | need | RIGHTS | geo.nx_mask
        self.ones, self.ramp = _progression(width, count)
        self.mask_rep = self.mask * self.ones


_PROGRESSIONS: dict[tuple[int, int], tuple[int, int]] = {}


def _progression(width: int, count: int) -> tuple[int, int]:
    """sum(2**(width*i)) and sum(i * 2**(width*i)) for i < count, computed once."""
    key = (width, count)
    if key not in _PROGRESSIONS:
        ones = ((1 << (width * count)) - 1) // ((1 << width) - 1)
        ramp = int.from_bytes(
            b"".join(i.to_bytes(width // 8, "little") for i in range(count)), "little"
        )
        _PROGRESSIONS[key] = (ones, ramp)
    return _PROGRESSIONS[key]


def scan_mappings(tr: Translator, start: int, end: int, max_work: int) -> Iterator[Mapping]:
    """Coalesced mappings of `tr` within virtual [start, end) (see Translator.mappings)."""
    geo = tr.geometry
    runs = {lvl.name: _RunTable(geo, lvl) for lvl in geo.levels if lvl.last or lvl.large_ok}
    work = [0]
    return itertools.chain.from_iterable(
        _scan_range(tr, lo, hi, voff, runs, work, max_work)
        for lo, hi, voff in geo.linear_ranges(start, end)
    )


def _over_budget(tr: Translator, max_work: int) -> GuestDataError:
    return GuestDataError(
        f"page tables at {tr.dtb:#x} need more than {max_work} tables and pages visited "
        "to enumerate: they alias each other or map an enormous space "
        "(narrow start/end, or pass a larger max_work)"
    )


def _scan_range(
    tr: Translator,
    lo: int,
    hi: int,
    voff: int,
    runs: dict[str, _RunTable],
    work: list[int],
    max_work: int,
) -> Iterator[Mapping]:
    """Mappings of index-space [lo, hi); `voff` sign-extends upper-half addresses."""
    geo = tr.geometry
    reader = tr.reader
    levels = geo.levels
    depth_count = len(levels)
    amask = geo.address_mask
    # Flags travel as a small int: rights in bits 1-2 (as in entries), XD as 8,
    # taken from entry bit 63 by `e >> 60 & nx8` (small ints are cheap, bit-63 masks are not).
    nx8 = _NX_FLAG if geo.nxe else 0
    pse36 = geo.pse36_bits
    esz = geo.entry_size
    unpack_entry = reader.entry.unpack_from

    # One frame per level: table address, its entries (unpacked on first visit),
    # next and last index to visit, base address, accumulated rights and nx.
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

    # The pending run: [rv, rend) virtual (index space) -> rp physical, with flags rf.
    rv = rend = rp = 0
    rf = -1
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
            # First visit of this table.
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
                    p = e0 & amask if lvl.last else geo.large_frame(e0, lvl)
                    f = prights | pnx
                    if lvl.permissions:
                        f = (e0 & prights) | pnx | (e0 >> 60 & nx8)
                    size = lvl.count << shift
                    if f == rf and base == rend and p == rp + (rend - rv):
                        rend += size
                    else:
                        if rf >= 0:
                            yield _emit(rv, rend, rp, rf, lo, hi, voff)
                        rv, rend, rp, rf = base, base + size, p, f
                    depth -= 1
                    continue
            ents = reader.table_struct(lvl.count).unpack_from(buf, off)
            f_ents[depth] = ents
            # Looking through a table costs this much whatever it holds: a table with
            # one present entry, shared by every entry above it, must not be cheap.
            work[0] += _TABLE_WORK
            if work[0] > max_work:
                raise _over_budget(tr, max_work)

        if lvl.last:
            # Page table: every present entry maps 4 KiB. The hot loop.
            seen = 0
            rpend = rp + (rend - rv)
            for i in range(first, last + 1):
                e = ents[i]
                if e & 1:
                    seen += 1
                    p = e & amask
                    f = (e & prights) | pnx | (e >> 60 & nx8)
                    v = base + (i << 12)
                    if f == rf and v == rend and p == rpend:
                        rend += 4096
                        rpend += 4096
                    else:
                        if rf >= 0:
                            if rv < lo or rend > hi:
                                yield _emit(rv, rend, rp, rf, lo, hi, voff)
                            else:  # _emit inlined: one Mapping per page when frames scatter
                                m = _new(Mapping)
                                _set_vaddr(m, rv + voff)
                                _set_paddr(m, rp)
                                _set_size(m, rend - rv)
                                _set_writable(m, rf & 2 != 0)
                                _set_user(m, rf & 4 != 0)
                                _set_nx(m, rf & 8 != 0)
                                yield m
                        rv, rend, rp, rpend, rf = v, v + 4096, p, p + 4096, f
            work[0] += seen
            if work[0] > max_work:
                raise _over_budget(tr, max_work)
            depth -= 1
            continue

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
                f = crights | cnx
                if f == rf and v == rend and p == rp + (rend - rv):
                    rend = v + span
                else:
                    if rf >= 0:
                        yield _emit(rv, rend, rp, rf, lo, hi, voff)
                    rv, rend, rp, rf = v, v + span, p, f
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
    if rf >= 0:
        yield _emit(rv, rend, rp, rf, lo, hi, voff)


def _emit(rv: int, rend: int, rp: int, rf: int, lo: int, hi: int, voff: int) -> Mapping:
    """The pending run as a Mapping, clipped to [lo, hi) and sign-extended."""
    if rv < lo:
        rp += lo - rv
        rv = lo
    if rend > hi:
        rend = hi
    return fast_mapping(rv + voff, rp, rend - rv, rf & 2 != 0, rf & 4 != 0, rf & _NX_FLAG != 0)
