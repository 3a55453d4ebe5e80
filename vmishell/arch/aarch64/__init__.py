"""AArch64 stage-1 address translation: vmishell walks an arm64 guest's tables itself.

    tr = Arm64Translator(source, ttbr0=user_pgd, ttbr1=swapper_pg_dir,
                         granule=16384, va_bits=48, tbi0=True)
    tr = Arm64Translator.from_tcr(source, tcr_el1, ttbr0_el1, ttbr1_el1)
    tr.translate(0xffff800008000000)          # Translation, or PageFault
    print(tr.walk(addr))                      # every level with its descriptor bits
    AddressSpace(tr).read(addr, 4096)         # the same reader as on x86

4, 16 and 64 KiB granules, 25- to 52-bit VAs (LPA2, LVA), 48/52-bit outputs
(LPA2, LPA) are data over one walker (see `spec`).
"""

from __future__ import annotations

from vmishell.arch.aarch64.registers import settings_from_tcr
from vmishell.arch.aarch64.spec import ArmLevel, HalfSpec, half_spec, ttbr_base
from vmishell.arch.aarch64.translator import Arm64Geometry, Arm64Translator, ttbr_for_table
from vmishell.arch.results import Arm64Flags

__all__ = [
    "Arm64Flags",
    "Arm64Geometry",
    "Arm64Translator",
    "ArmLevel",
    "HalfSpec",
    "half_spec",
    "settings_from_tcr",
    "ttbr_base",
    "ttbr_for_table",
]
