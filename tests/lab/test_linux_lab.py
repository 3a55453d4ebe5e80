"""vmishell's view of every lab guest equals the guest kernel's own view of itself.

The oracle is what each guest printed on its serial console at boot (its
process list, the marker process's /proc/PID/maps and pagemap frames, kernel
symbols and /proc/iomem). The same checks run on the live guest and on raw
and ELF dumps of it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vmishell.lab.truth import GroundTruth
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


def _same_comm(ours: str, theirs: str) -> bool:
    """/proc/PID/comm of a workqueue worker adds the work it serves or served
    ("kworker/0:1-events", "+" while running): task->comm has only the name."""
    if ours == theirs:
        return True
    return _is_kworker(ours) and theirs[: len(ours) + 1] in (ours + "-", ours + "+")


#: USER_HZ: /proc/PID/stat gives times in 1/100 s, whatever the kernel's HZ.
NS_PER_TICK = 10**9 // 100


def _states_agree(ours: str, theirs: str, pid: int, truth: GroundTruth) -> bool:
    """Whether a state read now can follow the one the guest printed at boot.

    The guest printed its list a while before we read memory. Tasks blocked
    for good (the sleeper, cat on its FIFO, the stopped and the frozen
    task) cannot have changed, so their letters must be equal. pid 1 was
    running (it printed the list) and has since blocked on its FIFO. Others
    (kernel threads, the marker that ticks once a second) may have been woken
    and gone back to the same wait, or be running now, so either letter may
    be "R". Any other change (one kind of wait to another, to stopped, parked
    or "?") is taken as a misreading: none of these tasks does that on an
    idle guest.
    """
    if pid in truth.pids.values():
        return ours == theirs
    if pid == 1:
        return theirs == "R" and ours in "RS"
    return ours == theirs or "R" in (ours, theirs)


def test_processes_equal_the_guests_own_list(session) -> None:
    s, truth, _ = session
    df = s.processes(threads=True)
    assert df.error.isna().all(), df[df.error.notna()]
    ours = {row.pid: row for row in df.itertuples()}
    started = {t.pid: t.start_boottime // NS_PER_TICK for t in s.guest.tasks()}
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
        assert _same_comm(row.comm, task.comm), (row.comm, task)
        assert _states_agree(row.state, task.state, task.pid, truth), (row.state, task)
        assert started[task.pid] == task.start_ticks, (started[task.pid], task)
    truth_pids = {t.pid for t in truth.processes}
    extra = df[~df.pid.isin(truth_pids) & (df.pid != 0)]
    assert all(_is_kworker(c) for c in extra.comm), extra
    assert ours[0].comm == "swapper/0"


def test_the_stopped_and_the_frozen_task_show_their_states(session) -> None:
    """States that only the kernel's own rules give: a frozen task (state TASK_FROZEN
    alone, no reported bit) reads "D" on 6.1, a stopped one (TASK_WAKEKILL|__TASK_STOPPED)
    "T", as the guest's /proc said."""
    s, truth, _ = session
    states = {t.pid: t.state for t in s.guest.tasks()}
    assert truth.task(truth.pids["frozen"]).state == "D"
    assert truth.task(truth.pids["stopped"]).state == "T"
    assert states[truth.pids["frozen"]] == "D"
    assert states[truth.pids["stopped"]] == "T"


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


@pytest.fixture(scope="module")
def pti_guest(tmp_path_factory: pytest.TempPathFactory):
    """The x86_64-pti guest, also running a process with many mappings (one boot for both).

    Booted here, not through the shared pool, because it carries that scenario.
    """
    import os

    from tests.conftest import lab_unavailable
    from tests.support.elf import scenario
    from vmishell.errors import VmiError
    from vmishell.lab import runner

    script = tmp_path_factory.mktemp("scenario") / "many-maps.sh"
    script.write_text(scenario())
    try:
        guest = runner.up("x86_64-pti", f"t-{os.getpid()}-pti", init_script=script)
    except VmiError as exc:
        lab_unavailable(str(exc))
    yield guest
    guest.down()


def _rights_match_the_vmas_and_pagemap(guest) -> None:
    """Each present page of the marker translates with the rights its VMA gives, to the
    frame the guest's pagemap gives; the kernel's copy of the tables is NX for user
    pages exactly when the guest says PTI is on."""
    truth = guest.truth()
    pti = truth.meltdown == "Mitigation: PTI"
    with Session.lab(guest.name) as s:
        assert s.guest.pti == pti
        assert s.guest.cpu.phys_bits == truth.phys_bits
        proc = s.process(truth.marker_pid)
        kernel_copy = s.guest.translator(s.guest.pgd_physical(proc.task.mm))
        checked = set()
        for label, vaddr in truth.pagemap_labels.items():
            entry = truth.pagemap[vaddr]
            if not entry.present:
                continue
            vma = next(m for m in truth.maps if vaddr in m)
            t = proc.translate(vaddr)
            assert t.paddr >> 12 == entry.pfn, label
            assert t.user, label
            assert t.nx == ("x" not in vma.perms), (label, vma.perms, t)
            if "w" not in vma.perms:
                assert not t.writable, (label, vma.perms, t)
            assert kernel_copy.translate(vaddr).nx == (pti or "x" not in vma.perms), label
            checked.add(vma.perms)
    assert {"r-xp", "rw-p"} <= checked


def test_under_pti_a_process_sees_its_own_rights(pti_guest) -> None:
    """An Intel CPU model the kernel deems open to Meltdown: page-table isolation is on,
    the kernel's copy makes every user page NX, and the process runs on the other copy,
    one page further, whose rights are the ones a process must show."""
    assert pti_guest.truth().meltdown == "Mitigation: PTI"
    _rights_match_the_vmas_and_pagemap(pti_guest)


def test_without_pti_a_process_sees_its_own_rights(x86_64_guest) -> None:
    assert x86_64_guest.truth().meltdown != "Mitigation: PTI"
    _rights_match_the_vmas_and_pagemap(x86_64_guest)


def test_a_process_with_a_deep_maple_tree_has_every_mapping(pti_guest) -> None:
    """40 anonymous pages with alternating rights: a tree with internal nodes, whose
    children are encoded without the root's bit (vmishell lost all these VMAs before)."""
    from tests.support.elf import MAPPINGS, PREFIX
    from vmishell.lab.truth import MapLine

    log = pti_guest.serial_log.read_bytes().decode("utf-8", "replace").replace("\r", "")
    lines = [line.split(PREFIX, 1)[1] for line in log.splitlines() if PREFIX in line]
    assert lines and lines[-1] == "end", "the scenario did not print its maps"
    pid = int(lines[0].split()[1])
    theirs = [MapLine.parse(line[4:]) for line in lines[1:-1]]
    assert len(theirs) > MAPPINGS
    with Session.lab(pti_guest.name) as s:
        ours = s.process(pid).vmas()
    assert [(v.start, v.end, v.perms, v.path, v.error) for v in ours] == [
        (m.start, m.end, m.perms, m.path, None) for m in theirs
    ]
