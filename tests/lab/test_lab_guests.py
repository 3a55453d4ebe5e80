"""Every lab guest boots, tells the truth, and that truth matches its RAM.

These tests read the RAM file with plain Python on purpose: they check the
lab itself (QEMU flags, /init, the ground-truth channel), independently of
vmishell's source and translation layers, which are tested against the lab.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from vmishell.cli import main as cli_main
from vmishell.lab.workload import MARKER, THREAD_NAME, layout

pytestmark = pytest.mark.lab

GUESTS = ["x86_64", "x86_64-la57", "i386-pae", "i386"]
CR4_PAE, CR4_LA57 = 1 << 5, 1 << 12
EFER_LMA = 1 << 10


@pytest.fixture(params=GUESTS)
def guest_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def guest(lab_guest, guest_name):
    return lab_guest(guest_name)


def read_phys(guest, paddr: int, size: int) -> bytes:
    """Guest-physical bytes straight from the RAM file (unbuffered: the guest is live)."""
    fd = os.open(guest.ram_path, os.O_RDONLY)
    try:
        return os.pread(fd, size, paddr - guest.spec.phys_offset)
    finally:
        os.close(fd)


def test_truth_parses(guest) -> None:
    truth = guest.truth()
    assert truth.release == guest.manifest["kernel_release"]
    assert truth.machine in (("x86_64",) if guest.spec.arch == "x86_64" else ("i686", "i586"))
    assert "rdinit=/init" in truth.cmdline
    assert "nokaslr" not in truth.cmdline
    assert truth.mem_total_kb and 100_000 < truth.mem_total_kb <= 256 * 1024
    assert {"_text", "_stext"} <= set(truth.symbols)
    assert truth.kernel_code is not None

    init = truth.task(1)
    assert init.comm == "init" and not init.kernel_thread and init.tgid == 1
    kthreadd = truth.task(2)
    assert kthreadd.comm == "kthreadd" and kthreadd.kernel_thread
    assert any(t.comm.startswith("ksoftirqd/") for t in truth.processes)

    marker = truth.marker
    assert marker.comm == "vmi-marker" and marker.tgid == marker.pid == truth.marker_pid
    group = truth.threads_of(truth.marker_pid)
    assert sorted(t.comm for t in group) == sorted(["vmi-marker", THREAD_NAME])
    assert all(not t.kernel_thread and t.ppid == 1 and t.uid == 0 for t in group)
    assert {"sleep", "cat"} <= {t.comm for t in truth.processes}

    lay = layout(guest.spec.arch)
    assert (truth.marker_va, truth.counter_va) == (lay.marker_va, lay.counter_va)
    paths = {m.path for m in truth.maps}
    assert "/bin/vmi-marker" in paths and "[stack]" in paths
    assert any(truth.marker_va in m and "rw" in m.perms for m in truth.maps)
    assert truth.pagemap[truth.marker_va].present
    assert truth.pagemap[truth.pagemap_labels["stack"]].present


def test_marker_in_ram_at_pagemap_frame(guest) -> None:
    truth = guest.truth()
    paddr = truth.marker_paddr
    assert paddr is not None
    assert read_phys(guest, paddr, len(MARKER)) == MARKER
    assert paddr < guest.ram_size


def test_counter_ticks_in_ram(guest) -> None:
    truth = guest.truth()
    lay = layout(guest.spec.arch)
    fmt = "<Q" if lay.counter_size == 8 else "<I"
    paddr = truth.counter_paddr
    assert paddr is not None

    def counter() -> int:
        return struct.unpack(fmt, read_phys(guest, paddr, lay.counter_size))[0]

    first = counter()
    deadline = time.monotonic() + 10
    while counter() == first and time.monotonic() < deadline:
        time.sleep(0.2)
    assert counter() > first, "the workload's counter did not change in guest RAM"


def test_registers_match_paging_mode(guest) -> None:
    regs = guest.registers()
    assert regs.cr3 is not None and regs.cr0 is not None and regs.cr4 is not None
    assert regs.cr0 & (1 << 31), "paging is off?"
    name = guest.spec.name
    assert bool(regs.cr4 & CR4_LA57) == (name == "x86_64-la57")
    if name in ("x86_64", "x86_64-la57"):
        assert regs.arch == "x86_64"
        assert regs.efer is not None and regs.efer & EFER_LMA
        assert regs.cr4 & CR4_PAE
    else:
        assert regs.arch == "i386"
        assert bool(regs.cr4 & CR4_PAE) == (name == "i386-pae")


def test_dumps(guest, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "ram.raw"
    assert cli_main(["lab", "dump", guest.name, str(raw), "--format", "raw"]) == 0
    assert raw.stat().st_size == guest.ram_size == os.path.getsize(guest.ram_path)
    truth = guest.truth()
    with raw.open("rb") as f:
        f.seek(truth.marker_paddr)
        assert f.read(len(MARKER)) == MARKER
    raw.unlink()

    elf = tmp_path / "ram.elf"
    assert cli_main(["lab", "dump", guest.name, str(elf), "--format", "elf"]) == 0
    with elf.open("rb") as f:
        core = ELFFile(f)
        assert core["e_type"] == "ET_CORE"
        loads = [s for s in core.iter_segments() if s["p_type"] == "PT_LOAD"]
        assert loads and loads[0]["p_paddr"] == 0
        assert sum(s["p_filesz"] for s in loads) >= guest.ram_size
        notes = [
            n["n_name"]
            for s in core.iter_segments()
            if s["p_type"] == "PT_NOTE"
            for n in s.iter_notes()
        ]
    assert "QEMU" in notes and "CORE" in notes
    elf.unlink()
    capsys.readouterr()


def test_cli_truth_and_status(guest, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["lab", "truth", guest.name]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["marker_pid"] == guest.truth().marker_pid
    assert data["marker_paddr"] == guest.truth().marker_paddr
    assert cli_main(["lab", "status", guest.name, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "running" and status["ready"] and status["guest"] == guest.spec.name


def test_processes_stay_stable(guest) -> None:
    """No task appears after the truth except kernel workers: /init forks nothing later."""
    truth = guest.truth()
    user = {t.pid for t in truth.processes if not t.kernel_thread}
    assert guest.alive()
    # The init loop blocks on a fifo: nothing new was printed after the ready line.
    log = guest.serial_log.read_text(errors="replace")
    after = log.split("@@vmi ready", 1)[1].splitlines()[1:]
    assert not [line for line in after if line.strip()], after
    assert 1 in user and truth.marker_pid in user


def test_qmp_works_inside_a_running_event_loop(x86_64_guest) -> None:
    """Notebooks run an asyncio loop: the synchronous QMP client must not need the caller's."""
    import asyncio

    async def in_loop():
        return x86_64_guest.registers()

    regs = asyncio.run(in_loop())
    assert regs.arch == "x86_64" and regs.cr3


def test_qmp_errors_name_the_socket(x86_64_guest) -> None:
    from vmishell.errors import QmpError

    with x86_64_guest.qmp() as q, pytest.raises(QmpError) as info:
        q.command("no-such-command")
    assert str(x86_64_guest.qmp_path) in str(info.value)
    with x86_64_guest.qmp() as q:
        assert q.running() and q.status() == "running"
        q.stop()
        assert not q.running()
        q.cont()
        assert q.running()
