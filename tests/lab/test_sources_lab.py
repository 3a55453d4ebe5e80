"""The source layer on real guests: live RAM files, QMP registers and dumps agree."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmishell.lab.workload import MARKER, layout
from vmishell.sources import open_image
from vmishell.sources.elfcore import ElfCoreSource
from vmishell.sources.files import QemuRamSource, RawImageSource

pytestmark = pytest.mark.lab

GUESTS = ["x86_64", "x86_64-la57", "i386-pae", "i386"]
CR4_PAE, CR4_LA57 = 1 << 5, 1 << 12


@pytest.fixture(params=GUESTS)
def guest(request: pytest.FixtureRequest, lab_guest):
    return lab_guest(request.param)


def test_the_live_ram_file_holds_the_marker_at_the_frame_pagemap_reported(guest) -> None:
    truth = guest.truth()
    with QemuRamSource(guest.ram_path, guest.qmp_path, machine=guest.spec.machine) as src:
        assert src.live and not src.writable
        assert src.read(truth.marker_paddr, len(MARKER)) == MARKER
        assert truth.marker_paddr in list(src.find(MARKER))


def test_registers_from_qmp_say_which_paging_mode_the_guest_uses(guest) -> None:
    with QemuRamSource(guest.ram_path, guest.qmp_path) as src:
        regs = src.registers()
    name = guest.spec.name
    assert regs.arch == ("x86_64" if name.startswith("x86_64") else "i386")
    assert bool(regs.cr4 & CR4_LA57) == (name == "x86_64-la57")
    assert bool(regs.cr4 & CR4_PAE) == (name != "i386")


def test_an_elf_dump_carries_the_same_registers_and_memory(guest, tmp_path: Path) -> None:
    truth = guest.truth()
    with QemuRamSource(guest.ram_path, guest.qmp_path) as live, live.paused():
        regs = live.registers()
        elf = guest.dump(tmp_path / "guest.elf", "elf")
        raw = guest.dump(tmp_path / "guest.raw", "raw")
    with open_image(elf) as dump:
        assert isinstance(dump, ElfCoreSource)
        got = dump.registers()
        assert (got.arch, got.cr0, got.cr3, got.cr4) == (regs.arch, regs.cr0, regs.cr3, regs.cr4)
        assert dump.read(truth.marker_paddr, len(MARKER)) == MARKER
        with open_image(raw) as flat:
            assert isinstance(flat, RawImageSource)
            ram = [r for r in dump.ranges() if flat.is_valid(r.start, r.size)]
            assert sum(r.size for r in ram) >= flat.size - (1 << 20)  # all RAM but ROM holes
            for r in ram:
                n = min(r.size, 1 << 20)
                assert flat.read(r.start, n) == dump.read(r.start, n)
    lay = layout(guest.spec.arch)
    assert truth.marker_va == lay.marker_va
