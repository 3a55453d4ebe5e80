"""Linux on arm64: vmishell equals each arm64 guest's own view of itself, with no registers.

The `aarch64` guest runs bookworm's 6.1 kernel with 4 KiB pages, `aarch64-16k`
trixie's 6.12 with 16 KiB pages, both on QEMU's `virt` machine (RAM from
physical 0x40000000). QEMU 7.2 reports neither TTBR nor TCR_EL1, so the session
finds the kernel, its granule and address width, and every process's TTBR0 from
guest memory alone. Each guest boots once for the module and is stopped before
the next one boots. The oracle is the guest's own ground truth (its /proc at
boot), not a kernel version. The checks that hold for any architecture are the
generations module's own tests, run here on these guests.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.lab.test_generations_lab import (
    Generation,
    test_processes_with_their_states_equal_the_guests_own_list,
    test_threads_of_the_marker_and_every_thread_the_guest_listed,
)
from vmishell.lab.workload import MARKER
from vmishell.session import Session

pytestmark = pytest.mark.lab

__all__ = [
    "test_processes_with_their_states_equal_the_guests_own_list",
    "test_threads_of_the_marker_and_every_thread_the_guest_listed",
]

NAMES = ["aarch64", "aarch64-16k"]
GRANULE = {"aarch64": 4096, "aarch64-16k": 16384}


@pytest.fixture(scope="module", params=NAMES)
def generation(request: pytest.FixtureRequest) -> Iterator[Generation]:
    """One arm64 guest, attached by `lab:NAME`, stopped after its tests."""
    from tests.conftest import lab_unavailable
    from vmishell.errors import VmiError
    from vmishell.lab import runner

    name = request.param
    try:
        guest = runner.up(name, f"t-{os.getpid()}-{name}-linux", timeout=240)
    except VmiError as exc:
        lab_unavailable(f"{name}: {exc}")
    session = Session.attach(f"lab:{guest.name}")
    try:
        yield Generation(guest, guest.truth(), session)
    finally:
        session.close()
        guest.down()


def test_the_regime_is_found_without_registers(generation) -> None:
    """The granule is the guest's page size, and the kernel's own mapping checks out:
    every symbol where the guest's /proc/kallsyms puts it, and the start of "Kernel code"
    in its /proc/iomem (_stext on 6.1, _text on 6.12) where the kernel maps it."""
    from vmishell.os.linux.arm64 import Arm64Paging

    s, truth = generation.session, generation.truth
    loc = s.guest.location
    assert loc.arch == "aarch64" and isinstance(loc.mode, Arm64Paging)
    assert s.guest.page_size == truth.page_size
    assert loc.mode.granule == truth.page_size == GRANULE[generation.guest.spec.name]
    assert loc.dtb >= 0x4000_0000  # swapper_pg_dir, in RAM of the virt machine
    assert {name: s.symbol(name) for name in truth.symbols} == truth.symbols
    code = {
        s.kernel.translate(truth.symbols[n]).paddr
        for n in ("_text", "_stext")
        if n in truth.symbols
    }
    assert truth.kernel_code[0] in code


def test_the_marker_maps_and_bytes_equal_the_guests(generation) -> None:
    s, truth = generation.session, generation.truth
    proc = s.process(truth.marker_pid)
    ours = [(v.start, v.end, v.perms, v.offset, v.device, v.inode, v.path) for v in proc.vmas()]
    theirs = [(m.start, m.end, m.perms, m.offset, m.dev, m.inode, m.path) for m in truth.maps]
    assert ours == theirs
    assert proc.read(truth.marker_va, len(MARKER)) == MARKER
    leader = s.processes().set_index("pid").loc[truth.marker_pid]
    assert (leader.comm, leader.cmdline) == ("vmi-marker", "/bin/vmi-marker")


def test_the_page_walk_agrees_with_pagemap(generation) -> None:
    """Each present page the guest's pagemap listed translates to its frame (PFNs count
    the kernel's PAGE_SIZE), through the process's TTBR0 tables."""
    s, truth = generation.session, generation.truth
    proc = s.process(truth.marker_pid)
    assert proc.translate(truth.marker_va).paddr == truth.marker_paddr
    present = [(va, e) for va, e in truth.pagemap.items() if e.present]
    assert present
    for vaddr, entry in present:
        t = proc.translate(vaddr)
        assert t.paddr // truth.page_size == entry.pfn, hex(vaddr)
        assert t.user
    walk = proc.walk(truth.marker_va)
    assert walk.ok and walk.steps[-1].page_size == truth.page_size
    assert [step.level for step in walk.steps][-1] == "L3"


def test_the_kernel_has_no_user_half(generation) -> None:
    """pid 0 runs on TTBR1 alone (Linux gives the kernel the reserved TTBR0)."""
    from vmishell.errors import PageFault

    s, truth = generation.session, generation.truth
    with pytest.raises(PageFault):
        s.kernel.translate(truth.marker_va)
    assert s.kernel.translate(s.symbol("linux_banner")).paddr == s.guest.location.banner_paddr


@pytest.mark.parametrize("fmt", ["elf", "raw"])
def test_a_dump_gives_the_same_answers(generation, tmp_path, fmt: str) -> None:
    """QEMU's ELF core (RAM at its program headers' physical addresses) and a raw copy
    (file offset = physical address): the kernel found the same way, the same marker."""
    truth = generation.truth
    dump = generation.guest.dump(tmp_path / f"guest.{fmt}", fmt)
    try:
        with Session.image(dump) as s:
            assert s.guest.location.mode == generation.session.guest.location.mode
            proc = s.process(truth.marker_pid)
            assert proc.translate(truth.marker_va).paddr == truth.marker_paddr
            assert proc.read(truth.marker_va, len(MARKER)) == MARKER
    finally:
        dump.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def ip():
    """An IPython shell with the extension loaded (the front-end tests' own shell)."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "vmishell")
    yield shell
    shell.run_line_magic("unload_ext", "vmishell")


def test_the_magics_work_as_on_x86(ip, generation) -> None:
    """%attach, %ps, %peek, %translate and %maps on the arm64 guest: the walk shows L0..L3
    (or L1..L3) with arm64 descriptor bits and lands on the frame pagemap gave."""
    from vmishell.frontends.walkview import DETAIL_COLUMN, WalkFrame

    truth, name = generation.truth, generation.guest.name
    target = generation.guest.spec.name
    ip.run_line_magic("attach", f"lab:{name} --name {target}")
    try:
        ps = ip.run_line_magic("ps", "-n vmi-marker")
        assert list(ps.pid) == [truth.marker_pid]
        pid = truth.marker_pid
        assert ip.run_line_magic("peek", f"{truth.marker_va:#x} {len(MARKER)} -p {pid}") == MARKER
        assert ip.run_line_magic("peek", "linux_banner 14") == b"Linux version "
        walk = ip.run_line_magic("translate", f"{truth.marker_va:#x} -p {pid}")
        assert isinstance(walk, WalkFrame) and walk.paddr == truth.marker_paddr
        assert list(walk.level)[-1] == "L3" and all(lv.startswith("L") for lv in walk.level)
        leaf = walk.iloc[-1]
        assert {"PAGE", "AF", "AP_EL0"} <= set(leaf["flags"].split("|"))
        assert "AP=" in leaf[DETAIL_COLUMN]
        html = walk._repr_html_()
        assert f"{truth.page_size >> 10} KiB granule" in html and "TTBR0" in html
        maps = ip.run_line_magic("maps", f"-p {pid}")
        assert list(maps.start) == [m.start for m in truth.maps]
        runs = ip.run_line_magic("maps", "")
        assert (runs.start >= 1 << 63).all() and len(runs) > 0  # pid 0: the kernel half only
    finally:
        ip.run_line_magic("detach", target)
