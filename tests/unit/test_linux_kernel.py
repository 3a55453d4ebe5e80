"""Finding the kernel and what it knows of its CPU, on synthetic kernels: KASLR shifts,
i386 PAGE_OFFSET, MAXPHYADDR from boot_cpu_data and PTI page-table pairs."""

from __future__ import annotations

import pytest

from tests.support.pagetables import XD, P
from tests.support.profiles import VARIANTS, kernel
from vmishell.arch import PagingMode
from vmishell.errors import GuestDataError
from vmishell.os.linux.guest import LinuxGuest
from vmishell.os.linux.kernel import locate_kernel

USER_PAGE = 0x400000


@pytest.mark.parametrize(
    ("layout", "mode"),
    [
        ("6.1", PagingMode.LEVEL4),
        ("6.7", PagingMode.LEVEL4),
        ("i386-pae", PagingMode.PAE),
        ("i386-legacy-2G", PagingMode.LEGACY),
    ],
)
@pytest.mark.parametrize(("physical", "virtual"), [(0, 0), (0x2000000, 0x1C000000)])
def test_the_kernel_is_found_where_it_was_placed(layout, mode, physical, virtual) -> None:
    k = kernel(layout, physical_shift=physical, virtual_shift=virtual)
    loc = locate_kernel(k.source(), k.profile)
    assert loc.mode is mode
    assert loc.dtb == k.tables.dtb
    assert loc.physical_shift == physical
    assert loc.virtual_shift == k.virtual_shift
    assert loc.physical(k.profile.symbol_address("init_task")) == k.sym_pa("init_task")
    assert loc.virtual(k.profile.symbol_address("init_task")) == k.sym_va("init_task")


@pytest.mark.parametrize("layout", ["i386-pae", "i386-legacy-2G"])
def test_i386_page_offset_is_the_kernels_own(layout: str) -> None:
    """3G/1G from phys_startup_32 (System.map); a 2G/2G split, whose profile has no
    absolute symbols (kallsyms), from the kernel's own page tables."""
    k = kernel(layout, physical_shift=0x1000000)
    loc = locate_kernel(k.source(), k.profile)
    assert loc.page_offset == VARIANTS[layout].page_offset
    guest = LinuxGuest(k.source(), k.profile, location=loc)
    assert guest.kernel_space.read(k.sym_va("linux_banner"), 14) == b"Linux version "


def test_a_kernel_without_its_banner_is_not_found() -> None:
    k = kernel("6.7")
    k.write(k.sym_pa("linux_banner"), b"Linux versiom ")
    with pytest.raises(GuestDataError, match="banner"):
        locate_kernel(k.source(), k.profile)


def _argv_pte(k, mm) -> int:
    """Physical address of the page-table entry that maps the process's argument page."""
    return mm.space.kernel_copy.entry_address(USER_PAGE, k.mode.spec.levels[-1].name)


@pytest.mark.parametrize(("layout", "bits"), [("6.1", 40), ("6.7", 46), ("i386-pae", 36)])
def test_maxphyaddr_is_the_one_the_kernel_found(layout: str, bits: int) -> None:
    """An entry's bits above MAXPHYADDR are no part of the address (the CPU says they are
    reserved); the kernel's boot_cpu_data.x86_phys_bits tells where they start."""
    k = kernel(layout, phys_bits=bits)
    mm = k.mm(argv=["prog"])
    k.task(1, "prog", mm=mm)
    pte = _argv_pte(k, mm)
    entry = int.from_bytes(k.ram[pte : pte + 8], "little")
    k.write(pte, (entry | 1 << bits).to_bytes(8, "little"))
    guest = LinuxGuest(k.source(), k.profile)
    assert guest.cpu.phys_bits == bits
    task = next(t for t in guest.tasks() if t.pid == 1)
    assert guest.cmdline(task, guest.address_space(guest.dtb_of(task))) == ["prog"]


@pytest.mark.parametrize("bits", [0, 7, 53, 255])
def test_an_implausible_maxphyaddr_is_not_trusted(bits: int) -> None:
    k = kernel("6.7", phys_bits=bits)
    guest = LinuxGuest(k.source(), k.profile)
    assert guest.cpu.phys_bits is None and guest.cpu.maxphyaddr == 52


@pytest.mark.parametrize("layout", ["6.1", "6.7"])
def test_with_pti_a_process_sees_its_pages_through_its_own_copy(layout: str) -> None:
    """The kernel's copy (mm->pgd) makes the user half NX; the process runs on the
    next page, where its text is executable."""
    k = kernel(layout, pti=True)
    mm = k.mm(argv=["prog", "-v"])
    k.task(1, "prog", mm=mm)
    guest = LinuxGuest(k.source(), k.profile)
    assert guest.cpu.pti and guest.pti
    task = next(t for t in guest.tasks() if t.pid == 1)
    kernel_pgd = guest.pgd_physical(task.mm)
    assert kernel_pgd == mm.space.kernel_copy.dtb
    assert guest.dtb_of(task) == mm.space.user_copy.dtb == kernel_pgd + 0x1000
    user_view = guest.translator(guest.dtb_of(task)).translate(USER_PAGE)
    assert not user_view.nx and user_view.user
    assert guest.translator(kernel_pgd).translate(USER_PAGE).nx
    assert guest.cmdline(task, guest.address_space(guest.dtb_of(task))) == ["prog", "-v"]


def test_without_the_pti_feature_bit_the_kernels_pgd_is_the_processs() -> None:
    """Two PGDs side by side are no proof of PTI: only the kernel's flag is."""
    k = kernel("6.7", pti=True)
    mm = k.mm()
    k.task(1, "prog", mm=mm)
    k.boot_cpu_data(40, pti=False)
    guest = LinuxGuest(k.source(), k.profile)
    assert guest.cpu.pti is False
    task = next(t for t in guest.tasks() if t.pid == 1)
    assert guest.dtb_of(task) == mm.space.kernel_copy.dtb


def test_a_pti_pgd_that_is_not_the_first_of_a_pair_is_refused() -> None:
    k = kernel("6.7", pti=True)
    mm = k.mm()
    k.task(1, "prog", mm=mm)
    mm.obj.set("pgd", mm.space.pgd.va + 0x1000)  # the user copy, named as the kernel's
    guest = LinuxGuest(k.source(), k.profile)
    task = next(t for t in guest.tasks() if t.pid == 1)
    with pytest.raises(GuestDataError, match="PTI"):
        guest.dtb_of(task)


def test_the_synthetic_pti_pair_is_what_pti_makes() -> None:
    """The builder's own check: kernel copy's user entries NX, user copy's not."""
    k = kernel("6.7", pti=True)
    mm = k.mm()
    top = mm.space.kernel_copy.dtb
    first = int.from_bytes(k.ram[top : top + 8], "little")
    user = int.from_bytes(k.ram[top + 0x1000 : top + 0x1008], "little")
    assert first & P and first & XD and user & P and not user & XD


@pytest.mark.parametrize("layout", ["6.7", "i386-pae"])
def test_a_vcpu_caught_in_user_mode_under_pti_still_runs_the_kernel(layout: str) -> None:
    """After a reset, the kernel that runs is the one the vCPU's CR3 maps; a CR3 taken
    in user mode names the user copy of a PTI pair (x86_64 and i386 PAE alike)."""
    from vmishell.os.linux.liveness import runs_on_cpu

    k = kernel(layout, pti=True)
    mm = k.mm()
    location = locate_kernel(k.source(), k.profile)
    user_cr3 = mm.space.user_copy.registers()
    accept = runs_on_cpu(k.source(), k.profile, user_cr3)
    assert accept is not None and accept(location)
