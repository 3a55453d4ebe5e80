"""x86 address translation: vmishell walks the guest's page tables itself.

    tr = Translator(source, cr3, PagingMode.LEVEL4)   # or Translator.from_registers(source)
    tr.translate(0xffffffff81000000)                  # Translation, or PageFault
    print(tr.walk(addr))                              # every level, for teaching
    for m in tr.mappings(): ...                       # coalesced runs, whole tables at a time
    tr.run_arrays()                                   # the same as numpy arrays (whole spaces)
    AddressSpace(tr).read(addr, 4096, pad=True)       # bytes, one copy per physical run
    AddressSpace(tr).read_into(addr, buf)             # into a reused buffer, no bytes made

All four x86 paging modes (legacy 32-bit, PAE, 4-level and 5-level IA-32e)
are data over one walker; AArch64 stage 1 (TTBR0/TTBR1, 4/16/64 KiB granules)
is `vmishell.arch.aarch64.Arm64Translator`, with the same interface. Caches
follow the source's `generation`, so a live guest is re-read after
`source.refresh()`.
"""

from __future__ import annotations

from vmishell.arch.addrspace import AddressSpace
from vmishell.arch.modes import Level, ModeSpec, PagingMode
from vmishell.arch.registers import (
    dtb_from_cr3,
    kernel_dtb,
    mode_for,
    mode_from_registers,
    nxe_from_registers,
    pse_from_registers,
)
from vmishell.arch.results import EntryFlags, Mapping, Page, Translation, Walk, WalkStep
from vmishell.arch.translator import (
    DEFAULT_MAX_MAPPING_WORK,
    DEFAULT_TLB_SIZE,
    Translator,
)

#: The name the issue uses for "mode from what the kernel says" (see `mode_for`).
mode_from_profile_hints = mode_for

__all__ = [
    "DEFAULT_MAX_MAPPING_WORK",
    "DEFAULT_TLB_SIZE",
    "AddressSpace",
    "EntryFlags",
    "Level",
    "Mapping",
    "ModeSpec",
    "Page",
    "PagingMode",
    "Translation",
    "Translator",
    "Walk",
    "WalkStep",
    "dtb_from_cr3",
    "kernel_dtb",
    "mode_for",
    "mode_from_profile_hints",
    "mode_from_registers",
    "nxe_from_registers",
    "pse_from_registers",
]
