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
from vmishell.symbols.profile import Profile

#: Where x86_64 links the kernel image (__START_KERNEL_map).
X86_64_KERNEL_MAP = 0xFFFFFFFF80000000
#: i386 PAGE_OFFSET with Debian's default 3G/1G split: VA = PA + PAGE_OFFSET.
I386_PAGE_OFFSET = 0xC0000000
KASLR_ALIGN = 0x200000
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


def arch_of(profile: Profile) -> str:
    return _arch(profile.pointer_size, profile.name)


def _arch(pointer_size: int, name: str) -> str:
    if pointer_size == 8:
        return "x86_64"
    if pointer_size == 4:
        return "i386"
    raise ProfileError(f"profile {name}: pointer size {pointer_size} is not x86")


@dataclass(frozen=True, slots=True)
class KernelHints:
    """The few facts from a profile that finding its kernel in memory needs.

    Small enough to keep in an index, so choosing among many profiles never
    loads them all.
    """

    name: str
    arch: str
    banner: bytes
    linux_banner: int
    init_task: int
    comm_offset: int

    @classmethod
    def from_profile(cls, profile: Profile) -> KernelHints:
        banner = profile.banner
        if not banner:
            raise ProfileError(
                f"profile {profile.name} has no linux_banner text: rebuild it with "
                "`vmishell profile build` so the kernel can be found in memory"
            )
        return cls(
            name=profile.name,
            arch=arch_of(profile),
            banner=banner.rstrip(b"\0"),
            linux_banner=profile.symbol_address("linux_banner"),
            init_task=profile.symbol_address("init_task"),
            comm_offset=profile.offset_of("task_struct", "comm"),
        )

    @property
    def unshifted_banner(self) -> int:
        """Physical address of linux_banner if the kernel were not relocated."""
        return self.linux_banner - _link_base(self.arch)


def _link_base(arch: str) -> int:
    return X86_64_KERNEL_MAP if arch == "x86_64" else I386_PAGE_OFFSET


def _kernel_phys(arch: str, link: int, physical_shift: int) -> int:
    return link - _link_base(arch) + physical_shift


def _comm_is_swapper(source: PhysicalSource, hints: KernelHints, shift: int) -> bool:
    comm = _kernel_phys(hints.arch, hints.init_task, shift) + hints.comm_offset
    try:
        return source.read(comm, 16).split(b"\0")[0] in (b"swapper/0", b"swapper")
    except VmiError:
        return False


def aligned_shifts(source: PhysicalSource, hints: KernelHints, limits: Limits) -> list[int]:
    """Physical shifts, on KASLR's 2 MiB grid, where banner and init_task check out.

    Reads a few hundred small pieces of memory: the fast way to test a profile.
    """
    banner, unshifted = hints.banner, hints.unshifted_banner
    found: list[int] = []
    for start in range(unshifted % KASLR_ALIGN, source.size, KASLR_ALIGN):
        if not source.is_valid(start, len(banner)) or source.read(start, len(banner)) != banner:
            continue
        shift = start - unshifted
        if _comm_is_swapper(source, hints, shift):
            found.append(shift)
            if len(found) >= limits.max_banner_candidates:
                break
    return found


def shifts_at(source: PhysicalSource, hints: KernelHints, banner_paddrs: list[int]) -> list[int]:
    """Physical shifts implied by banners found anywhere, kept if init_task checks out."""
    found = []
    for paddr in banner_paddrs:
        shift = paddr - hints.unshifted_banner
        if shift % 4096 == 0 and _comm_is_swapper(source, hints, shift):
            found.append(shift)
    return found


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
        try:  # in the space page tables address (machine frames for a Xen PV guest)
            dtb = to_walk(source, dtb)
            banner_walk = to_walk(source, banner_paddr)
        except VmiError as exc:
            problems.append(f"physical shift {shift:#x}: {exc}")
            continue
        translator = Translator(walk_source(source), dtb, mode)
        if arch == "x86_64":
            vshift = _virtual_shift(translator, banner_link, banner_walk)
        else:
            vshift = shift
            try:
                if translator.translate(banner_link + vshift).paddr != banner_walk:
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
    return AddressSpace(Translator(walk_source(source), location.dtb, location.mode))
