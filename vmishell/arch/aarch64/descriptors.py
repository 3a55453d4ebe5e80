"""Bits of AArch64 stage-1 descriptors and how they read, for the walker and for teaching.

Kept apart from the walker so the decoding shown by `walk()` and the masks
on the hot path come from one place (ARM DDI 0487, D8.3 "Translation table
descriptor formats").
"""

from __future__ import annotations

from vmishell.arch.results import Arm64Flags

VALID = 1 << 0
#: bits[1:0]: 0b11 is a table (levels < 3) or a page (level 3); 0b01 a block.
TYPE_TABLE = 1 << 1
ATTR_INDX_SHIFT = 2
NS = 1 << 5
AP_EL0 = 1 << 6  # AP[1]: EL0 may access
AP_RO = 1 << 7  # AP[2]: read-only at every EL
AF = 1 << 10
NG = 1 << 11
GP = 1 << 50
DBM = 1 << 51
CONTIGUOUS = 1 << 52
PXN = 1 << 53
UXN = 1 << 54
# Table descriptors: restrictions on everything below them (ignored with HPD).
PXN_TABLE = 1 << 59
UXN_TABLE = 1 << 60
AP_TABLE_NO_EL0 = 1 << 61  # APTable[0]
AP_TABLE_RO = 1 << 62  # APTable[1]
NS_TABLE = 1 << 63

#: The hierarchical bits as one mask: `(e >> 59) & 0xF` is PXN, UXN, no-EL0, RO (bits 0-3).
HIER_SHIFT = 59

_SH = {0: "non-shareable", 1: "SH=01 (reserved)", 2: "outer shareable", 3: "inner shareable"}
_AP = {
    0: "EL1 rw, EL0 none",
    1: "EL1 rw, EL0 rw",
    2: "EL1 ro, EL0 none",
    3: "EL1 ro, EL0 ro",
}

_LEAF_BITS = (
    (NS, Arm64Flags.NS),
    (AP_EL0, Arm64Flags.AP_EL0),
    (AP_RO, Arm64Flags.AP_RO),
    (AF, Arm64Flags.AF),
    (NG, Arm64Flags.NG),
    (GP, Arm64Flags.GP),
    (DBM, Arm64Flags.DBM),
    (CONTIGUOUS, Arm64Flags.CONTIGUOUS),
    (PXN, Arm64Flags.PXN),
    (UXN, Arm64Flags.UXN),
)
_TABLE_BITS = (
    (PXN_TABLE, Arm64Flags.PXN_TABLE),
    (UXN_TABLE, Arm64Flags.UXN_TABLE),
    (AP_TABLE_NO_EL0, Arm64Flags.AP_TABLE_NO_EL0),
    (AP_TABLE_RO, Arm64Flags.AP_TABLE_RO),
    (NS_TABLE, Arm64Flags.NS_TABLE),
)


def decode_flags(entry: int, *, leaf: bool, last: bool, ds: bool, hpd: bool) -> Arm64Flags:
    """The meaningful flags of `entry` at its level.

    `leaf` says the entry maps memory (a block, or a page at level 3); `last`
    that it sits at level 3, where bits[1:0] = 11 mean a page. `ds` moves
    bits 9:8 from shareability to the output address; `hpd` leaves the table
    bits 62:59 to software (they mean nothing to the walk).
    """
    if not entry & VALID:
        return Arm64Flags(0)
    flags = Arm64Flags.VALID
    if leaf:
        flags |= Arm64Flags.PAGE if last else Arm64Flags.BLOCK
        for bit, flag in _LEAF_BITS:
            if entry & bit:
                flags |= flag
    elif entry & TYPE_TABLE and not last:
        flags |= Arm64Flags.TABLE
        bits = _TABLE_BITS[4:] if hpd else _TABLE_BITS
        for bit, flag in bits:
            if entry & bit:
                flags |= flag
    return flags


def describe(entry: int, *, leaf: bool, last: bool, ds: bool, hpd: bool) -> str:
    """The descriptor's fields in words, for a teacher: kind, AP, attributes, hints."""
    if not entry & VALID:
        return "invalid (bit 0 clear)"
    kind = entry & 3
    if last and kind == 1:
        return "reserved encoding (bits[1:0] = 01 at level 3)"
    if not leaf:
        if kind == 1:
            return "block, not allowed at this level"
        parts = ["table"]
        if hpd:
            parts.append("hierarchical bits ignored (HPD)")
        else:
            ap = (entry >> 61) & 3
            if ap:
                parts.append(
                    f"APTable={ap:02b}"
                    + (" (no EL0)" if ap & 1 else "")
                    + (" (read-only)" if ap & 2 else "")
                )
            if entry & UXN_TABLE:
                parts.append("UXNTable")
            if entry & PXN_TABLE:
                parts.append("PXNTable")
        return ", ".join(parts)
    ap = (entry >> 6) & 3
    parts = [
        "page" if last else "block",
        f"AP={ap:02b} ({_AP[ap]})",
        f"AttrIndx={(entry >> ATTR_INDX_SHIFT) & 7}",
    ]
    if not ds:
        parts.append(_SH[(entry >> 8) & 3])
    parts.append("AF" if entry & AF else "AF=0 (access faults until set)")
    parts.append("nG (per ASID)" if entry & NG else "global")
    for bit, name in (
        (UXN, "UXN"),
        (PXN, "PXN"),
        (CONTIGUOUS, "contiguous hint"),
        (DBM, "DBM"),
        (GP, "GP (BTI)"),
        (NS, "NS"),
    ):
        if entry & bit:
            parts.append(name)
    return ", ".join(parts)
