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
from vmishell.sources.framespace import to_walk, walk_source
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
from vmishell.symbols.placement import link_base as _link_base
from vmishell.symbols.profile import Profile

__all__ = [
    "I386_PAGE_OFFSET",
    "I386_PAGE_OFFSET_RANGE",
    "I386_SEARCH_ORIGIN",
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

#: Where the physical search for an i386 kernel starts counting. Only the grid matters
#: (PAGE_OFFSET is a multiple of 2 MiB with every VMSPLIT choice); the kernel's real
#: PAGE_OFFSET is read from the profile or the kernel's page tables (`_i386_page_offset`).
I386_SEARCH_ORIGIN = I386_PAGE_OFFSET
#: PAGE_OFFSET is at least 1 GiB (VMSPLIT_1G) and below the last 256 MiB (fixmap, vmalloc).
I386_PAGE_OFFSET_RANGE = range(0x40000000, 0xF0000000, 0x400000)
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
    #: The virtual address link-time addresses count from: __START_KERNEL_map on
    #: x86_64, the kernel's own PAGE_OFFSET on i386 (its image lies in the direct map).
    link_base: int = X86_64_KERNEL_MAP

    def virtual(self, symbol_address: int) -> int:
        """Run-time virtual address of a symbol given at its link-time address."""
        return symbol_address + self.virtual_shift

    def physical(self, symbol_address: int) -> int:
        """Physical address of a kernel-image symbol given at its link-time address."""
        return symbol_address - self.link_base + self.physical_shift

    @property
    def page_offset(self) -> int | None:
        """i386 PAGE_OFFSET (virtual = physical + PAGE_OFFSET in lowmem); None on x86_64."""
        return self.link_base if self.arch == "i386" else None


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
        if _maps(translator, banner_link + shift, banner_paddr):
            return shift
    return None


def _maps(translator: Translator, vaddr: int, paddr: int) -> bool:
    try:
        return translator.translate(vaddr).paddr == paddr
    except VmiError:
        return False


def _i386_page_offset(
    profile: Profile,
    translator: Translator,
    banner_paddr: int,
    init_task_paddr: int,
    in_walk: Callable[[int], int] = lambda paddr: paddr,
) -> int | None:
    """The i386 kernel's PAGE_OFFSET, which its page tables confirm.

    The profile tells it when it has `phys_startup_32`, the linker's absolute
    `startup_32 - PAGE_OFFSET` (System.map has it; kallsyms leaves absolute
    symbols out). Otherwise the kernel's own page tables tell it: lowmem,
    the kernel image included, is mapped at physical + PAGE_OFFSET, so the
    one candidate under which both linux_banner and init_task land where
    they were found is it. A VMSPLIT choice or a custom CONFIG_PAGE_OFFSET
    is read, never assumed. `in_walk` gives a physical address in the space the
    translator's results are in (machine addresses for a Xen PV guest).
    """
    banner_walk, init_task_walk = in_walk(banner_paddr), in_walk(init_task_paddr)

    def confirmed(offset: int) -> bool:
        return _maps(translator, banner_paddr + offset, banner_walk) and _maps(
            translator, init_task_paddr + offset, init_task_walk
        )

    if profile.has_symbol("phys_startup_32") and profile.has_symbol("startup_32"):
        offset = profile.symbol_address("startup_32") - profile.symbol_address("phys_startup_32")
        if offset in I386_PAGE_OFFSET_RANGE and confirmed(offset):
            return offset
    return next((o for o in I386_PAGE_OFFSET_RANGE if confirmed(o)), None)


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
        try:  # in the space page tables address (machine frames for a Xen PV guest)
            dtb = to_walk(source, dtb)
            banner_walk = to_walk(source, banner_paddr)
        except VmiError as exc:
            problems.append(f"physical shift {shift:#x}: {exc}")
            continue
        translator = Translator(walk_source(source), dtb, mode)
        link_base = _link_base(arch)
        if arch == "x86_64":
            vshift = _virtual_shift(translator, banner_link, banner_walk)
        else:
            init_task_paddr = _kernel_phys(arch, hints.init_task, shift)
            try:
                offset = _i386_page_offset(
                    profile,
                    translator,
                    banner_paddr,
                    init_task_paddr,
                    lambda paddr: to_walk(source, paddr),
                )
            except VmiError:
                offset = None
            if offset is None:
                vshift = None
            else:
                # i386 KASLR moves the image by one amount, physically and virtually.
                link_base, shift = offset, banner_paddr - (banner_link - offset)
                vshift = shift
        if vshift is None:
            problems.append(f"physical shift {shift:#x}: page table at {dtb:#x} does not map it")
            continue
        location = KernelLocation(
            arch, mode, dtb, shift, vshift, banner_paddr, regs, link_base=link_base
        )
        if accept is not None and not accept(location):
            problems.append(f"physical shift {shift:#x}: not the running kernel (old remains?)")
            continue
        return location
    raise GuestDataError(
        f"kernel banner found in {source.description} but its page tables did not check out: "
        + "; ".join(problems)
    )


def kernel_space(source: PhysicalSource, location: KernelLocation) -> AddressSpace:
    return AddressSpace(Translator(walk_source(source), location.dtb, location.mode))
