"""The task walk on synthetic kernels: both thread-list schemes, prev links, start times, argv."""

from __future__ import annotations

import pytest

from tests.support.kernel import SyntheticKernel
from tests.support.profiles import kernel
from vmishell.os.linux.guest import LinuxGuest

#: Layouts with each thread-list scheme: `thread_group` (before 6.7, 6.1 keeps both
#: lists) and `signal->thread_head` + `thread_node` only (6.7+).
LAYOUTS = ["6.1", "6.7", "3.14-6.6", "5.10", "i386-pae", "i386-legacy-2G", "i386-5.10"]


def _family(k: SyntheticKernel) -> None:
    """init with two threads, a kernel thread, and a single-threaded child of init."""
    mm = k.mm(argv=["/sbin/init", "--quiet"])
    init = k.task(1, "init", mm=mm, start_boottime=1_230_000_000)
    k.task(5, "init-worker", leader=init, mm=mm)
    k.task(6, "init-reaper", leader=init, mm=mm)
    k.task(2, "kthreadd", kthread=True, state=0x402)
    child_mm = k.mm(argv=["sleep", "9"])
    k.task(7, "sleep", parent=init, mm=child_mm, uid=1000)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_task_leaders_each_followed_by_their_threads(layout: str) -> None:
    k = kernel(layout)
    _family(k)
    tasks = LinuxGuest(k.source(), k.profile).tasks()
    assert [(t.pid, t.tgid, t.ppid, t.comm) for t in tasks] == [
        (0, 0, 0, "swapper/0"),
        (1, 1, 0, "init"),
        (5, 1, 0, "init-worker"),
        (6, 1, 0, "init-reaper"),
        (2, 2, 0, "kthreadd"),
        (7, 7, 1, "sleep"),
    ]
    assert all(t.error is None for t in tasks)
    assert [t.kernel_thread for t in tasks] == [True, False, False, False, True, False]
    assert next(t for t in tasks if t.pid == 7).uid == 1000


@pytest.mark.parametrize("layout", ["6.1", "6.7", "i386-pae"])
def test_start_boottime_is_read_in_nanoseconds(layout: str) -> None:
    k = kernel(layout)
    _family(k)
    init = next(t for t in LinuxGuest(k.source(), k.profile).tasks() if t.pid == 1)
    assert init.start_boottime == 1_230_000_000
    assert init.start_boottime // 10**7 == 123  # /proc/PID/stat's clock ticks


@pytest.mark.parametrize("layout", ["6.1", "i386-5.10"])
def test_argv_comes_from_the_process_memory(layout: str) -> None:
    k = kernel(layout)
    _family(k)
    guest = LinuxGuest(k.source(), k.profile)
    init = next(t for t in guest.tasks() if t.pid == 1)
    assert guest.cmdline(init, guest.address_space(guest.dtb_of(init))) == ["/sbin/init", "--quiet"]
    assert guest.cmdline(next(t for t in guest.tasks() if t.pid == 2), guest.kernel_space) is None


def _hide(k: SyntheticKernel, list_next: int, target: int) -> None:
    """Point a list's `next` past its node, leaving that node's neighbours' prev links."""
    k.write_word(list_next, target)


@pytest.mark.parametrize("layout", ["6.1", "6.7", "5.10"])
def test_a_leader_skipped_by_a_next_link_marks_the_row_it_leads_to(layout: str) -> None:
    """The DKOM trick: init's tasks.next jumps over kthreadd. The task reached has a prev
    link that does not point back, so its row says so."""
    k = kernel(layout)
    _family(k)
    init, kthreadd, sleep = k.leaders[0], k.leaders[1], k.leaders[2]
    _hide(k, init.obj.addr("tasks.next"), sleep.obj.addr("tasks"))
    tasks = LinuxGuest(k.source(), k.profile).tasks()
    assert 2 not in {t.pid for t in tasks} and kthreadd.pid == 2
    row = next(t for t in tasks if t.pid == 7)
    assert row.error and "prev link" in row.error


@pytest.mark.parametrize("layout", ["6.1", "6.7", "i386-5.10"])
def test_a_thread_skipped_by_a_next_link_marks_the_row_it_leads_to(layout: str) -> None:
    k = kernel(layout)
    _family(k)
    leader = k.leaders[0]
    first, second = leader.threads
    scheme = "thread_group" if k.profile.has_field("task_struct", "thread_group") else "thread_node"
    # The list entry before the first thread is the leader's own (thread_group) or the
    # leader's thread_node (signal->thread_head: leader, first, second).
    _hide(k, leader.obj.addr(f"{scheme}.next"), second.obj.addr(scheme))
    tasks = LinuxGuest(k.source(), k.profile).tasks()
    assert first.pid not in {t.pid for t in tasks}
    row = next(t for t in tasks if t.pid == second.pid)
    assert row.error and "prev link" in row.error


def test_a_thread_list_that_leads_into_foreign_memory_stops_there() -> None:
    """Two links in a row that do not point back: the walk stops and says where."""
    k = kernel("6.7")
    _family(k)
    leader = k.leaders[0]
    junk, _ = k.alloc(64)
    k.write_word(junk, junk + 32)  # junk.next -> more junk, whose prev names nothing
    _hide(k, leader.obj.addr("thread_node.next"), junk)
    tasks = LinuxGuest(k.source(), k.profile).tasks()
    row = next(t for t in tasks if t.pid == 1)
    assert row.error and "foreign memory" in row.error
