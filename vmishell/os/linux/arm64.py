"""Linux on arm64: where the kernel lies and which translation regime it runs, without registers.

QEMU 7.2 cannot report TTBR0/TTBR1/TCR_EL1 of an aarch64 guest, so the regime
(granule and virtual-address width) and the kernel's placement are read from
the kernel itself:

- physically, the profile's `linux_banner` and `init_task` are found as on x86
  (`banner_candidates`); `swapper_pg_dir`, the kernel's TTBR1 table, lies at
  its place in the image;
- VMCOREINFO, when the source carries it or the kernel's own copy is found in
  RAM, gives PAGESIZE, TCR_EL1.T1SZ (the width the kernel runs at), VA_BITS and
  the KASLR slide; the profile's `kimage_voffset` (read from the image) gives
  the slide too;
- every candidate regime (granule from VMCOREINFO or the profile, else all
  three; each width Linux can run with it) is tried, and the one whose walk of
  swapper_pg_dir maps the banner's and init_task's virtual addresses onto the
  physical places they were found at is kept. Data never decides alone: the
  kernel image's own mapping must reproduce.

A process's space is TTBR0 = the physical address of `mm->pgd` (a linear-map
address, translated through TTBR1) beside TTBR1 = swapper_pg_dir: user
addresses walk the first, kernel addresses the second. The kernel (pid 0) and
kernel threads have TTBR1 only, as Linux gives them the reserved zero TTBR0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmishell.errors import GuestDataError, VmiError
from vmishell.limits import Limits
from vmishell.os.linux.kernel import KernelLocation, banner_candidates
from vmishell.os.linux.vmcoreinfo import VmcoreInfo, vmcoreinfo_at, vmcoreinfo_of
from vmishell.sources.base import PhysicalSource, Registers
from vmishell.symbols.placement import KernelHints
from vmishell.symbols.placement import kernel_phys as _kernel_phys
from vmishell.symbols.profile import Profile

if TYPE_CHECKING:
    from vmishell.arch.aarch64 import Arm64Translator

_MASK64 = (1 << 64) - 1
GRANULES = (4096, 16384, 65536)
#: Widths Linux can run each granule with (CONFIG_ARM64_VA_BITS_*), most common first.
#: A 52-bit kernel on a CPU without LPA2/LVA falls back to 48 (4K, 64K) or 47 (16K) bits.
WIDTHS = {4096: (48, 39, 52), 16384: (47, 48, 52, 36), 65536: (48, 42, 52)}
#: Work units (see `Limits.max_mapping_work`) of one scan of the kernel half for the image.
SCAN_WORK = 1 << 18
#: Kernel-image placements tried per regime when nothing says where KASLR put the image.
MAX_SLIDES = 8


@dataclass(frozen=True, slots=True)
class Arm64Paging:
    """The EL1&0 regime Linux runs: one granule, and the VA width of each half.

    Stands where `PagingMode` stands on x86 (`KernelLocation.mode`): `name`
    is what front ends show. Linux gives both halves the same width
    (TCR_EL1.T0SZ = T1SZ) unless told otherwise.
    """

    granule: int
    va_bits: int
    user_va_bits: int | None = None

    @property
    def name(self) -> str:
        return f"AARCH64_{self.granule >> 10}K_{self.va_bits}BIT"

    @property
    def t1sz(self) -> int:
        return 64 - self.va_bits

    @property
    def t0sz(self) -> int:
        return 64 - (self.user_va_bits or self.va_bits)

    @property
    def lpa2(self) -> bool:
        """52-bit addresses with 4/16 KiB granules need FEAT_LPA2 (TCR_EL1.DS)."""
        return self.va_bits > 48 and self.granule != 65536

    @property
    def page_offset(self) -> int:
        """Start of the linear map: PAGE_OFFSET = -(1 << VA_BITS)."""
        return -(1 << self.va_bits) & _MASK64

    def describe(self) -> str:
        return f"{self.granule >> 10} KiB granule, {self.va_bits}-bit VA"


def _producer_int(profile: Profile, key: str) -> int | None:
    value = profile.producer.get(key)
    try:
        return int(str(value), 0) if value is not None else None
    except ValueError:
        return None


def profile_granule(profile: Profile) -> int | None:
    """PAGE_SIZE when the profile's producer recorded it (vmishell's builder does)."""
    size = _producer_int(profile, "page_size")
    return size if size in GRANULES else None


def profile_va_bits(profile: Profile) -> int | None:
    """CONFIG_ARM64_VA_BITS when recorded: the most the kernel runs (52 may run as 47/48)."""
    bits = _producer_int(profile, "va_bits")
    return bits if bits in (36, 39, 42, 47, 48, 52) else None


def arm64_translator(
    source: PhysicalSource,
    paging: Arm64Paging,
    ttbr0: int | None,
    ttbr1: int | None,
    *,
    max_mapping_work: int | None = None,
) -> Arm64Translator:
    """The walker for one EL1&0 space: table addresses of TTBR0 (None: no user half) and TTBR1.

    Linux turns top-byte-ignore on for user space (TBI0) and off for the kernel.
    """
    from vmishell.arch.aarch64 import Arm64Translator, ttbr_for_table

    options = {} if max_mapping_work is None else {"max_mapping_work": max_mapping_work}
    lpa52 = paging.va_bits > 48

    def ttbr(table: int | None) -> int | None:
        return None if table is None else ttbr_for_table(table, lpa52=lpa52)

    return Arm64Translator(
        source,
        ttbr0=ttbr(ttbr0),
        ttbr1=ttbr(ttbr1),
        granule=paging.granule,
        va_bits=paging.user_va_bits or paging.va_bits,
        va_bits1=paging.va_bits,
        lpa2=paging.lpa2,
        tbi0=True,
        **options,
    )


def _maps(translator: Arm64Translator, vaddr: int, paddr: int) -> bool:
    try:
        return translator.translate(vaddr).paddr == paddr
    except VmiError:
        return False


def _read_u64(source: PhysicalSource, paddr: int) -> int | None:
    try:
        return int.from_bytes(source.read(paddr, 8), "little")
    except VmiError:
        return None


@dataclass(frozen=True, slots=True)
class _Image:
    """One physical placement of the kernel image that banner and init_task confirm."""

    base: int  # link-time address counted from (the profile's _text, else linux_banner)
    paddr: int  # its physical address

    def phys(self, link: int) -> int:
        return link - self.base + self.paddr

    def slide_from_voffset(self, voffset: int) -> int:
        """KASLR slide from kimage_voffset (run-time VA minus PA of every image byte)."""
        return (voffset + self.paddr - self.base) & _MASK64


def _image_base(profile: Profile) -> int:
    for name in ("_text", "_stext", "linux_banner"):
        if profile.has_symbol(name):
            return profile.symbol_address(name)
    raise GuestDataError(f"profile {profile.name} has no kernel-image symbol (_text)")


def _in_ram_vmcoreinfo(
    source: PhysicalSource, profile: Profile, image: _Image, release: str | None
) -> VmcoreInfo | None:
    """The kernel's own VMCOREINFO page, through `vmcoreinfo_data` and `memstart_addr`.

    `vmcoreinfo_data` holds a linear-map address: physical = VA - PAGE_OFFSET +
    PHYS_OFFSET, PAGE_OFFSET being -(1 << VA_BITS) for the one width whose
    linear map holds the pointer. The text found must name the profile's release.
    """
    if not (profile.has_symbol("vmcoreinfo_data") and profile.has_symbol("memstart_addr")):
        return None
    pointer = _read_u64(source, image.phys(profile.symbol_address("vmcoreinfo_data")))
    memstart = _read_u64(source, image.phys(profile.symbol_address("memstart_addr")))
    if pointer is None or memstart is None:
        return None
    for va_bits in (52, 48, 47, 42, 39, 36):
        page_offset = -(1 << va_bits) & _MASK64
        if not page_offset <= pointer < page_offset + (1 << (va_bits - 1)):
            continue
        info = vmcoreinfo_at(source, (pointer - page_offset + memstart) & _MASK64, release)
        if info is not None:
            return info
    return None


def _pagings(granules: tuple[int | None, ...], widths: tuple[int, ...]) -> Iterator[Arm64Paging]:
    """Regimes to try: the granules named first, then the rest; each with the widths named
    first, then every width Linux runs that granule with."""
    seen = set()
    for g in dict.fromkeys((*[g for g in granules if g], *GRANULES)):
        for bits in (*widths, *WIDTHS[g]):
            if (g, bits) in seen or bits not in WIDTHS[g]:
                continue
            seen.add((g, bits))
            yield Arm64Paging(g, bits)


def _scan_slides(
    translator: Arm64Translator, paging: Arm64Paging, banner_paddr: int, banner: int
) -> list[int]:
    """KASLR slides under which the kernel half maps the banner's frame (bounded scan).

    The linear map (below PAGE_END) also maps every frame; the kernel image is
    mapped above it, among vmalloc addresses, so only that part is enumerated.
    """
    page_end = -(1 << (paging.va_bits - 1)) & _MASK64
    slides: list[int] = []
    try:
        for run in translator.mappings(page_end, 1 << 64, max_work=SCAN_WORK):
            if run.paddr <= banner_paddr < run.paddr + run.size:
                slides.append((run.vaddr + banner_paddr - run.paddr - banner) & _MASK64)
                if len(slides) >= MAX_SLIDES:
                    break
    except VmiError:
        pass
    return slides


def locate_arm64(
    source: PhysicalSource,
    profile: Profile,
    limits: Limits | None = None,
    *,
    accept: Callable[[KernelLocation], bool] | None = None,
    regs: Registers | None = None,
    on_vmcoreinfo: Callable[[VmcoreInfo], None] | None = None,
) -> KernelLocation:
    """Find the arm64 kernel `profile` describes in `source`, and the regime it runs.

    `on_vmcoreinfo` is told the VMCOREINFO that the chosen placement was found
    with (the session reports how the kernel was found).
    """
    limits = limits or Limits()
    hints = KernelHints.from_profile(profile)
    shifts = banner_candidates(source, hints, limits)
    if not shifts:
        raise GuestDataError(
            f"the banner of profile {profile.name} ({hints.banner[:60]!r}...) was not found "
            f"with a matching init_task in {source.description}: wrong profile for this guest?"
        )
    if not profile.has_symbol("swapper_pg_dir"):
        raise GuestDataError(f"profile {profile.name} has no swapper_pg_dir (the TTBR1 table)")
    base = _image_base(profile)
    release = _release(hints.banner)
    noted = vmcoreinfo_of(source)
    problems: list[str] = []
    for shift in shifts:
        banner_paddr = _kernel_phys(hints.arch, hints.linux_banner, shift)
        image = _Image(base, banner_paddr - (hints.linux_banner - base))
        info = noted or _in_ram_vmcoreinfo(source, profile, image, release)
        try:
            found = _try_placement(source, profile, hints, image, info, limits)
        except VmiError as exc:
            problems.append(f"image at physical {image.paddr:#x}: {exc}")
            continue
        if found is None:
            problems.append(
                f"image at physical {image.paddr:#x}: no granule and address width maps "
                "the banner and init_task where they were found"
            )
            continue
        paging, ttbr1, slide, used_info = found
        location = KernelLocation(
            "aarch64",
            paging,  # type: ignore[arg-type]
            ttbr1,
            image.paddr,
            slide,
            banner_paddr,
            regs,
            link_base=base,
        )
        if accept is not None and not accept(location):
            problems.append(f"image at physical {image.paddr:#x}: not the running kernel")
            continue
        if used_info and info is not None and on_vmcoreinfo is not None:
            on_vmcoreinfo(info)
        return location
    raise GuestDataError(
        f"arm64 kernel banner found in {source.description} but its page tables did not "
        "check out: " + "; ".join(problems)
    )


def _release(banner: bytes) -> str | None:
    parts = banner.split(b" ", 3)
    return parts[2].decode("ascii", "replace") if len(parts) > 2 else None


def _try_placement(
    source: PhysicalSource,
    profile: Profile,
    hints: KernelHints,
    image: _Image,
    info: VmcoreInfo | None,
    limits: Limits,
) -> tuple[Arm64Paging, int, int, bool] | None:
    """(regime, TTBR1, KASLR slide, whether VMCOREINFO decided) of a confirmed placement."""
    ttbr1 = image.phys(profile.symbol_address("swapper_pg_dir"))
    banner_v, banner_p = hints.linux_banner, image.phys(hints.linux_banner)
    task_v, task_p = hints.init_task, image.phys(hints.init_task)

    def confirmed(paging: Arm64Paging, slide: int) -> bool:
        tr = arm64_translator(source, paging, None, ttbr1, max_mapping_work=limits.max_mapping_work)
        return _maps(tr, (banner_v + slide) & _MASK64, banner_p) and _maps(
            tr, (task_v + slide) & _MASK64, task_p
        )

    granule, widths, slides = _hints_from_vmcoreinfo(info, image)
    if info is not None and granule is not None and widths and slides:
        paging = Arm64Paging(granule, widths[0])
        for slide in slides:
            if confirmed(paging, slide):
                return paging, ttbr1, slide, True
    own = _slides_from_image(source, profile, image)
    candidates = [*dict.fromkeys([*slides, *own, 0])]
    va_bits = profile_va_bits(profile)
    hinted = (*widths, va_bits) if va_bits else widths
    pagings = list(_pagings((granule, profile_granule(profile)), hinted))
    for paging in pagings:
        for slide in candidates:
            if confirmed(paging, slide):
                return paging, ttbr1, slide, False
    # Nothing said where KASLR put the image: look where swapper_pg_dir maps its frames.
    for paging in pagings:
        tr = arm64_translator(source, paging, None, ttbr1, max_mapping_work=limits.max_mapping_work)
        for slide in _scan_slides(tr, paging, banner_p, banner_v):
            if confirmed(paging, slide):
                return paging, ttbr1, slide, False
    return None


def _hints_from_vmcoreinfo(
    info: VmcoreInfo | None, image: _Image
) -> tuple[int | None, tuple[int, ...], list[int]]:
    """Granule, widths (the running one first) and KASLR slides VMCOREINFO gives."""
    if info is None:
        return None, (), []
    try:
        return _read_vmcoreinfo(info, image)
    except GuestDataError:
        return None, (), []  # a malformed note decides nothing: the walks do


def _read_vmcoreinfo(
    info: VmcoreInfo, image: _Image
) -> tuple[int | None, tuple[int, ...], list[int]]:
    granule = info.value("PAGESIZE")
    widths: list[int] = []
    t1sz = info.value("NUMBER(TCR_EL1_T1SZ)")
    if t1sz is not None and 12 <= t1sz <= 28:
        widths.append(64 - t1sz)
    va_bits = info.value("NUMBER(VA_BITS)")
    if va_bits is not None and 36 <= va_bits <= 52:
        widths.append(va_bits)
    slides: list[int] = []
    offset = info.kernel_offset
    if offset is not None:
        slides.append(offset & _MASK64)
    voffset = info.value("NUMBER(kimage_voffset)")
    if voffset is not None:
        slides.append(image.slide_from_voffset(voffset))
    return (
        granule if granule in GRANULES else None,
        tuple(dict.fromkeys(widths)),
        [*dict.fromkeys(slides)],
    )


def _slides_from_image(source: PhysicalSource, profile: Profile, image: _Image) -> list[int]:
    """The slide the kernel wrote into its own `kimage_voffset`, if the profile has it."""
    if not profile.has_symbol("kimage_voffset"):
        return []
    voffset = _read_u64(source, image.phys(profile.symbol_address("kimage_voffset")))
    return [] if voffset is None else [image.slide_from_voffset(voffset)]


__all__ = ["Arm64Paging", "arm64_translator", "locate_arm64", "profile_granule"]
