"""What the guest kernel learned about its CPU at boot: MAXPHYADDR and page-table isolation.

Both change how page tables must be read, and neither can be guessed from
the paging mode: the physical-address width masks every entry, and with
page-table isolation (PTI, the Meltdown mitigation) a process runs user code
on a second top-level table whose rights differ from the kernel's copy. The
kernel keeps both facts in `boot_cpu_data` (a `struct cpuinfo_x86` inside
its image), so they are read from there, physically, once per attach.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmishell.errors import SymbolNotFound, VmiError
from vmishell.os.linux.kernel import KernelLocation
from vmishell.sources.base import PhysicalSource
from vmishell.symbols.profile import Profile

#: X86_FEATURE_PTI: word 7, bit 11 of x86_capability since PTI exists (4.15).
X86_FEATURE_PTI = 7 * 32 + 11
#: The architectural default when the kernel does not say (the widest x86 allows).
DEFAULT_MAXPHYADDR = 52
#: x86_phys_bits values a real CPU can report (32-bit CPUs without PAE/PSE-36 say 32).
_PLAUSIBLE_PHYS_BITS = range(32, 53)


@dataclass(frozen=True, slots=True)
class KernelCpu:
    """CPU facts as the kernel recorded them; `None` where it could not be told."""

    phys_bits: int | None
    pti: bool | None

    @property
    def maxphyaddr(self) -> int:
        return self.phys_bits or DEFAULT_MAXPHYADDR


def kernel_cpu(source: PhysicalSource, profile: Profile, location: KernelLocation) -> KernelCpu:
    """Read `boot_cpu_data.x86_phys_bits` and its X86_FEATURE_PTI bit.

    A value outside what a CPU can report (a corrupt or hostile guest) is
    treated as unknown, not trusted: the defaults then apply (52 bits, no
    PTI pair assumed).
    """
    if not profile.has_symbol("boot_cpu_data") or not profile.has_type("cpuinfo_x86"):
        return KernelCpu(None, None)
    base = location.physical(profile.symbol_address("boot_cpu_data"))
    try:
        bits_at = profile.offset_of("cpuinfo_x86", "x86_phys_bits")
        caps = profile.field("cpuinfo_x86", "x86_capability")
    except SymbolNotFound:
        return KernelCpu(None, None)
    phys_bits: int | None
    try:
        phys_bits = source.read(base + bits_at, 1)[0]
    except VmiError:
        phys_bits = None
    if phys_bits not in _PLAUSIBLE_PHYS_BITS:
        phys_bits = None
    word, bit = divmod(X86_FEATURE_PTI, 32)
    pti: bool | None = None
    if (caps.type.count or 0) > word:
        try:
            raw = source.read(base + caps.offset + 4 * word, 4)
            pti = bool(int.from_bytes(raw, "little") >> bit & 1)
        except VmiError:
            pti = None
    return KernelCpu(phys_bits, pti)
