"""Finding an arm64 kernel without registers: its own mapping decides granule, width and slide.

A tiny arm64 kernel is laid out in RAM that starts at physical 0x40000000 (QEMU's
`virt`), with page tables written by `tests.support.arm64space` (not by
vmishell), KASLR applied, and the variables Linux keeps about itself
(`kimage_voffset`, `memstart_addr`, the VMCOREINFO page) filled in or left out.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest

from tests.support.arm64space import Arm64Tables
from tests.support.isf import SYMBOL_OFFSETS, TINY_BANNER, Variant, tiny_isf
from vmishell.errors import GuestDataError
from vmishell.os.linux.arm64 import Arm64Paging, locate_arm64
from vmishell.os.linux.locate import is_arm64
from vmishell.session import Session
from vmishell.sources.memory import BufferSource
from vmishell.symbols.profile import Profile

RAM_BASE = 0x4000_0000
RAM_SIZE = 64 << 20
#: The tiny kernel's _text links where 6.1 links arm64's (KIMAGE_VADDR with 48-bit VA).
TEXT_LINK = 0xFFFF_8000_0800_0000
LINK_BASE = TEXT_LINK - SYMBOL_OFFSETS["_text"]
TEXT_PHYS = 0x4020_0000
SLIDE = 0x0000_1234_5660_0000  # a 2 MiB multiple, like arm64 KASLR's
MEMSTART = RAM_BASE
VMCOREINFO_PAGE = 0x4080_0000
USER_VA = 0x0000_AAAA_0000_0000
MASK64 = (1 << 64) - 1


def arm64_profile(*extra: str, name: str = "tiny-arm64") -> Profile:
    """The tiny ISF moved to arm64's link addresses, with arm64's own types and symbols."""
    isf = copy.deepcopy(tiny_isf(Variant()))
    symbols = isf["symbols"]
    symbols["swapper_pg_dir"] = symbols.pop("init_top_pgt")
    for gone in ("boot_cpu_data", "__pgtable_l5_enabled"):
        symbols.pop(gone, None)
    for sym in symbols.values():
        sym["address"] = sym["address"] - 0xFFFFFFFF80000000 + LINK_BASE
    extras = {"kimage_voffset": 0x1260000, "memstart_addr": 0x1260010, "vmcoreinfo_data": 0x1260020}
    for sym in extra:
        symbols[sym] = {"address": LINK_BASE + extras[sym]}
    types = isf["user_types"]
    del types["cpuinfo_x86"]
    types["cpuinfo_arm64"] = {"kind": "struct", "size": 8, "fields": {}}
    return Profile.from_isf(isf, name)


@dataclass
class Arm64Kernel:
    profile: Profile
    ram: bytearray
    tables: Arm64Tables
    paging: Arm64Paging

    def phys(self, name: str) -> int:
        return self.profile.symbol_address(name) - TEXT_LINK + TEXT_PHYS

    def virt(self, name: str) -> int:
        return (self.profile.symbol_address(name) + SLIDE) & MASK64

    def write(self, paddr: int, data: bytes) -> None:
        self.ram[paddr - RAM_BASE : paddr - RAM_BASE + len(data)] = data

    def write_u64(self, name: str, value: int) -> None:
        self.write(self.phys(name), (value & MASK64).to_bytes(8, "little"))

    def source(self) -> BufferSource:
        return BufferSource([(RAM_BASE, self.ram)], description="tiny arm64 guest")


def build(
    granule: int = 4096,
    va_bits: int = 48,
    *,
    extra: tuple[str, ...] = ("kimage_voffset", "memstart_addr"),
    vmcoreinfo: str | None = None,
    map_image: bool = True,
) -> Arm64Kernel:
    """A kernel whose image lies at TEXT_PHYS and runs at its link address + SLIDE."""
    profile = arm64_profile(*extra)
    ram = bytearray(RAM_SIZE)
    free = [RAM_BASE + (32 << 20)]

    def allocate(size: int) -> int:
        at = -(-free[0] // size) * size
        free[0] = at + size
        return at

    swapper = profile.symbol_address("swapper_pg_dir") - TEXT_LINK + TEXT_PHYS
    tables = Arm64Tables(ram, RAM_BASE, granule, va_bits, allocate, top=swapper)
    kernel = Arm64Kernel(profile, ram, tables, Arm64Paging(granule, va_bits))
    if map_image:
        tables.map_range((TEXT_LINK + SLIDE) & MASK64, TEXT_PHYS, 4 << 20, granule)
    kernel.write(kernel.phys("linux_banner"), TINY_BANNER + b"\0")
    comm = kernel.phys("init_task") + profile.offset_of("task_struct", "comm")
    kernel.write(comm, b"swapper/0\0")
    if "kimage_voffset" in extra:
        kernel.write_u64("kimage_voffset", ((TEXT_LINK + SLIDE) & MASK64) - TEXT_PHYS)
    if "memstart_addr" in extra:
        kernel.write_u64("memstart_addr", MEMSTART)
    if vmcoreinfo is not None:
        kernel.write(VMCOREINFO_PAGE, vmcoreinfo.encode() + b"\0")
        page_offset = -(1 << va_bits) & MASK64
        kernel.write_u64("vmcoreinfo_data", page_offset + VMCOREINFO_PAGE - MEMSTART)
    return kernel


def vmcoreinfo_text(*, granule: int = 4096, t1sz: int = 16, slide: int = SLIDE) -> str:
    release = TINY_BANNER.split()[2].decode()
    return (
        f"OSRELEASE={release}\nPAGESIZE={granule}\nSYMBOL(swapper_pg_dir)=0\n"
        f"NUMBER(VA_BITS)={64 - t1sz}\nNUMBER(TCR_EL1_T1SZ)={t1sz:#x}\n"
        f"KERNELOFFSET={slide:x}\n"
    )


def test_an_arm64_profile_is_told_from_an_x86_one() -> None:
    """By the producer's `arch` (vmishell's builder records it), else by arm64's own types."""
    assert is_arm64(arm64_profile())
    x86 = tiny_isf(Variant())
    assert not is_arm64(Profile.from_isf(x86, "tiny-x86"))
    x86["metadata"]["producer"]["arch"] = "aarch64"
    assert is_arm64(Profile.from_isf(x86, "said-arm64"))


@pytest.mark.parametrize(("granule", "va_bits"), [(4096, 48), (16384, 47), (65536, 48)])
def test_the_regime_and_slide_are_the_ones_that_map_the_image(granule: int, va_bits: int) -> None:
    """No register and no VMCOREINFO: the granule and width are tried until swapper_pg_dir
    maps linux_banner and init_task where they lie; kimage_voffset gives the slide."""
    kernel = build(granule, va_bits)
    loc = locate_arm64(kernel.source(), kernel.profile)
    assert loc.arch == "aarch64"
    assert loc.mode == Arm64Paging(granule, va_bits)
    assert loc.dtb == kernel.phys("swapper_pg_dir") == kernel.tables.top
    assert loc.virtual_shift == SLIDE
    assert loc.physical(kernel.profile.symbol_address("init_task")) == kernel.phys("init_task")
    assert loc.banner_paddr == kernel.phys("linux_banner")
    assert loc.virtual(kernel.profile.symbol_address("linux_banner")) == kernel.virt("linux_banner")


def test_without_kimage_voffset_the_slide_comes_from_the_kernel_half_s_mappings() -> None:
    kernel = build(extra=())
    loc = locate_arm64(kernel.source(), kernel.profile)
    assert (loc.mode, loc.virtual_shift) == (Arm64Paging(4096, 48), SLIDE)


def test_vmcoreinfo_in_ram_names_the_regime_and_says_it_was_used() -> None:
    """The kernel's own VMCOREINFO page, reached through vmcoreinfo_data (a linear-map
    pointer) and memstart_addr: PAGESIZE, TCR_EL1_T1SZ and KERNELOFFSET, then checked."""
    extra = ("memstart_addr", "vmcoreinfo_data")
    kernel = build(16384, 47, extra=extra, vmcoreinfo=vmcoreinfo_text(granule=16384, t1sz=17))
    used = []
    loc = locate_arm64(kernel.source(), kernel.profile, on_vmcoreinfo=used.append)
    assert (loc.mode, loc.virtual_shift) == (Arm64Paging(16384, 47), SLIDE)
    assert used and used[0].value("PAGESIZE") == 16384


def test_a_vmcoreinfo_that_lies_is_outvoted_by_the_page_tables() -> None:
    extra = ("kimage_voffset", "memstart_addr", "vmcoreinfo_data")
    lie = vmcoreinfo_text(granule=65536, t1sz=22, slide=SLIDE + (2 << 20))
    kernel = build(extra=extra, vmcoreinfo=lie)
    used = []
    loc = locate_arm64(kernel.source(), kernel.profile, on_vmcoreinfo=used.append)
    assert (loc.mode, loc.virtual_shift) == (Arm64Paging(4096, 48), SLIDE)
    assert used == []


def test_tables_that_do_not_map_the_image_are_reported() -> None:
    kernel = build(map_image=False)
    with pytest.raises(GuestDataError, match="no granule and address width maps"):
        locate_arm64(kernel.source(), kernel.profile)


def test_a_process_space_walks_ttbr0_for_user_and_ttbr1_for_kernel_addresses() -> None:
    """mm->pgd's table serves the low half, swapper_pg_dir the high half; the kernel
    (pid 0) has no user half, as Linux gives it the reserved TTBR0."""
    from vmishell.errors import PageFault

    kernel = build()
    user = Arm64Tables(kernel.ram, RAM_BASE, 4096, 48, kernel.tables.allocate)
    user.map(USER_VA, RAM_BASE + (8 << 20), 4096, user=True)
    with Session(kernel.source(), kernel.profile) as s:
        space = s.guest.translator(user.top)
        assert space.translate(USER_VA + 0x10).paddr == RAM_BASE + (8 << 20) + 0x10
        banner = kernel.virt("linux_banner")
        assert space.translate(banner).paddr == kernel.phys("linux_banner")
        assert s.kernel.translate(banner).paddr == kernel.phys("linux_banner")
        with pytest.raises(PageFault):
            s.kernel.translate(USER_VA)
        assert "AARCH64_4K_48BIT" in repr(s)


def test_a_walk_renders_arm64_levels_and_descriptor_bits() -> None:
    """What %translate shows: levels L0..L3 of the TTBR1 half, the descriptor's bits by
    their arm64 names (AF, UXN, ...; VALID implied) and the descriptor spelled out."""
    from vmishell.frontends.magics import walk_spec
    from vmishell.frontends.text import walk_table
    from vmishell.frontends.walkview import DETAIL_COLUMN, WalkFrame, walk_html

    kernel = build()
    with Session(kernel.source(), kernel.profile) as s:
        proc = s.kernel
        address = kernel.virt("linux_banner")
        frame = WalkFrame.from_walk(proc.walk(address), walk_spec(proc.translator, address))
    assert list(frame.level) == ["L0", "L1", "L2", "L3"]
    assert frame.paddr == kernel.phys("linux_banner")
    leaf = frame.iloc[-1]
    assert {"PAGE", "AF", "UXN"} <= set(leaf["flags"].split("|"))
    assert "AP=00" in leaf[DETAIL_COLUMN]
    diagram = walk_html(frame.walk, frame.mode)
    assert "TTBR1: 4 KiB granule, 48-bit VA" in diagram and "bits 47–39" in diagram
    assert "VALID|" not in diagram and "AF" in diagram
    assert diagram in frame._repr_html_()
    assert "UXN" in walk_table(frame.walk)


def test_hostile_variables_cost_a_few_walks_not_the_answer() -> None:
    """A kimage_voffset that lies and a vmcoreinfo_data pointer outside RAM are guest data:
    the slide they imply fails its walk, and the kernel half's own mapping still decides."""
    extra = ("kimage_voffset", "memstart_addr", "vmcoreinfo_data")
    kernel = build(extra=extra)
    kernel.write_u64("kimage_voffset", 0x4141_4141_4141_4141)
    kernel.write_u64("vmcoreinfo_data", 0xFFFF_0000_DEAD_B000)
    used = []
    loc = locate_arm64(kernel.source(), kernel.profile, on_vmcoreinfo=used.append)
    assert (loc.mode, loc.virtual_shift, used) == (Arm64Paging(4096, 48), SLIDE, [])
