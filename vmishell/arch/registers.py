"""From control registers (or what a kernel profile says) to a paging mode and a DTB.

The CPU picks its paging mode from CR0.PG, CR4.PAE, EFER.LMA and CR4.LA57;
these helpers apply the same rules to captured registers so callers never
guess. Without registers (a dump with no CPU state), `mode_for` picks the mode
from what the kernel itself was built for.
"""

from __future__ import annotations

from vmishell.arch.modes import PagingMode
from vmishell.errors import TranslationError
from vmishell.sources.base import Registers

CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11

#: Linux PTI allocates each PGD as an 8 KiB pair: kernel copy, then user copy.
PTI_USER_PGD_BIT = 1 << 12


def mode_from_registers(regs: Registers) -> PagingMode:
    """The paging mode the vCPU was in when `regs` were captured.

    Raises TranslationError when paging is off (virtual = physical, nothing to
    walk) or when CR0/CR4 are missing. A missing EFER falls back on the
    reported architecture: an x86_64 guest with paging and PAE on is in long
    mode once its kernel runs.
    """
    if regs.cr0 is None or regs.cr4 is None:
        raise TranslationError(
            f"cannot tell the paging mode: CR0={regs.cr0!r} CR4={regs.cr4!r} (need both)"
        )
    if not regs.cr0 & CR0_PG:
        raise TranslationError(f"paging is off (CR0={regs.cr0:#x}): addresses are physical")
    if not regs.cr4 & CR4_PAE:
        return PagingMode.LEGACY
    if regs.efer is None:
        long_mode = regs.arch == "x86_64"
    else:
        # LMA is what the CPU reports; LME with PG on implies it (some dumps lag).
        long_mode = bool(regs.efer & (EFER_LMA | EFER_LME))
    if not long_mode:
        return PagingMode.PAE
    return PagingMode.LEVEL5 if regs.cr4 & CR4_LA57 else PagingMode.LEVEL4


def nxe_from_registers(regs: Registers) -> bool:
    """Whether EFER.NXE enables the XD bit; assumed on for x86_64 when EFER is unknown."""
    if regs.efer is None:
        return regs.arch == "x86_64"
    return bool(regs.efer & EFER_NXE)


def pse_from_registers(regs: Registers) -> bool:
    """Whether CR4.PSE allows 4 MiB pages in legacy 32-bit paging."""
    return bool(regs.cr4 is not None and regs.cr4 & CR4_PSE)


def mode_for(pointer_size: int, pae: bool = False, la57: bool = False) -> PagingMode:
    """The paging mode of a kernel known only from its profile.

    `pointer_size` is 4 or 8; `pae` matters for 32-bit kernels (CONFIG_X86_PAE),
    `la57` for 64-bit ones (5-level paging actually enabled, e.g. Linux's
    `__pgtable_l5_enabled`).
    """
    if pointer_size == 4:
        return PagingMode.PAE if pae else PagingMode.LEGACY
    if pointer_size == 8:
        return PagingMode.LEVEL5 if la57 else PagingMode.LEVEL4
    raise TranslationError(f"no x86 paging mode has {pointer_size}-byte pointers")


def dtb_from_cr3(cr3: int, mode: PagingMode, maxphyaddr: int = 52) -> int:
    """The physical address of the top-level table that `cr3` designates.

    Drops what is not an address: the PCID or PWT/PCD bits (11:0, or 4:0 for
    the 32-byte aligned PAE PDPT), the no-flush bit 63 and bits at or above
    MAXPHYADDR. Bit 12 is kept: see `kernel_dtb`.
    """
    spec = mode.spec
    width = min(maxphyaddr, spec.max_entry_address_bits)
    return cr3 & spec.cr3_mask & ((1 << width) - 1)


def kernel_dtb(cr3: int, mode: PagingMode, maxphyaddr: int = 52) -> int:
    """The kernel half of a Linux PTI page-table pair, from a CR3 of either half.

    With page-table isolation (PTI, the Meltdown mitigation) Linux allocates
    every PGD as an 8 KiB-aligned pair: the kernel PGD first, the user PGD at
    kernel + 0x1000, which maps almost nothing of the kernel. A CR3 captured
    while the vCPU ran user code points at the user copy, so clearing bit 12
    gives the kernel copy. Only ask for this when PTI is known to be on
    (X86_FEATURE_PTI, no `nopti`/`pti=off`): without PTI a PGD is a single
    page and bit 12 is an ordinary address bit. 32-bit modes have no PTI pair,
    so their DTB is returned unchanged.
    """
    dtb = dtb_from_cr3(cr3, mode, maxphyaddr)
    if mode in (PagingMode.LEVEL4, PagingMode.LEVEL5):
        dtb &= ~PTI_USER_PGD_BIT
    return dtb
