"""The AArch64 stage-1 translation regimes as data, so that one walker serves them all.

A regime half (the TTBR0 or TTBR1 region of EL1&0) is fixed by its granule
(4, 16 or 64 KiB), its virtual-address width (64 - TnSZ) and two feature
switches: DS (FEAT_LPA2: 52-bit addresses with 4 and 16 KiB granules, a level
-1 for 4 KiB) and a 52-bit output size with 64 KiB granules (FEAT_LPA). From
those the ARM ARM derives the start level, how many index bits each level
takes, where blocks are allowed and where the output address sits in a
descriptor; everything here follows that derivation (ARM DDI 0487, D8.2
"Translation table walk"), and nothing else in the walker branches on the
granule.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmishell.errors import TranslationError

#: Page shift of each granule, by size in bytes.
GRANULE_SHIFTS = {4096: 12, 16384: 14, 65536: 16}

#: TCR_EL1.TG0 and TG1 encode the granule differently (ARM DDI 0487, D19 TCR_EL1).
TG0_GRANULES = {0b00: 4096, 0b01: 65536, 0b10: 16384}
TG1_GRANULES = {0b10: 4096, 0b11: 65536, 0b01: 16384}
#: TCR_EL1.IPS: intermediate physical address size in bits.
IPS_BITS = {0b000: 32, 0b001: 36, 0b010: 40, 0b011: 42, 0b100: 44, 0b101: 48, 0b110: 52}

#: How a descriptor holds output-address bits above 47 (see `OutputFormat`).
OA_48, OA_LPA2, OA_LPA = 0, 1, 2


@dataclass(frozen=True, slots=True)
class ArmLevel:
    """One lookup level of a regime half.

    `number` is the ARM ARM's level (-1 to 3); `shift` the lowest VA bit
    indexing it, so an entry spans `1 << shift` bytes; `block_ok` whether a
    block descriptor (bits[1:0] = 01) may end the walk here; `out_mask` the
    descriptor bits holding output-address bits 47/49:shift of a block here
    (or of a page, at the last level).
    """

    name: str
    number: int
    shift: int
    bits: int
    block_ok: bool
    last: bool
    out_mask: int

    @property
    def entries(self) -> int:
        return 1 << self.bits

    @property
    def span(self) -> int:
        return 1 << self.shift

    @property
    def index_mask(self) -> int:
        return (1 << self.bits) - 1

    @property
    def table_size(self) -> int:
        return 8 << self.bits


@dataclass(frozen=True, slots=True)
class HalfSpec:
    """The geometry of one TTBR region: granule, VA width, levels, descriptor format.

    `half` is 0 (TTBR0, VA bit 55 clear) or 1 (TTBR1). `tbi` (top-byte
    ignore) leaves VA bits 63:56 out of the range check; `hpd` (hierarchical
    permission disable) makes the walker ignore APTable/UXNTable/PXNTable.
    `oa_format` says where output-address bits above 47 live (OA_48: nowhere,
    OA_LPA2: bits 9:8 hold OA[51:50], OA_LPA: bits 15:12 hold OA[51:48], which
    is every 64 KiB descriptor's format on a FEAT_LPA CPU); output addresses
    at or above `pa_bits` (TCR_EL1.IPS) are address-size faults.
    """

    half: int
    granule: int
    va_bits: int
    levels: tuple[ArmLevel, ...]
    tbi: bool
    hpd: bool
    oa_format: int
    pa_bits: int

    @property
    def name(self) -> str:
        return f"TTBR{self.half}"

    @property
    def page_shift(self) -> int:
        return GRANULE_SHIFTS[self.granule]

    @property
    def start_level(self) -> int:
        return self.levels[0].number

    @property
    def top_table_size(self) -> int:
        return self.levels[0].table_size

    @property
    def table_mask(self) -> int:
        """Descriptor bits holding a next-level table's address bits 47/49:granule."""
        return self.levels[-1].out_mask

    @property
    def region(self) -> tuple[int, int]:
        """The untagged VA range [lo, hi) this half translates."""
        size = 1 << self.va_bits
        return (0, size) if self.half == 0 else ((1 << 64) - size, 1 << 64)

    def describe(self) -> str:
        kib = self.granule >> 10
        extra = {OA_48: "", OA_LPA2: ", LPA2", OA_LPA: ", LPA"}[self.oa_format]
        if self.pa_bits < 52:
            extra = ""
        return (
            f"{self.name}: {kib} KiB granule, {self.va_bits}-bit VA, "
            f"levels {self.levels[0].number}..3{extra}"
        )


def half_spec(
    half: int,
    granule: int,
    va_bits: int,
    *,
    ds: bool = False,
    pa_bits: int = 48,
    tbi: bool = False,
    hpd: bool = False,
) -> HalfSpec:
    """The levels of one regime half, derived as the ARM ARM does.

    Raises TranslationError for combinations the architecture does not
    define: an unknown granule, a VA width outside 25..48 bits (up to 52 with
    DS for 4/16 KiB, always allowed up to 52 for 64 KiB as FEAT_LVA), or DS
    with a 64 KiB granule.
    """
    if granule not in GRANULE_SHIFTS:
        raise TranslationError(f"no AArch64 granule of {granule} bytes (4, 16 or 64 KiB)")
    if ds and granule == 65536:
        raise TranslationError("TCR_EL1.DS (LPA2) applies to 4 and 16 KiB granules only")
    s = GRANULE_SHIFTS[granule]
    widest = 52 if ds or granule == 65536 else 48
    if not 25 <= va_bits <= widest:
        raise TranslationError(
            f"a {va_bits}-bit VA is not defined with a {granule >> 10} KiB granule"
            f"{' and DS' if ds else ''} (25..{widest} bits)"
        )
    if pa_bits not in IPS_BITS.values():
        raise TranslationError(f"no AArch64 physical address size of {pa_bits} bits")
    b = s - 3  # index bits per full level: a table is one granule of 8-byte descriptors
    count = -(-(va_bits - s) // b)
    start = 4 - count
    # As AArch64.NextTableBase and S1OAFromDescriptor read them on a FEAT_LPA CPU, 64 KiB
    # descriptors hold OA[51:48] in bits 15:12 whatever IPS says (address-size fault below 52).
    oa_format = OA_LPA if granule == 65536 else (OA_LPA2 if ds else OA_48)
    top_oa = 50 if oa_format == OA_LPA2 else 48  # descriptor bits [top_oa-1:shift]
    levels = []
    for n in range(start, 4):
        shift = s + (3 - n) * b
        bits = b if n > start else va_bits - shift
        levels.append(
            ArmLevel(
                name=f"L{n}",
                number=n,
                shift=shift,
                bits=bits,
                block_ok=n < 3 and _block_allowed(granule, n, ds, pa_bits),
                last=n == 3,
                out_mask=((1 << top_oa) - 1) & ~((1 << shift) - 1),
            )
        )
    return HalfSpec(half, granule, va_bits, tuple(levels), tbi, hpd, oa_format, pa_bits)


def _block_allowed(granule: int, level: int, ds: bool, pa_bits: int) -> bool:
    """Where a block descriptor is valid (elsewhere bits[1:0] = 01 is a translation fault).

    4 KiB: levels 1 and 2 (1 GiB, 2 MiB), level 0 (512 GiB) with DS.
    16 KiB: level 2 (32 MiB), level 1 (64 GiB) with DS.
    64 KiB: level 2 (512 MiB), level 1 (4 TiB) with a 52-bit output (FEAT_LPA).
    """
    if level == 2:
        return True
    if granule == 4096:
        return level == 1 or (level == 0 and ds)
    if granule == 16384:
        return level == 1 and ds
    return level == 1 and pa_bits == 52


def ttbr_base(ttbr: int, spec: HalfSpec) -> int:
    """The physical address of the top table a TTBRn_EL1 value designates.

    Drops the ASID (63:48) and CnP (bit 0); with a 52-bit output format
    (LPA2, or 64 KiB with LPA) bits 5:2 hold BADDR[51:48]. Bits below the top
    table's alignment are RES0: ignored here, as implementations may.
    """
    base = ttbr & 0x0000_FFFF_FFFF_FFFE
    if spec.oa_format != OA_48 and spec.pa_bits == 52:
        base = (base & ~0x3F) | ((ttbr >> 2) & 0xF) << 48
        align = max(spec.top_table_size, 64)
    else:
        align = max(spec.top_table_size, 8)
    return base & ~(align - 1)
