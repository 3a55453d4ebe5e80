"""Every kernel generation in the lab: vmishell equals each guest's own view of itself.

One guest per Debian suite other than the host's (bullseye 5.10, trixie 6.12,
sid: the newest), each the x86_64 guest with that suite's kernel and the same
workload. Each boots once (with the many-mappings scenario, so its maple tree
or VMA list is deep), serves every test here, and is stopped when they are
done; the next one boots meanwhile, so at most two run at once and the boots
overlap the tests instead of adding to them.
The newest kernel also boots on a CPU with LA57, for 5-level paging.
The oracle is each guest's own ground truth, not a kernel version: the same
checks hold on whichever kernel Debian serves today.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from tests.lab.test_linux_lab import NS_PER_TICK, _is_kworker, _same_comm, _states_agree
from vmishell.lab.guests import GENERATIONS, GUESTS
from vmishell.lab.truth import GroundTruth, MapLine
from vmishell.lab.workload import MARKER, layout
from vmishell.session import Session

pytestmark = pytest.mark.lab

#: Boot and wall times, printed at the end of the module (`pytest -s` shows them).
TIMES: dict[str, float] = {}


@dataclass
class Generation:
    guest: object  # RunningGuest
    truth: GroundTruth
    session: Session


@pytest.fixture(scope="module", autouse=True)
def _module_clock() -> Iterator[None]:
    started = time.monotonic()
    yield
    TIMES["module wall time"] = round(time.monotonic() - started, 1)
    print("\ngenerations:", ", ".join(f"{k} {v} s" for k, v in TIMES.items()))


#: Each generation, and the newest kernel again on a CPU with LA57 (5-level paging).
NAMES = [f"x86_64-{suite}" for suite in GENERATIONS] + ["x86_64-sid-la57"]


@pytest.fixture(scope="module")
def boots(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[SimpleNamespace]:
    """Boots generations on request, one at a time; stops whatever is left at the end."""
    from tests.support.elf import scenario
    from vmishell.errors import VmiError
    from vmishell.lab import runner

    mine = [item for item in request.session.items if item.module is request.module]
    wanted = {item.callspec.params.get("generation") for item in mine if hasattr(item, "callspec")}
    script = tmp_path_factory.mktemp("scenario") / "many-maps.sh"
    script.write_text(scenario())
    futures: dict[str, Future] = {}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="generation") as pool:

        def start(name: str) -> Future:
            if name not in futures:
                futures[name] = pool.submit(
                    runner.up, name, f"t-{os.getpid()}-{name}", init_script=script, timeout=240
                )
            return futures[name]

        try:
            yield SimpleNamespace(start=start, order=[n for n in NAMES if n in wanted])
        finally:
            for future in futures.values():
                future.cancel()
    for future in futures.values():
        if not future.cancelled() and future.exception() is None:
            with contextlib.suppress(VmiError):
                future.result().down()


@pytest.fixture(scope="module", params=NAMES)
def generation(request: pytest.FixtureRequest, boots) -> Iterator[Generation]:
    """One generation's guest, booted with the many-mappings scenario, stopped after.

    The next generation boots while this one's tests run (two guests at most).
    """
    from tests.conftest import lab_unavailable
    from vmishell.errors import VmiError

    name = request.param
    try:
        guest = boots.start(name).result()
    except VmiError as exc:
        lab_unavailable(f"{name}: {exc}")
    later = boots.order[boots.order.index(name) + 1 :] if name in boots.order else []
    if later:
        boots.start(later[0])
    TIMES[f"{name} boot"] = guest.boot_seconds or -1.0
    session = Session.lab(guest.name)
    try:
        yield Generation(guest, guest.truth(), session)
    finally:
        session.close()
        guest.down()


def test_the_profile_is_built_from_the_guests_own_kernel_package(generation) -> None:
    """BTF for the types and the image's own kallsyms for the addresses, from the .deb
    the guest boots (shipped profiles are made the same way by scripts/refresh-profiles)."""
    from vmishell.lab.build import build_guest
    from vmishell.lab.profiles import profile_name

    built = build_guest(generation.guest.spec)
    profile = generation.session.profile
    assert profile.path is not None and profile.path.name == profile_name(built)
    kernel = built.manifest["packages"]["kernel"]
    assert profile.made_from == f"{kernel['name']} {kernel['version']}"
    assert profile.producer["types_from"] == "BTF in the kernel image"
    assert profile.producer["symbols_from"] == "kallsyms"
    assert generation.session.symbol("_text") == generation.truth.symbols["_text"]


def test_the_paging_mode_is_the_cpus(generation) -> None:
    """4-level paging, or 5-level where the CPU has LA57 (the kernel turns it on)."""
    spec = generation.guest.spec
    mode = generation.session.guest.location.mode.name
    assert mode == ("LEVEL5" if spec.paging == "5-level" else "LEVEL4")


def test_processes_with_their_states_equal_the_guests_own_list(generation) -> None:
    s, truth = generation.session, generation.truth
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
    states = {t.pid: t.state for t in s.guest.tasks()}
    for role in ("stopped", "frozen", "sleep", "cat"):
        pid = truth.pids[role]
        assert states[pid] == truth.task(pid).state, role


def test_threads_of_the_marker_and_every_thread_the_guest_listed(generation) -> None:
    s, truth = generation.session, generation.truth
    df = s.processes(threads=True)
    marker = df[df.tgid == truth.marker_pid]
    assert sorted(marker.pid) == sorted(t.pid for t in truth.threads_of(truth.marker_pid))
    assert len(marker) == 2
    for task in truth.processes:
        if task.pid != task.tgid:
            assert task.pid in set(df.pid), task


def test_the_marker_maps_and_bytes_equal_the_guests(generation) -> None:
    s, truth = generation.session, generation.truth
    proc = s.process(truth.marker_pid)
    ours = [(v.start, v.end, v.perms, v.offset, v.device, v.inode, v.path) for v in proc.vmas()]
    theirs = [(m.start, m.end, m.perms, m.offset, m.dev, m.inode, m.path) for m in truth.maps]
    assert ours == theirs
    lay = layout("x86_64")
    assert proc.read(lay.marker_va, len(MARKER)) == MARKER


def test_the_page_walk_agrees_with_pagemap(generation) -> None:
    s, truth = generation.session, generation.truth
    proc = s.process(truth.marker_pid)
    assert proc.translate(layout("x86_64").marker_va).paddr == truth.marker_paddr
    present = [(va, e) for va, e in truth.pagemap.items() if e.present]
    assert present
    for vaddr, entry in present:
        assert proc.translate(vaddr).paddr >> 12 == entry.pfn, hex(vaddr)


def test_a_process_with_many_mappings_has_every_one(generation) -> None:
    """A deep VMA structure (maple tree with internal nodes, or a long VMA list)."""
    from tests.support.elf import MAPPINGS, PREFIX

    log = generation.guest.serial_log.read_bytes().decode("utf-8", "replace").replace("\r", "")
    lines = [line.split(PREFIX, 1)[1] for line in log.splitlines() if PREFIX in line]
    assert lines and lines[-1] == "end", "the scenario did not print its maps"
    pid = int(lines[0].split()[1])
    theirs = [MapLine.parse(line[4:]) for line in lines[1:-1]]
    assert len(theirs) > MAPPINGS
    ours = generation.session.process(pid).vmas()
    assert [(v.start, v.end, v.perms, v.path, v.error) for v in ours] == [
        (m.start, m.end, m.perms, m.path, None) for m in theirs
    ]


#: Volatility3 (2.28) has no 5-level paging layer: left to search for a kernel it cannot
#: translate for, it runs for minutes. The README's kernel section says so.
VOLATILITY_GUESTS = [n for n in NAMES if GUESTS[n].paging != "5-level"]


@pytest.mark.parametrize("generation", VOLATILITY_GUESTS, indirect=True)
def test_volatility_pslist_lists_the_guests_processes(generation) -> None:
    """Volatility3 (the installed version) through vmishell's data layer lists what the
    guest's /proc listed, on every generation with 4-level paging."""
    from vmishell.interop.volatility import run_plugin

    truth = generation.truth
    df = run_plugin(generation.session, "linux.pslist")
    vol = {row.PID: (row.PPID, row.COMM) for row in df.itertuples()}
    for task in truth.processes:
        if task.pid != task.tgid or _is_kworker(task.comm):
            continue
        assert task.pid in vol, task
        ppid, comm = vol[task.pid]
        assert ppid == task.ppid and task.comm.startswith(comm), (task, ppid, comm)
    assert vol[truth.marker_pid][1] == "vmi-marker"
