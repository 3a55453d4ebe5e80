"""Enumerating an AArch64 address space: every mapped run, a whole table at a time.

The same design and work accounting as the x86 scanner (`vmishell.arch.scan`):
each table is unpacked once, invalid descriptors skip their whole span, the
walk is iterative with one frame per level (memory bounded whatever the
tables hold), and the work (tables looked through, descriptors followed,
leaves seen) is capped because aliased tables describe astronomically many
pages in a few KiB. Descriptors the walker faults on (a block where the
granule allows none, bits[1:0] = 01 at level 3, an output address above the
physical size, a table outside RAM) map nothing here either.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from vmishell.arch.aarch64.descriptors import DBM, PXN, UXN
from vmishell.arch.aarch64.spec import OA_LPA, OA_LPA2, HalfSpec
from vmishell.arch.results import Mapping
from vmishell.arch.results import _new as _new
from vmishell.arch.results import _set_m_nx as _set_nx
from vmishell.arch.results import _set_m_paddr as _set_paddr
from vmishell.arch.results import _set_m_size as _set_size
from vmishell.arch.results import _set_m_user as _set_user
from vmishell.arch.results import _set_m_vaddr as _set_vaddr
from vmishell.arch.results import _set_m_writable as _set_writable
from vmishell.arch.scan import _NX_FLAG, _TABLE_WORK
from vmishell.errors import GuestDataError

if TYPE_CHECKING:
    import numpy as np

    from vmishell.arch.aarch64.translator import Arm64Translator
    from vmishell.arch.runs import RunArrays

#: Runs handed over per generator step (bounds the objects held: one batch).
BATCH_RUNS = 1024


def _descriptor_of_index(i: int) -> int:
    """The rights bits a 5-bit rights index stands for: AP[2:1], DBM, PXN, UXN.

    The index of a descriptor `e` is `(e >> 6) & 3 | (e >> 49) & 4 | (e >> 50) & 24`.
    """
    return (i & 3) << 6 | (DBM if i & 4 else 0) | (PXN if i & 8 else 0) | (UXN if i & 16 else 0)


_INDEX_BITS = tuple(_descriptor_of_index(i) for i in range(32))


def scan_mappings(tr: Arm64Translator, start: int, end: int, max_work: int) -> Iterator[Mapping]:
    """Coalesced mappings of `tr` within virtual [start, end) (see Arm64Translator.mappings)."""
    for batch in scan_batches(tr, start, end, max_work):
        for v, p, size, f in batch:
            m = _new(Mapping)  # fast_mapping inlined: one Mapping per page when frames scatter
            _set_vaddr(m, v)
            _set_paddr(m, p)
            _set_size(m, size)
            _set_writable(m, f & 2 != 0)
            _set_user(m, f & 4 != 0)
            _set_nx(m, f & _NX_FLAG != 0)
            yield m


def scan_arrays(tr: Arm64Translator, start: int, end: int, max_work: int) -> RunArrays:
    """The runs of `scan_mappings` as RunArrays (flags: 2 writable, 4 user, 8 nx).

    Each batch becomes arrays as soon as it is complete, so no Python object
    per run outlives its batch.
    """
    import numpy as np

    from vmishell.arch.runs import RunArrays

    parts: list[tuple[np.ndarray, ...]] = []
    for batch in scan_batches(tr, start, end, max_work):
        a = np.array(batch, np.uint64)
        # Columns, flags as bytes: 25 bytes a run (a batch of aliases can be millions).
        parts.append((a[:, 0].copy(), a[:, 1].copy(), a[:, 2].copy(), a[:, 3].astype(np.uint8)))
    if not parts:
        z = np.zeros(0, np.uint64)
        return RunArrays(z, z.copy(), z.copy(), np.zeros(0, np.uint8))
    v, p, size, flags = (np.concatenate(c) for c in zip(*parts, strict=True))
    return RunArrays(v, p, size, flags)


def scan_batches(
    tr: Arm64Translator, start: int, end: int, max_work: int
) -> Iterator[list[tuple[int, int, int, int]]]:
    """(vaddr, paddr, size, flags) runs of both halves within [start, end), in address
    order, a batch (list) at a time: one generator step per batch, not per run."""
    work = [0]
    for lo, hi, spec in tr.geometry.linear_ranges(start, end):
        base = tr.table_base(spec.half)
        assert base is not None
        yield from _scan_half(tr, spec, base, lo, hi, work, max_work)


def _flags_of(e: int, acc: int, hd: bool) -> int:
    """A leaf's rights as scanner flags, as the walker computes them (see translator docs)."""
    ap = e >> 6
    user = ap & 1 != 0 and not acc & 4
    writable = not acc & 8 and (not ap & 2 or (hd and e & DBM != 0))
    nx = (e & UXN != 0 or acc & 2 != 0) if user else (e & PXN != 0 or acc & 1 != 0)
    return (2 if writable else 0) | (4 if user else 0) | (_NX_FLAG if nx else 0)


def _scan_half(
    tr: Arm64Translator,
    spec: HalfSpec,
    top: int,
    lo: int,
    hi: int,
    work: list[int],
    max_work: int,
) -> Iterator[list[tuple[int, int, int, int]]]:
    """Runs of one half within [lo, hi) (both inside the half's region), in batches."""
    reader = tr.reader
    levels = spec.levels
    n = len(levels)
    hd = tr.hd
    hier = not spec.hpd
    table_mask = spec.table_mask
    oa_format, pa_bits = spec.oa_format, spec.pa_bits
    lpa2, lpa = oa_format == OA_LPA2, oa_format == OA_LPA
    # Rights as a lookup (no call per leaf): one table per accumulated hierarchical
    # restriction, indexed by the leaf's AP[2:1], DBM, PXN and UXN (see `_rights_index`).
    luts = tuple(tuple(_flags_of(_INDEX_BITS[i], acc, hd) for i in range(32)) for acc in range(16))

    f_table = [0] * n
    f_ents: list[tuple[int, ...] | None] = [None] * n
    f_next = [0] * n
    f_last = [0] * n
    f_base = [0] * n
    f_acc = [0] * n
    region_lo = spec.region[0]
    f_table[0] = top
    f_base[0] = region_lo
    f_next[0] = (lo - region_lo) >> levels[0].shift
    f_last[0] = (hi - 1 - region_lo) >> levels[0].shift
    work[0] += 1

    out: list[tuple[int, int, int, int]] = []
    emit = out.append
    rv = rend = rp = 0
    rf = -1
    depth = 0
    while depth >= 0:
        lvl = levels[depth]
        first, last, base, acc = f_next[depth], f_last[depth], f_base[depth], f_acc[depth]
        shift = lvl.shift
        span = 1 << shift
        ents = f_ents[depth]
        if ents is None:
            loc = reader.locate(f_table[depth], lvl.table_size)
            if loc is None:
                depth -= 1  # table outside guest RAM: translate() faults there too
                continue
            ents = reader.table_struct(lvl.entries).unpack_from(*loc)
            f_ents[depth] = ents
            work[0] += _TABLE_WORK
            if work[0] > max_work:
                raise _over_budget(tr, max_work)
        out_mask = lvl.out_mask
        if lvl.last:
            lut = luts[acc]
            seen = 0
            rpend = rp + (rend - rv)
            for i in range(first, last + 1):
                e = ents[i]
                if e & 3 != 3:
                    continue
                seen += 1
                p = e & out_mask
                if lpa2:
                    p |= (e & 0x300) << 42
                elif lpa:
                    p |= (e & 0xF000) << 36
                if p >> pa_bits:
                    continue
                f = lut[((e >> 6) & 3) | ((e >> 49) & 4) | ((e >> 50) & 24)]
                v = base + (i << shift)
                if f == rf and v == rend and p == rpend:
                    rend += span
                    rpend += span
                else:
                    if rf >= 0:
                        if rv < lo or rend > hi:
                            emit(_clip(rv, rend, rp, rf, lo, hi))
                        else:
                            emit((rv, rp, rend - rv, rf))
                    rv, rend, rp, rpend, rf = v, v + span, p, p + span, f
            work[0] += seen
            if work[0] > max_work:
                raise _over_budget(tr, max_work)
            if len(out) >= BATCH_RUNS:
                yield out
                out = []
                emit = out.append
            depth -= 1
            continue

        descended = False
        for i in range(first, last + 1):
            e = ents[i]
            kind = e & 3
            if kind == 0 or kind == 2:
                continue
            if kind == 1 and not lvl.block_ok:
                continue  # the walker faults on this descriptor: nothing below it
            p = e & (out_mask if kind == 1 else table_mask)
            if lpa2:
                p |= (e & 0x300) << 42
            elif lpa:
                p |= (e & 0xF000) << 36
            if p >> pa_bits:
                continue
            work[0] += 1
            if work[0] > max_work:
                raise _over_budget(tr, max_work)
            v = base + (i << shift)
            if kind == 1:
                f = luts[acc][((e >> 6) & 3) | ((e >> 49) & 4) | ((e >> 50) & 24)]
                if f == rf and v == rend and p == rp + (rend - rv):
                    rend = v + span
                else:
                    if rf >= 0:
                        emit(_clip(rv, rend, rp, rf, lo, hi))
                    rv, rend, rp, rf = v, v + span, p, f
                continue
            child = levels[depth + 1]
            f_next[depth] = i + 1
            d = depth + 1
            f_table[d] = p
            f_ents[d] = None
            f_base[d] = v
            f_acc[d] = acc | ((e >> 59) & 0xF) if hier else acc
            f_next[d] = (max(lo, v) - v) >> child.shift
            f_last[d] = (min(hi, v + span) - 1 - v) >> child.shift
            depth = d
            descended = True
            break
        if not descended:
            depth -= 1
    if rf >= 0:
        emit(_clip(rv, rend, rp, rf, lo, hi))
    if out:
        yield out


def _over_budget(tr: Arm64Translator, max_work: int) -> GuestDataError:
    return GuestDataError(
        f"arm64 page tables at {tr.dtb:#x} need more than {max_work} tables and pages "
        "visited to enumerate: they alias each other or map an enormous space "
        "(narrow start/end, or pass a larger max_work)"
    )


def _clip(rv: int, rend: int, rp: int, rf: int, lo: int, hi: int) -> tuple[int, int, int, int]:
    """The pending run clipped to [lo, hi) (blocks may reach past the range asked for)."""
    if rv < lo:
        rp += lo - rv
        rv = lo
    if rend > hi:
        rend = hi
    return rv, rp, rend - rv, rf
