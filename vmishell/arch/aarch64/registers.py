"""From AArch64 system registers (TCR_EL1, TTBR0/1_EL1) to translator settings.

The fields are read as the MMU reads them (ARM DDI 0487, D19 TCR_EL1), so a
caller with register values never has to know that TG0 and TG1 encode the
granules differently, or that EPDn switches a whole half off.
"""

from __future__ import annotations

from typing import Any

from vmishell.arch.aarch64.spec import IPS_BITS, TG0_GRANULES, TG1_GRANULES
from vmishell.errors import TranslationError
from vmishell.sources.base import Registers

TCR_EPD0 = 1 << 7
TCR_EPD1 = 1 << 23
TCR_TBI0 = 1 << 37
TCR_TBI1 = 1 << 38
TCR_HA = 1 << 39
TCR_HD = 1 << 40
TCR_HPD0 = 1 << 41
TCR_HPD1 = 1 << 42
TCR_DS = 1 << 59


def settings_from_tcr(tcr: int) -> dict[str, Any]:
    """The translator keywords TCR_EL1 encodes (granules, VA widths, DS, IPS, TBI, HPD, HD).

    `enabled0`/`enabled1` are False when EPD0/EPD1 disable walks of a half.
    Raises TranslationError for reserved encodings (TG, IPS).
    """
    tg0, tg1 = (tcr >> 14) & 3, (tcr >> 30) & 3
    ips = (tcr >> 32) & 7
    if tg0 not in TG0_GRANULES:
        raise TranslationError(f"TCR_EL1 {tcr:#x}: reserved TG0 encoding {tg0:#b}")
    if tg1 not in TG1_GRANULES:
        raise TranslationError(f"TCR_EL1 {tcr:#x}: reserved TG1 encoding {tg1:#b}")
    if ips not in IPS_BITS:
        raise TranslationError(f"TCR_EL1 {tcr:#x}: reserved IPS encoding {ips:#b}")
    return {
        "granule": TG0_GRANULES[tg0],
        "granule1": TG1_GRANULES[tg1],
        "va_bits": 64 - (tcr & 0x3F),
        "va_bits1": 64 - ((tcr >> 16) & 0x3F),
        "lpa2": bool(tcr & TCR_DS),
        "pa_bits": IPS_BITS[ips],
        "tbi0": bool(tcr & TCR_TBI0),
        "tbi1": bool(tcr & TCR_TBI1),
        "hpd0": bool(tcr & TCR_HPD0),
        "hpd1": bool(tcr & TCR_HPD1),
        "hd": bool(tcr & TCR_HD),
        "enabled0": not tcr & TCR_EPD0,
        "enabled1": not tcr & TCR_EPD1,
    }


def system_registers(regs: Registers) -> tuple[int, int | None, int | None]:
    """(TCR_EL1, TTBR0_EL1, TTBR1_EL1) from `regs.extra`, keys in any case.

    Sources report AArch64 system registers in `Registers.extra` under their
    architectural names ("TCR_EL1", "TTBR0_EL1", "TTBR1_EL1").
    """
    extra = {k.upper(): v for k, v in regs.extra.items()}
    tcr = extra.get("TCR_EL1")
    if tcr is None:
        raise TranslationError(f"the {regs.arch} registers carry no TCR_EL1")
    return tcr, extra.get("TTBR0_EL1"), extra.get("TTBR1_EL1")
