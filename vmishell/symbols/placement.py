"""Where a profile's kernel image can sit in physical memory, and whether it does.

Both choosing a profile (`finder`) and locating the kernel (`os.linux.kernel`)
test a profile against memory the same way: its `linux_banner` text must be
where a relocated image would put it, and `init_task.comm` beside it must read
"swapper/0". `KernelHints` holds the few profile facts this needs, small enough
to keep in an index so that choosing among many profiles never loads them all.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmishell.errors import ProfileError, VmiError
from vmishell.limits import Limits
from vmishell.sources.base import PhysicalSource
from vmishell.symbols.profile import Profile

#: Where x86_64 links the kernel image (__START_KERNEL_map).
X86_64_KERNEL_MAP = 0xFFFFFFFF80000000
#: i386 PAGE_OFFSET with Debian's default 3G/1G split: VA = PA + PAGE_OFFSET.
I386_PAGE_OFFSET = 0xC0000000
#: Kernel images are placed (and KASLR moves them) on 2 MiB boundaries.
KASLR_ALIGN = 0x200000


def arch_of(profile: Profile) -> str:
    """The architecture name ("x86_64" or "i386") its pointer size implies."""
    if profile.pointer_size == 8:
        return "x86_64"
    if profile.pointer_size == 4:
        return "i386"
    raise ProfileError(f"profile {profile.name}: pointer size {profile.pointer_size} is not x86")


def link_base(arch: str) -> int:
    """The virtual address the image's physical address 0 is linked at."""
    return X86_64_KERNEL_MAP if arch == "x86_64" else I386_PAGE_OFFSET


def kernel_phys(arch: str, link: int, physical_shift: int) -> int:
    """Physical address of the image byte linked at `link`, the image moved by `physical_shift`."""
    return link - link_base(arch) + physical_shift


@dataclass(frozen=True, slots=True)
class KernelHints:
    """The few facts from a profile that finding its kernel in memory needs."""

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
        return self.linux_banner - link_base(self.arch)


def _comm_is_swapper(source: PhysicalSource, hints: KernelHints, shift: int) -> bool:
    comm = kernel_phys(hints.arch, hints.init_task, shift) + hints.comm_offset
    try:
        return source.read_sparse(comm, 16).split(b"\0")[0] in (b"swapper/0", b"swapper")
    except VmiError:
        return False


def aligned_shifts(source: PhysicalSource, hints: KernelHints, limits: Limits) -> list[int]:
    """Physical shifts, on KASLR's 2 MiB grid, where banner and init_task check out.

    Reads a few hundred small pieces of memory: the fast way to test a profile.
    """
    banner, unshifted = hints.banner, hints.unshifted_banner
    found: list[int] = []
    for start in range(unshifted % KASLR_ALIGN, source.size, KASLR_ALIGN):
        if not source.is_valid(start, len(banner)):
            continue
        if source.read_sparse(start, len(banner)) != banner:
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
