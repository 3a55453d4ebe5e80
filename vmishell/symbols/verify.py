"""Check a profile against the running kernel before trusting it.

A profile carved from guest memory (or offered as a near match) is only as
good as the guest data it came from. Three checks that a wrong layout or a
wrong symbol fails: `init_task.comm` reads "swapper/0", the task list closes
back on init_task within the session's caps, and a user process's
`mm->pgd` translates that process's own stack pointer (`mm->start_stack`).
A carved profile also names its BTF checksum: the BTF at `__start_BTF` in the
running kernel must still have it (a cached profile matched by banner alone
could belong to another build).
"""

from __future__ import annotations

import hashlib
from typing import Any

from vmishell.errors import ProfileError, VmiError
from vmishell.symbols.carve_btf import HEADER_LEN, parse_header


def verify_profile(guest: Any) -> list[str]:
    """The checks passed, one line each; ProfileError names the first that failed.

    `guest` is a located `vmishell.os.linux.guest.LinuxGuest` (not imported:
    the symbols layer sits below the OS layer).
    """
    name = guest.profile.name
    done: list[str] = []
    try:
        done.append(_init_task_is_swapper(guest))
        tasks = guest.tasks()
        done.append(f"task list closes after {len(tasks)} tasks")
        done.append(_user_stack_translates(guest, tasks))
        btf = _btf_matches(guest)
        if btf:
            done.append(btf)
    except ProfileError as exc:
        raise ProfileError(f"profile {name} does not fit the running kernel: {exc}") from exc
    except VmiError as exc:
        passed = "; ".join(done) or "no check passed"
        raise ProfileError(
            f"profile {name} does not fit the running kernel ({passed}): {exc}"
        ) from exc
    return done


def _init_task_is_swapper(guest: Any) -> str:
    comm = guest.init_task + guest.profile.offset_of("task_struct", "comm")
    text = guest.reader.space.read(comm, 16).split(b"\0")[0]
    if text != b"swapper/0":
        raise ProfileError(f"init_task.comm is {text[:16]!r}, not 'swapper/0'")
    return "init_task.comm is swapper/0"


def _user_stack_translates(guest: Any, tasks: list) -> str:
    start_stack = guest.profile.offset_of("mm_struct", "start_stack")
    users = [t for t in tasks if t.mm and not t.kernel_thread and not t.error]
    if not users:
        return "no user process to check mm->pgd with (kernel threads only)"
    problems = []
    for task in users[:8]:
        try:
            stack = guest.reader.pointer(task.mm + start_stack)
            guest.translator(guest.dtb_of(task)).translate(stack)
        except VmiError as exc:
            problems.append(f"pid {task.pid}: {exc}")
            continue
        return f"pid {task.pid}: mm->pgd translates its stack {stack:#x}"
    raise ProfileError("no user process's mm->pgd translates its own stack: " + problems[0])


def _btf_matches(guest: Any) -> str | None:
    wanted = guest.profile.producer.get("btf_sha256")
    profile = guest.profile
    if not wanted or not profile.has_symbol("__start_BTF"):
        return None
    start = guest.symbol("__start_BTF")
    space = guest.reader.space
    header = parse_header(space.read(start, HEADER_LEN), start)
    blob = space.read(start, header.size)
    if hashlib.sha256(blob).hexdigest() != wanted:
        raise ProfileError(
            f"the kernel's BTF at {start:#x} is not the one the profile was made from"
        )
    return "BTF checksum matches"
