"""The AArch64 walker against a reference written from the ARM ARM pseudo-code, on random tables.

The reference below follows ARM DDI 0487's AArch64.S1Translate path in its
own terms (S1StartLevel, the per-level index bits, DecodeDescriptorType,
BlockDescSupported, NextTableBase / S1OAFromDescriptor, the address-size
check, S1DirectBasePermissions) and shares no code with vmishell's walker or
spec. Hypothesis builds random tables (shared, aliased and corrupt entries
included) and both must agree on every translation and on the whole
enumeration (`mappings()`, `runs()`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.arm64tables import AF, AP_EL0, AP_RO, CONT, DBM, NG, PXN, UXN, Arm64TableBuilder
from vmishell.arch.aarch64 import Arm64Translator
from vmishell.arch.results import Mapping
from vmishell.errors import PageFault

FINAL_LEVEL = 3


@dataclass(frozen=True)
class Regime:
    """What the reference needs of TCR_EL1: per-half granule bits and TxSZ, DS, PS, TBI, HPD."""

    granulebits: int
    t0sz: int
    t1sz: int
    ds: bool
    ps: int
    tbi: tuple[bool, bool]
    hpd: tuple[bool, bool]
    ha_hd: bool


@dataclass(frozen=True)
class RefResult:
    """A successful reference walk: output address, block/page size and permissions."""

    oa: int
    size: int
    pr: bool
    pw: bool
    ur: bool
    uw: bool
    px: bool
    ux: bool
    af: bool
    ng: bool


def ref_translate(mem: dict[int, int], ttbr: tuple[int | None, int | None], r: Regime, va: int):
    """AArch64.S1Translate for a data read: a RefResult, or None for any fault."""
    kind, value = s1_walk(mem, ttbr, r, va)
    return value if kind == "leaf" else None


def s1_walk(mem, ttbr, r: Regime, va: int, until: int | None = None):
    """AArch64.S1Walk: ("leaf", RefResult), ("fault", None), or with `until` a level,
    ("table", next table's base) once a table descriptor at that level is read."""
    upper = (va >> 55) & 1
    top = 55 if r.tbi[upper] else 63  # AArch64.AddrTop
    tsz = r.t1sz if upper else r.t0sz
    inputsize = 64 - tsz
    # AArch64.VAIsOutOfRange: va<top:inputsize> all zeros (lower) or all ones (upper).
    width = top - inputsize + 1
    field = (va >> inputsize) & ((1 << width) - 1)
    if field != (((1 << width) - 1) if upper else 0):
        return "fault", None
    if ttbr[upper] is None:  # EPDn: walks of this half are disabled
        return "fault", None
    granulebits = r.granulebits
    stride = granulebits - 3
    startlevel = FINAL_LEVEL - (((inputsize - 1) - granulebits) // stride)  # S1StartLevel
    # AArch64.S1TTBaseAddress: BADDR, with BADDR[51:48] in TTBR<5:2> for 52-bit OAs.
    t = ttbr[upper]
    oa52 = r.ps == 52 and (r.ds or granulebits == 16)
    baselowerbound = 3 + inputsize - ((3 - startlevel) * stride + granulebits)
    if oa52:
        baselowerbound = max(baselowerbound, 6)
        base = ((t >> 2) & 0xF) << 48 | (t & ((1 << 48) - 1))
    else:
        base = t & ((1 << 48) - 1)
    base &= ~((1 << baselowerbound) - 1)
    apt_no_el0 = apt_ro = pxn_t = uxn_t = False
    level = startlevel
    while True:
        lsb = (FINAL_LEVEL - level) * stride + granulebits
        msb = inputsize - 1 if level == startlevel else lsb + stride - 1
        index = (va >> lsb) & ((1 << (msb - lsb + 1)) - 1)
        descaddr = base | (index << 3)
        if descaddr not in mem:
            return "fault", None  # external abort on the walk: outside RAM
        desc = mem[descaddr]
        # AArch64.DecodeDescriptorType
        if not desc & 1:
            return "fault", None
        if desc & 2:
            kind = "leaf" if level == FINAL_LEVEL else "table"
        elif level == FINAL_LEVEL or not block_desc_supported(r, level):
            return "fault", None
        else:
            kind = "leaf"
        # NextTableBase / S1OAFromDescriptor: tables and pages use granulebits, blocks lsb.
        low = granulebits if kind == "table" else lsb
        if granulebits == 16:
            oa = (desc & ((1 << 48) - 1)) >> low << low | ((desc >> 12) & 0xF) << 48
        elif r.ds:
            oa = (desc & ((1 << 50) - 1)) >> low << low | ((desc >> 8) & 3) << 50
        else:
            oa = (desc & ((1 << 48) - 1)) >> low << low
        if oa >> r.ps:  # AArch64.OAOutOfRange: Address size fault
            return "fault", None
        if kind == "table":
            if not r.hpd[upper]:
                pxn_t |= bool(desc >> 59 & 1)
                uxn_t |= bool(desc >> 60 & 1)
                apt_no_el0 |= bool(desc >> 61 & 1)
                apt_ro |= bool(desc >> 62 & 1)
            if level == until:
                return "table", oa
            base = oa
            level += 1
            continue
        # AArch64.S1DirectBasePermissions (no PAN/WXN), with DBM under TCR_EL1.HD.
        ap = (desc >> 6) & 3
        if r.ha_hd and desc & DBM:
            ap &= 1  # hardware dirty state management makes the page writable
        pr, pw, ur, uw = {
            0: (True, True, False, False),
            1: (True, True, True, True),
            2: (True, False, False, False),
            3: (True, False, True, False),
        }[ap]
        if apt_no_el0:
            ur = uw = False
        if apt_ro:
            pw = uw = False
        px = not (desc & PXN or pxn_t or uw)
        ux = not (desc & UXN or uxn_t)
        res = RefResult(oa, 1 << lsb, pr, pw, ur, uw, px, ux, bool(desc & AF), bool(desc & NG))
        return "leaf", res


def block_desc_supported(r: Regime, level: int) -> bool:
    """AArch64.BlockDescSupported (PAMax taken as the regime's PS)."""
    if r.granulebits == 12:
        return level in (1, 2) or (level == 0 and r.ds)
    if r.granulebits == 14:
        return level == 2 or (level == 1 and r.ds)
    return level == 2 or (level == 1 and r.ps == 52)


def expected(res: RefResult) -> tuple[int, bool, bool, bool, bool, bool]:
    """vmishell's contract on top of the architecture: (size, writable, user, nx, global, accessed).

    user = EL0 may read; writable = whoever may access may write; nx = not
    executable by whoever may access (EL0 for user pages, EL1 otherwise).
    """
    user = res.ur
    writable = res.uw if user else res.pw
    nx = not res.ux if user else not res.px
    return res.size, writable, user, nx, not res.ng, res.af


# -- random tables --------------------------------------------------------------------------

REGIMES = [
    (4096, 48, "48"),
    (4096, 39, "48"),
    (4096, 52, "lpa2"),
    (16384, 48, "48"),
    (16384, 47, "48"),
    (16384, 52, "lpa2"),
    (65536, 42, "48"),
    (65536, 48, "48"),
    (65536, 52, "lpa"),
]
LEAF_BITS = st.sampled_from([0, AF, AP_EL0, AP_RO, UXN, PXN, NG, DBM, CONT]).map(int)
TABLE_BITS = st.sampled_from([0, 0, 0, 1 << 59, 1 << 60, 1 << 61, 1 << 62]).map(int)


@st.composite
def spaces(draw: st.DrawFn):
    """A builder with random mappings in both halves, then random raw descriptors poked in."""
    granule, va_bits, fmt = draw(st.sampled_from(REGIMES))
    b = Arm64TableBuilder(granule, va_bits, fmt=fmt, ram_size=64 * granule)
    pa_bits = 52 if fmt != "48" else 48
    vas: list[int] = []
    for _ in range(draw(st.integers(1, 12))):
        half = draw(st.integers(0, 1))
        shifts = b.shifts(half)
        depth = draw(st.integers(0, len(shifts) - 1))
        size = 1 << shifts[depth]
        # Few distinct indexes per level, so tables are shared and runs meet.
        va = 0
        for dd in range(depth + 1):
            top = b.va[half] if dd == 0 else shifts[dd - 1]
            count = 1 << (top - shifts[dd])
            va |= draw(st.sampled_from([0, 1, 2, count - 1])) % count << shifts[dd]
        if half:
            va |= ((1 << 64) - 1) ^ ((1 << b.va[1]) - 1)
        paddr = draw(st.sampled_from([0x4000_0000, 0x8000_0000, 1 << 40, 1 << (pa_bits - 1)]))
        paddr += draw(st.integers(0, 3)) * size
        attrs = AF | AP_EL0
        for _ in range(draw(st.integers(0, 3))):
            attrs ^= draw(LEAF_BITS)
        try:
            b.map(va, paddr & ~(size - 1), size, attrs=attrs, table_attrs=draw(TABLE_BITS))
        except (AssertionError, MemoryError):
            continue  # the path holds a block or the RAM is full: keep what was built
        vas.append(va)
    # Corruption: raw descriptors anywhere in the tables (self and cross pointers, blocks
    # where none may be, reserved level-3 encodings, addresses beyond PS).
    tables = list(range(b.ram_base, b._next, granule))
    for _ in range(draw(st.integers(0, 6))):
        where = draw(st.sampled_from(tables)) + 8 * draw(st.integers(0, 3))
        target = draw(st.sampled_from([*tables, 1 << 51, 0x4000_0000 + 64 * granule]))
        bits = draw(st.sampled_from([0, 1, 2, 3])) | draw(TABLE_BITS) | draw(LEAF_BITS)
        b.write(where, b.encode_oa(target) if target < 1 << 50 else target | bits)
        b.write(where, b.read(where) | bits)
    hd = draw(st.booleans())
    tbi = (draw(st.booleans()), draw(st.booleans()))
    hpd = (draw(st.booleans()), draw(st.booleans()))
    return b, pa_bits, hd, tbi, hpd, vas


class Ram(dict):
    """Guest RAM as the reference reads it: nonzero words stored, zeros inside [lo, hi)."""

    def __init__(self, words: dict[int, int], lo: int, hi: int) -> None:
        super().__init__(words)
        self.lo, self.hi = lo, hi

    def __contains__(self, addr: object) -> bool:
        return isinstance(addr, int) and self.lo <= addr < self.hi

    def __missing__(self, addr: int) -> int:
        return 0


def memory_of(b: Arm64TableBuilder) -> Ram:
    words = struct.unpack(f"<{len(b.ram) // 8}Q", b.ram)
    nonzero = {b.ram_base + 8 * i: w for i, w in enumerate(words) if w}
    return Ram(nonzero, b.ram_base, b.ram_base + len(b.ram))


def build(space) -> tuple[Arm64Translator, Regime, dict[int, int], tuple[int, int]]:
    b, pa_bits, hd, tbi, hpd, _ = space
    tr = b.translator(
        lpa2=b.fmt == "lpa2",
        pa_bits=pa_bits,
        tbi0=tbi[0],
        tbi1=tbi[1],
        hpd0=hpd[0],
        hpd1=hpd[1],
        hd=hd,
    )
    r = Regime(
        b.granule.bit_length() - 1,
        64 - b.va[0],
        64 - b.va[1],
        b.fmt == "lpa2",
        pa_bits,
        tbi,
        hpd,
        hd,
    )
    return tr, r, memory_of(b), (b.ttbr(0), b.ttbr(1))


def probe_addresses(space, data: st.DataObject) -> list[int]:
    b, *_, vas = space
    out = []
    for va in vas:
        out += [va, va + b.granule - 1, va + b.granule, va ^ (0x5A << 56)]
    out += data.draw(st.lists(st.integers(0, (1 << 64) - 1), max_size=8))
    return [va & ((1 << 64) - 1) for va in out]


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(spaces(), st.data())
def test_translate_agrees_with_the_reference(space, data: st.DataObject) -> None:
    tr, r, mem, ttbr = build(space)
    for va in probe_addresses(space, data):
        ref = ref_translate(mem, ttbr, r, va)
        try:
            t = tr.translate(va)
        except PageFault:
            assert ref is None, f"{va:#x}: walker faults, reference gives {ref}"
            continue
        assert ref is not None, f"{va:#x}: walker gives {t}, the reference faults"
        assert t.paddr == ref.oa + (va & (ref.size - 1)), hex(va)
        got = (t.page_size, t.writable, t.user, t.nx, t.global_, t.accessed)
        assert got == expected(ref), hex(va)
        walk = tr.walk(va)
        assert walk.translation is not None and walk.translation.paddr == t.paddr


def ref_mappings(mem, ttbr, r: Regime) -> list[Mapping]:
    """Every mapped leaf of both halves (untagged addresses), coalesced as vmishell promises.

    Depth-first over the tables the reference walk reaches: at each level,
    every valid descriptor of the table is walked with s1_walk, which says
    whether it is a leaf (kept), a table (descended) or a fault (skipped).
    """
    leaves: list[tuple[int, int, int, int]] = []
    granulebits, stride = r.granulebits, r.granulebits - 3
    for upper in (0, 1):
        inputsize = 64 - (r.t1sz if upper else r.t0sz)
        startlevel = FINAL_LEVEL - (((inputsize - 1) - granulebits) // stride)
        region = (1 << 64) - (1 << inputsize) if upper else 0
        stack = [(startlevel, region)]
        while stack:
            level, va = stack.pop()
            lsb = (FINAL_LEVEL - level) * stride + granulebits
            msb = inputsize - 1 if level == startlevel else lsb + stride - 1
            table = _table_of(mem, ttbr, r, va, level)
            if table is None:
                continue
            for index in range(1 << (msb - lsb + 1)):
                if not mem.get(table | index << 3, 0) & 1:
                    continue
                v = va | index << lsb
                kind, value = s1_walk(mem, ttbr, r, v, until=level)
                if kind == "leaf":
                    size, w, u, nx, _, _ = expected(value)
                    flags = (2 if w else 0) | (4 if u else 0) | (8 if nx else 0)
                    leaves.append((v, value.oa, size, flags))
                elif kind == "table":
                    stack.append((level + 1, v))
    leaves.sort()
    runs: list[list[int]] = []
    for v, p, size, f in leaves:
        last = runs[-1] if runs else None
        if last and last[0] + last[2] == v and last[1] + last[2] == p and last[3] == f:
            last[2] += size
        else:
            runs.append([v, p, size, f])
    return [Mapping(v, p, s, bool(f & 2), bool(f & 4), bool(f & 8)) for v, p, s, f in runs]


def _table_of(mem, ttbr, r: Regime, va: int, level: int) -> int | None:
    """The table the walk of `va` reads at `level` (None when the walk stops before it)."""
    upper = (va >> 55) & 1
    inputsize = 64 - (r.t1sz if upper else r.t0sz)
    startlevel = FINAL_LEVEL - (((inputsize - 1) - r.granulebits) // (r.granulebits - 3))
    if level == startlevel:
        # The walk of `va` at its first level reads TTBR's table: ask for a walk that
        # stops at once by probing index 0 of that table (any va of the region will do).
        t = ttbr[upper]
        if t is None:
            return None
        stride, granulebits = r.granulebits - 3, r.granulebits
        oa52 = r.ps == 52 and (r.ds or granulebits == 16)
        low = 3 + inputsize - ((3 - startlevel) * stride + granulebits)
        if oa52:
            return (((t >> 2) & 0xF) << 48 | (t & ((1 << 48) - 1))) & ~((1 << max(low, 6)) - 1)
        return t & ((1 << 48) - 1) & ~((1 << low) - 1)
    kind, value = s1_walk(mem, ttbr, r, va, until=level - 1)
    return value if kind == "table" else None


@SETTINGS
@given(spaces())
def test_mappings_and_runs_agree_with_the_reference(space) -> None:
    tr, r, mem, ttbr = build(space)
    want = ref_mappings(mem, ttbr, r)
    assert list(tr.mappings()) == want
    assert [Mapping(*t) for t in tr.runs()] == want
