"""Task state letters are the ones /proc shows, as `__task_state_index()` computes them."""

from __future__ import annotations

import pytest

from tests.support.profiles import kernel
from vmishell.os.linux.guest import LinuxGuest
from vmishell.os.linux.tasks import state_letter

# (__state, exit_state, letter): include/linux/sched.h of 6.1 (stable), as /proc/PID/stat.
CASES = [
    (0x0000, 0, "R"),  # TASK_RUNNING
    (0x0001, 0, "S"),  # TASK_INTERRUPTIBLE
    (0x0002, 0, "D"),  # TASK_UNINTERRUPTIBLE
    (0x0102, 0, "D"),  # TASK_KILLABLE = WAKEKILL | UNINTERRUPTIBLE
    (0x0104, 0, "T"),  # TASK_STOPPED = WAKEKILL | __TASK_STOPPED
    (0x0008, 0, "t"),  # TASK_TRACED
    (0x0040, 0, "P"),  # TASK_PARKED
    (0x0402, 0, "I"),  # TASK_IDLE = UNINTERRUPTIBLE | NOLOAD
    (0x2402, 0, "I"),  # TASK_IDLE | TASK_FREEZABLE
    (0x2001, 0, "S"),  # TASK_INTERRUPTIBLE | TASK_FREEZABLE
    (0x0200, 0, "R"),  # TASK_WAKING: not a state of its own
    (0x0800, 0, "R"),  # TASK_NEW
    (0x0400, 0, "R"),  # TASK_NOLOAD alone
    (0x1000, 0, "D"),  # TASK_RTLOCK_WAIT: shown as an rtmutex wait
    (0x8000, 0, "D"),  # TASK_FROZEN: shown as uninterruptible (6.1.y, 6.13)
    (0x0080, 0x10, "X"),  # TASK_DEAD with EXIT_DEAD
    (0x0080, 0x20, "Z"),  # TASK_DEAD with EXIT_ZOMBIE
    (0x0000, 0x20, "Z"),  # a zombie that is formally running
    (0x0080, 0, "R"),  # TASK_DEAD alone is not reported
    (0x0041, 0, "P"),  # the highest reported bit wins (fls)
]


@pytest.mark.parametrize(("state", "exit_state", "letter"), CASES)
def test_state_letter_is_the_kernels(state: int, exit_state: int, letter: str) -> None:
    assert state_letter(state, exit_state) == letter


@pytest.mark.parametrize("layout", ["6.1", "5.10", "i386-5.10"])
def test_tasks_read_their_state_from_the_profiles_field(layout: str) -> None:
    """`__state` (5.14+) or the older `long state`, wherever the profile puts it."""
    k = kernel(layout)
    wanted = {
        10 + i: (state, exit_state, letter) for i, (state, exit_state, letter) in enumerate(CASES)
    }
    for pid, (state, exit_state, _) in wanted.items():
        k.task(pid, f"t{pid}", state=state, exit_state=exit_state)
    tasks = LinuxGuest(k.source(), k.profile).tasks()
    assert {t.pid: t.state for t in tasks if t.pid in wanted} == {
        pid: letter for pid, (_, _, letter) in wanted.items()
    }
