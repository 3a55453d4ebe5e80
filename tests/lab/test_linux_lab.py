"""vmishell's view of every lab guest equals the guest kernel's own view of itself.

The oracle is what each guest printed on its serial console at boot (its
process list, the marker process's /proc/PID/maps and pagemap frames, kernel
symbols and /proc/iomem). The same checks run on the live guest and on raw
and ELF dumps of it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vmishell.lab.workload import MARKER, layout
from vmishell.session import Session

pytestmark = pytest.mark.lab

GUESTS = ["x86_64", "x86_64-la57", "i386-pae", "i386"]
EXPECTED_MODE = {"x86_64": "LEVEL4", "x86_64-la57": "LEVEL5", "i386-pae": "PAE", "i386": "LEGACY"}
TARGETS = ["live", "raw", "elf"]


@pytest.fixture(scope="module")
def dumps(lab_guest, tmp_path_factory: pytest.TempPathFactory):
    """Raw and ELF dumps of each guest, made once per module on first use."""
    made: dict[tuple[str, str], Path] = {}

    def get(guest_name: str, fmt: str) -> Path:
        if (guest_name, fmt) not in made:
            guest = lab_guest(guest_name)
            path = tmp_path_factory.mktemp("dumps") / f"{guest_name}.{fmt}"
            made[guest_name, fmt] = guest.dump(path, fmt)
        return made[guest_name, fmt]

    yield get
    for path in made.values():
        path.unlink(missing_ok=True)


@pytest.fixture(params=GUESTS)
def guest_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=TARGETS)
def session(request: pytest.FixtureRequest, lab_guest, dumps, guest_name):
    guest = lab_guest(guest_name)
    if request.param == "live":
        s = Session.lab(guest.name)
    else:
        s = Session.image(dumps(guest_name, request.param))
    yield s, guest.truth(), guest
    s.close()


def _is_kworker(comm: str) -> bool:
    return comm.startswith("kworker/")


def test_the_paging_mode_is_the_guests(session) -> None:
    s, _, guest = session
    assert s.guest.location.mode.name == EXPECTED_MODE[guest.spec.name]


def test_processes_equal_the_guests_own_list(session) -> None:
    s, truth, _ = session
    df = s.processes(threads=True)
    assert df.error.isna().all(), df[df.error.notna()]
    ours = {row.pid: row for row in df.itertuples()}
    for task in truth.processes:
        if _is_kworker(task.comm) and task.pid not in ours:
            continue  # idle kworkers come and go
        row = ours[task.pid]
        assert (row.tgid, row.ppid, row.uid, row.kernel_thread) == (
            task.tgid,
            task.ppid,
            task.uid,
            task.kernel_thread,
        ), task
        if task.kernel_thread and task.comm.startswith(row.comm):
            # Workqueue workers: the guest appends the work they serve ("-events").
            assert task.comm.startswith(row.comm), task
        else:
            assert row.comm == task.comm, task
    truth_pids = {t.pid for t in truth.processes}
    extra = df[~df.pid.isin(truth_pids) & (df.pid != 0)]
    assert all(_is_kworker(c) for c in extra.comm), extra
    assert ours[0].comm == "swapper/0"


def test_the_marker_process_has_two_threads_and_its_command_line(session) -> None:
    s, truth, _ = session
    df = s.processes(threads=True)
    marker = df[df.tgid == truth.marker_pid]
    assert len(marker) == 2
    leader = marker[marker.pid == truth.marker_pid].iloc[0]
    assert leader.comm == "vmi-marker"
    assert leader.cmdline == "/bin/vmi-marker"


def test_maps_equal_the_guests_proc_maps(session) -> None:
    s, truth, _ = session
    ours = [
        (v.start, v.end, v.perms, v.offset, v.device, v.inode, v.path)
        for v in s.process(truth.marker_pid).vmas()
    ]
    theirs = [(m.start, m.end, m.perms, m.offset, m.dev, m.inode, m.path) for m in truth.maps]
    assert ours == theirs


def test_the_marker_translates_to_the_frame_pagemap_reported_and_reads_back(session) -> None:
    s, truth, guest = session
    proc = s.process(truth.marker_pid)
    lay = layout(guest.spec.arch)
    assert proc.translate(lay.marker_va).paddr == truth.marker_paddr
    assert proc.read(lay.marker_va, len(MARKER)) == MARKER
    for vaddr, entry in truth.pagemap.items():
        if entry.present:
            assert proc.translate(vaddr).paddr >> 12 == entry.pfn, hex(vaddr)


def test_kernel_text_lands_where_the_guest_says(session) -> None:
    s, truth, _ = session
    text = truth.symbols["_text"]
    assert s.symbol("_text") == text
    assert s.kernel.translate(text).paddr == truth.kernel_code[0]


def test_the_counter_moves_on_a_live_guest(lab_guest, guest_name) -> None:
    import time

    guest = lab_guest(guest_name)
    lay = layout(guest.spec.arch)
    with Session.lab(guest.name) as s:
        proc = s.process(guest.truth().marker_pid)
        first = int.from_bytes(proc.read(lay.counter_va, lay.counter_size), "little")
        time.sleep(2.2)
        s.refresh()
        second = int.from_bytes(proc.read(lay.counter_va, lay.counter_size), "little")
    assert 1 <= second - first <= 4


def test_a_paused_guest_stands_still(lab_guest) -> None:
    import time

    guest = lab_guest("x86_64")
    lay = layout("x86_64")
    with Session.lab(guest.name) as s:
        proc = s.process(guest.truth().marker_pid)
        with s.paused():
            first = proc.read(lay.counter_va, 8)
            time.sleep(1.5)
            assert proc.read(lay.counter_va, 8) == first
        assert guest.registers().cr3 is not None


@pytest.fixture(scope="module")
def nokaslr_guest():
    """An x86_64 guest booted with KASLR off (its own instance, shut down after)."""
    import os

    from vmishell.lab import runner

    guest = runner.up("x86_64", f"t-{os.getpid()}-nokaslr", extra_kernel_args=("nokaslr",))
    yield guest
    guest.down()


def test_a_kernel_booted_nokaslr_is_found_at_its_link_addresses(nokaslr_guest, tmp_path) -> None:
    truth = nokaslr_guest.truth()
    raw = nokaslr_guest.dump(tmp_path / "nokaslr.raw", "raw")
    for target in (f"lab:{nokaslr_guest.name}", str(raw)):
        with Session.attach(target) as s:
            loc = s.guest.location
            assert (loc.virtual_shift, loc.physical_shift) == (0, 0)
            assert s.symbol("_text") == truth.symbols["_text"] == 0xFFFFFFFF81000000
            assert s.kernel.translate(truth.symbols["_text"]).paddr == truth.kernel_code[0]
            marker = s.process(truth.marker_pid)
            assert marker.read(truth.marker_va, len(MARKER)) == MARKER
