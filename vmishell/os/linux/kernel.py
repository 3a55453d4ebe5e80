"""Find a Linux kernel in guest memory: its physical and virtual (KASLR) placement
and the page-table base that maps it.

The method needs no registers. The profile's `linux_banner` text is looked for
where KASLR may have put it (kernel images are placed on 2 MiB boundaries, so
only a few hundred positions are read), `init_task.comm` confirms each
candidate, the physical placement gives the address of the kernel's top-level
page table, and walking it tells the virtual placement. Registers, when the
source has them, only decide the paging mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vmishell.arch import AddressSpace, PagingMode, Translator, mode_from_registers
from vmishell.errors import GuestDataError, ProfileError, VmiError
from vmishell.limits import Limits
from vmishell.sources.base import PhysicalSource, Registers
from vmishell.symbols.placement import (
    I386_PAGE_OFFSET,
    KASLR_ALIGN,
    X86_64_KERNEL_MAP,
    KernelHints,
    aligned_shifts,
    arch_of,
    shifts_at,
)
from vmishell.symbols.placement import kernel_phys as _kernel_phys
from vmishell.symbols.profile import Profile

__all__ = [
    "I386_PAGE_OFFSET",
    "KASLR_ALIGN",
    "KERNEL_IMAGE_SIZE",
    "X86_64_KERNEL_MAP",
    "KernelHints",
    "KernelLocation",
    "aligned_shifts",
    "arch_of",
    "banner_candidates",
    "kernel_space",
    "locate_kernel",
    "shifts_at",
]

#: x86_64 randomizes the kernel image inside the 1 GiB after __START_KERNEL_map.
KERNEL_IMAGE_SIZE = 1 << 30


@dataclass(frozen=True, slots=True)
class KernelLocation:
    """Where the kernel lies: every address vmishell derives starts here."""

    arch: str
    mode: PagingMode
    dtb: int
    physical_shift: int
    virtual_shift: int
    banner_paddr: int
    registers: Registers | None

    def virtual(self, symbol_address: int) -> int:
        """Run-time virtual address of a symbol given at its link-time address."""
        return symbol_address + self.virtual_shift

    def physical(self, symbol_address: int) -> int:
        """Physical address of a kernel-image symbol given at its link-time address."""
        base = X86_64_KERNEL_MAP if self.arch == "x86_64" else I386_PAGE_OFFSET
        return symbol_address - base + self.physical_shift


def banner_candidates(source: PhysicalSource, hints: KernelHints, limits: Limits) -> list[int]:
    """Physical shifts at which the kernel described by `hints` checks out."""
    found = aligned_shifts(source, hints, limits)
    if found:
        return found
    # Slow path: any page-aligned placement (kernels built with another alignment).
    paddrs = []
    for paddr in source.find(hints.banner):
        paddrs.append(paddr)
        if len(paddrs) >= limits.max_banner_candidates:
            break
    return shifts_at(source, hints, paddrs)


def _paging_mode(
    source: PhysicalSource, profile: Profile, arch: str, shift: int, regs: Registers | None
) -> PagingMode:
    if regs is not None and regs.cr0 is not None and regs.cr4 is not None:
        return mode_from_registers(regs)
    if arch == "x86_64":
        if profile.has_symbol("__pgtable_l5_enabled"):
            flag = _kernel_phys(arch, profile.symbol_address("__pgtable_l5_enabled"), shift)
            try:
                if int.from_bytes(source.read(flag, 4), "little") == 1:
                    return PagingMode.LEVEL5
            except VmiError:
                pass
        return PagingMode.LEVEL4
    # ISF keeps no typedefs, but `struct pgprot` wraps one page-table entry's
    # flags: 8 bytes under PAE, 4 with legacy 2-level paging.
    if profile.has_type("pgprot"):
        return PagingMode.PAE if profile.size_of("pgprot") == 8 else PagingMode.LEGACY
    return PagingMode.PAE


def _dtb(profile: Profile, arch: str, shift: int) -> int:
    for name in ("init_top_pgt", "swapper_pg_dir", "init_level4_pgt"):
        if profile.has_symbol(name):
            return _kernel_phys(arch, profile.symbol_address(name), shift)
    raise ProfileError(f"profile {profile.name} has no kernel page-table symbol (init_top_pgt)")


def _virtual_shift(translator: Translator, banner_link: int, banner_paddr: int) -> int | None:
    for shift in range(0, KERNEL_IMAGE_SIZE, KASLR_ALIGN):
        try:
            if translator.translate(banner_link + shift).paddr == banner_paddr:
                return shift
        except VmiError:
            continue
    return None


def locate_kernel(
    source: PhysicalSource,
    profile: Profile,
    limits: Limits | None = None,
    *,
    accept: Callable[[KernelLocation], bool] | None = None,
    regs: Registers | None = None,
) -> KernelLocation:
    """Find the kernel that `profile` describes in `source`, or say why not.

    `accept` chooses among placements that check out: after a reboot the old
    kernel's bytes still lie in RAM, and only a sign of life (see `liveness`)
    tells the running kernel from its remains. `regs` saves asking the source again.
    """
    limits = limits or Limits()
    hints = KernelHints.from_profile(profile)
    arch = hints.arch
    if regs is None:
        try:
            regs = source.registers()
        except VmiError:
            regs = None  # no CPU state (an image) or none reachable (QMP busy): not needed
    shifts = banner_candidates(source, hints, limits)
    if not shifts:
        raise GuestDataError(
            f"the banner of profile {profile.name} ({hints.banner[:60]!r}...) was not found "
            f"with a matching init_task in {source.description}: wrong profile for this guest?"
        )
    banner_link = profile.symbol_address("linux_banner")
    problems = []
    for shift in shifts:
        mode = _paging_mode(source, profile, arch, shift, regs)
        dtb = _dtb(profile, arch, shift)
        banner_paddr = _kernel_phys(arch, banner_link, shift)
        translator = Translator(source, dtb, mode)
        if arch == "x86_64":
            vshift = _virtual_shift(translator, banner_link, banner_paddr)
        else:
            vshift = shift
            try:
                if translator.translate(banner_link + vshift).paddr != banner_paddr:
                    vshift = None
            except VmiError:
                vshift = None
        if vshift is None:
            problems.append(f"physical shift {shift:#x}: page table at {dtb:#x} does not map it")
            continue
        location = KernelLocation(arch, mode, dtb, shift, vshift, banner_paddr, regs)
        if accept is not None and not accept(location):
            problems.append(f"physical shift {shift:#x}: not the running kernel (old remains?)")
            continue
        return location
    raise GuestDataError(
        f"kernel banner found in {source.description} but its page tables did not check out: "
        + "; ".join(problems)
    )


def kernel_space(source: PhysicalSource, location: KernelLocation) -> AddressSpace:
    return AddressSpace(Translator(source, location.dtb, location.mode))
