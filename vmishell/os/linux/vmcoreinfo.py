"""The kernel's own VMCOREINFO note: where it put itself, straight from the kernel.

Dumps from QEMU with `-device vmcoreinfo` (ELF and kdump) and from kdump-tools
carry the text the kernel filled in at boot: KERNELOFFSET (the KASLR slide),
NUMBER(phys_base), and run-time addresses of symbols such as init_top_pgt.
From these the kernel's placement follows without a search. It is still
cross-checked with what the banner search relies on (the profile's
linux_banner at the implied physical address, init_task named swapper, the
page tables mapping the banner where they should), because the note is guest
data: a mismatch means the banner search decides.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmishell.arch import PagingMode, Translator, mode_from_registers
from vmishell.errors import GuestDataError, VmiError
from vmishell.os.linux.kernel import X86_64_KERNEL_MAP, KernelHints, KernelLocation
from vmishell.sources.base import PhysicalSource, Registers
from vmishell.symbols.placement import _comm_is_swapper
from vmishell.symbols.placement import kernel_phys as _kernel_phys
from vmishell.symbols.profile import Profile

#: Lines and bytes of VMCOREINFO text looked at (the kernel's is ~3 KiB, 130 lines).
MAX_LINES = 4096
MAX_TEXT = 1 << 20
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class VmcoreInfo:
    """VMCOREINFO as KEY=VALUE entries (`SYMBOL(x)` and `NUMBER(x)` keys kept as written)."""

    entries: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> VmcoreInfo:
        entries: dict[str, str] = {}
        for line in text[:MAX_TEXT].splitlines()[:MAX_LINES]:
            key, eq, value = line.partition("=")
            if eq and key and key not in entries:
                entries[key] = value.strip()
        return cls(entries)

    def _int(self, key: str, base: int) -> int | None:
        value = self.entries.get(key)
        if value is None:
            return None
        try:
            return int(value, base)
        except ValueError:
            raise GuestDataError(f"VMCOREINFO {key}={value[:40]!r} is not a number") from None

    @property
    def release(self) -> str | None:
        return self.entries.get("OSRELEASE")

    @property
    def kernel_offset(self) -> int | None:
        """KERNELOFFSET: the virtual KASLR slide (hex)."""
        return self._int("KERNELOFFSET", 16)

    @property
    def phys_base(self) -> int | None:
        """NUMBER(phys_base): decimal, like every NUMBER() (QEMU's kdump header reads it as hex)."""
        return self._int("NUMBER(phys_base)", 10)

    def symbol(self, name: str) -> int | None:
        """Run-time address of SYMBOL(name) (hex)."""
        return self._int(f"SYMBOL({name})", 16)

    def number(self, name: str) -> int | None:
        return self._int(f"NUMBER({name})", 10)

    def value(self, key: str) -> int | None:
        """An entry written either way the kernel does: "0x..." hex, or decimal.

        arm64 prints NUMBER(kimage_voffset) and NUMBER(TCR_EL1_T1SZ) as 0x-prefixed
        hex but NUMBER(VA_BITS) and PAGESIZE as decimal.
        """
        text = self.entries.get(key)
        if text is None:
            return None
        return self._int(key, 16 if text[:2].lower() == "0x" else 10)


def vmcoreinfo_of(source: PhysicalSource) -> VmcoreInfo | None:
    """The source's VMCOREINFO (dumps that carry the note), else None."""
    text = getattr(source, "vmcoreinfo", None)
    if not isinstance(text, str) or not text:
        return None
    info = VmcoreInfo.parse(text)
    return info if info.entries else None


def vmcoreinfo_at(source: PhysicalSource, paddr: int, release: str | None) -> VmcoreInfo | None:
    """The VMCOREINFO text the kernel keeps in the page at `paddr`, if it is there.

    The page must start with OSRELEASE= naming `release` (when given): a
    pointer read from guest memory may lead anywhere.
    """
    if paddr % 4096:
        return None
    try:
        raw = source.read(paddr, 4096)
    except VmiError:
        return None
    text = raw.split(b"\0", 1)[0].decode("ascii", "replace")
    if not text.startswith("OSRELEASE="):
        return None
    info = VmcoreInfo.parse(text)
    if release is not None and info.release != release:
        return None
    return info


def locate_by_vmcoreinfo(
    source: PhysicalSource, profile: Profile, info: VmcoreInfo, regs: Registers | None
) -> KernelLocation | None:
    """The kernel's placement from VMCOREINFO, checked; GuestDataError says what disagreed.

    None for a 32-bit kernel, whose note has no KERNELOFFSET (the banner search
    is cheap there).
    """
    hints = KernelHints.from_profile(profile)
    if hints.arch != "x86_64":
        return None
    slide, phys_base = info.kernel_offset, info.phys_base
    top = info.symbol("init_top_pgt")
    if top is None:
        top = info.symbol("swapper_pg_dir")
    if slide is None or phys_base is None or top is None:
        raise GuestDataError("VMCOREINFO lacks KERNELOFFSET, phys_base or init_top_pgt")
    stext = info.symbol("_stext")
    if (
        stext is not None
        and profile.has_symbol("_stext")
        and stext - profile.symbol_address("_stext") != slide
    ):
        raise GuestDataError(
            f"VMCOREINFO's _stext {stext:#x} is not the profile's moved by "
            f"KERNELOFFSET {slide:#x}: another kernel than the profile's"
        )
    physical_shift = (phys_base + slide) & _MASK64
    dtb = (top - X86_64_KERNEL_MAP + phys_base) & _MASK64
    if regs is not None and regs.cr0 is not None and regs.cr4 is not None:
        mode = mode_from_registers(regs)
    else:
        mode = PagingMode.LEVEL5 if info.number("pgtable_l5_enabled") == 1 else PagingMode.LEVEL4
    banner_paddr = _kernel_phys("x86_64", hints.linux_banner, physical_shift)
    try:
        banner = source.read(banner_paddr, len(hints.banner))
    except VmiError:
        banner = b""
    if banner != hints.banner:
        raise GuestDataError(
            f"VMCOREINFO puts linux_banner at physical {banner_paddr:#x}, "
            "which does not hold the profile's banner"
        )
    if not _comm_is_swapper(source, hints, physical_shift):
        raise GuestDataError("VMCOREINFO's placement does not put swapper at init_task")
    try:
        mapped = Translator(source, dtb, mode).translate(hints.linux_banner + slide).paddr
    except VmiError as exc:
        raise GuestDataError(
            f"VMCOREINFO's page table at {dtb:#x} does not map the banner: {exc}"
        ) from None
    if mapped != banner_paddr:
        raise GuestDataError(
            f"VMCOREINFO's page table at {dtb:#x} maps the banner to {mapped:#x}, "
            f"not {banner_paddr:#x}"
        )
    return KernelLocation("x86_64", mode, dtb, physical_shift, slide, banner_paddr, regs)


__all__ = ["VmcoreInfo", "locate_by_vmcoreinfo", "vmcoreinfo_at", "vmcoreinfo_of"]
