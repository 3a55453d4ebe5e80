"""Every task of a Linux guest: walk `init_task.tasks`, then each thread group.

A task that cannot be decoded is still listed, with its `error` set, so one
corrupt structure never hides the rest of the table.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from vmishell.errors import GuestDataError, VmiError
from vmishell.limits import Limits
from vmishell.os.linux.layout import TaskLayout
from vmishell.os.linux.reader import KernelReader, decode_guest_string

PF_KTHREAD = 0x00200000
PF_WQ_WORKER = 0x00000020
#: The largest pid a Linux kernel hands out (PID_MAX_LIMIT on 64-bit).
PID_MAX_LIMIT = 4 * 1024 * 1024
#: Characters of a kernel thread's full name that /proc/PID/comm shows.
KTHREAD_NAME_MAX = 63

#: The kernel's task state bits (include/linux/sched.h, 6.1). Neither BTF nor DWARF
#: carries these #defines, so no profile has them; the report bits have had these
#: values since 4.14, and the later bits (RTLOCK_WAIT 5.15, FROZEN 6.1) were unused
#: before they were given these meanings.
TASK_INTERRUPTIBLE = 0x0001
TASK_UNINTERRUPTIBLE = 0x0002
TASK_STOPPED = 0x0004
TASK_TRACED = 0x0008
EXIT_DEAD = 0x0010
EXIT_ZOMBIE = 0x0020
TASK_PARKED = 0x0040
TASK_DEAD = 0x0080
TASK_WAKEKILL = 0x0100
TASK_WAKING = 0x0200
TASK_NOLOAD = 0x0400
TASK_NEW = 0x0800
TASK_RTLOCK_WAIT = 0x1000
TASK_FREEZABLE = 0x2000
TASK_FROZEN = 0x8000
TASK_IDLE = TASK_UNINTERRUPTIBLE | TASK_NOLOAD
#: The states /proc reports; TASK_REPORT_IDLE is the one past them ("I").
TASK_REPORT = 0x7F
TASK_REPORT_IDLE = TASK_REPORT + 1
#: task_index_to_char(): one letter per fls() of a reported state.
STATE_CHARS = "RSDTtXZPI"


def state_letter(state: int, exit_state: int) -> str:
    """The letter /proc/PID/stat and `ps` show, as `__task_state_index()` computes it.

    `state` is `__state` (or the older `state`), `exit_state` the exit bits.
    Bits outside TASK_REPORT (WAKEKILL, WAKING, NOLOAD, FREEZABLE...) are not
    states of their own: TASK_KILLABLE reads "D", a waking task "R". An idle
    kernel thread (TASK_UNINTERRUPTIBLE|TASK_NOLOAD) reads "I"; an rtlock
    waiter and a frozen task read "D" (6.1 stable, as 6.13).
    """
    index = (state | exit_state) & TASK_REPORT
    if state & TASK_IDLE == TASK_IDLE:
        index = TASK_REPORT_IDLE
    if state & (TASK_RTLOCK_WAIT | TASK_FROZEN):
        index = TASK_UNINTERRUPTIBLE
    return STATE_CHARS[index.bit_length()]


def shows_full_name(flags: int, worker_full_id: bool) -> bool:
    """Whether /proc/PID/comm shows a task's untruncated kthread name, not its comm.

    Kernel threads show their full name (5.17+). Workqueue workers show what
    `wq_worker_comm()` makes: their comm (plus the work they serve) while it
    copies task->comm, or their full worker ID ("kworker/R-mm_percpu_wq",
    which is the name the kthread was created with) once it formats that ID
    with `format_worker_id()` (6.10+, and stable backports): `worker_full_id`,
    taken from whether the profile has that symbol.
    """
    if not flags & PF_KTHREAD:
        return False
    return worker_full_id or not flags & PF_WQ_WORKER


@dataclass(frozen=True, slots=True)
class Task:
    """One task (thread) as the guest kernel describes it."""

    address: int
    pid: int
    tgid: int
    ppid: int
    comm: str
    state: str
    uid: int
    gid: int
    start_time: int
    kernel_thread: bool
    mm: int
    active_mm: int
    error: str | None = None
    #: Nanoseconds since boot, suspend included: /proc/PID/stat's start time
    #: (field 22, in clock ticks) is this divided by 10**7 with USER_HZ 100.
    start_boottime: int = 0

    @property
    def is_thread_group_leader(self) -> bool:
        return self.pid == self.tgid


class TaskWalker:
    """Decodes task_structs with offsets computed once."""

    def __init__(self, reader: KernelReader, layout: TaskLayout, limits: Limits) -> None:
        self.reader = reader
        self.t = layout
        self.limits = limits
        ptr = "Q" if reader.pointer_size == 8 else "I"
        self._ptr = struct.Struct("<" + ptr)
        self._span = self._field_span()

    def _field_span(self) -> int:
        t = self.t
        offsets = [t.tasks, t.pid, t.tgid, t.comm + t.comm_size, t.mm, t.active_mm]
        offsets += [t.real_parent, t.flags]
        optional = (t.state, t.exit_state, t.real_cred, t.cred, t.start_time, t.start_boottime)
        offsets += [o for o in optional if o]
        offsets += [o for o in (t.worker_private,) if o]
        return max(offsets) + 16

    def decode(self, address: int) -> Task:
        """One task_struct at `address`; unreadable fields give a row with `error`."""
        t, r = self.t, self.reader
        try:
            raw = r.read(address, self._span)
        except VmiError as exc:
            return Task(address, -1, -1, -1, "", "?", -1, -1, 0, False, 0, 0, str(exc))
        ptr = self._ptr.unpack_from

        def s32(off: int) -> int:
            return int.from_bytes(raw[off : off + 4], "little", signed=True)

        def u(off: int | None, size: int) -> int:
            return 0 if off is None else int.from_bytes(raw[off : off + size], "little")

        pid, tgid = s32(t.pid), s32(t.tgid)
        comm_raw = raw[t.comm : t.comm + t.comm_size].split(b"\0")[0]
        flags = u(t.flags, 4)
        truncated = len(comm_raw) == t.comm_size - 1
        if truncated and shows_full_name(flags, t.worker_full_id):
            comm_raw = self._kthread_full_name(raw) or comm_raw
        comm = decode_guest_string(comm_raw)
        mm = ptr(raw, t.mm)[0]
        active_mm = ptr(raw, t.active_mm)[0]
        state = state_letter(u(t.state, 4), u(t.exit_state, 4))
        start = u(t.start_time, 8)
        boot_start = u(t.start_boottime, 8)
        errors = []
        try:
            parent = ptr(raw, t.real_parent)[0]
            ppid = 0 if parent == address else r.s32(parent + t.tgid)
        except VmiError as exc:
            ppid, errors = -1, [f"real_parent: {exc}"]
        uid = gid = -1
        cred_off = t.real_cred if t.real_cred is not None else t.cred
        if cred_off is not None:
            try:
                cred = ptr(raw, cred_off)[0]
                if t.cred_gid == t.cred_uid + 4:  # side by side, as in every kernel: one read
                    ids = r.read(cred + t.cred_uid, 8)
                    uid, gid = int.from_bytes(ids[:4], "little"), int.from_bytes(ids[4:], "little")
                else:
                    uid, gid = r.u32(cred + t.cred_uid), r.u32(cred + t.cred_gid)
            except VmiError as exc:
                errors.append(f"cred: {exc}")
        if not (0 <= pid <= PID_MAX_LIMIT and 0 <= tgid <= PID_MAX_LIMIT):
            errors.append(f"implausible pid {pid} / tgid {tgid}")
        return Task(
            address=address,
            pid=pid,
            tgid=tgid,
            ppid=ppid,
            comm=comm,
            state=state,
            uid=uid,
            gid=gid,
            start_time=start,
            kernel_thread=bool(flags & PF_KTHREAD),
            mm=mm,
            active_mm=active_mm,
            error="; ".join(errors) or None,
            start_boottime=boot_start,
        )

    def _kthread_full_name(self, raw: bytes) -> bytes | None:
        """A kernel thread's untruncated name (`struct kthread.full_name`, 5.17+)."""
        t = self.t
        if t.worker_private is None or t.kthread_full_name is None:
            return None
        try:
            kthread = self._ptr.unpack_from(raw, t.worker_private)[0]
            if not kthread:
                return None
            name = self.reader.pointer(kthread + t.kthread_full_name)
            # /proc/PID/comm shows at most 63 characters of it (proc_task_name's
            # buffer), which also keeps a table of many threads small.
            limit = min(KTHREAD_NAME_MAX, self.limits.max_string)
            return self.reader.cstring(name, limit) if name else None
        except VmiError:
            return None

    def _thread_links(self, leader: int) -> Iterator[tuple[int, str | None]]:
        """(address, link problem) of a leader's other threads."""
        t = self.t
        cap = self.limits.max_threads_per_process
        if t.thread_group is not None:
            what = f"thread_group of task {leader:#x}"
            for node, problem in self.reader.walk_links(leader + t.thread_group, cap, what):
                yield node - t.thread_group, problem
            return
        if t.signal is None or t.signal_thread_head is None or t.thread_node is None:
            return
        signal = self.reader.pointer(leader + t.signal)
        what = f"signal.thread_head of task {leader:#x}"
        for node, problem in self.reader.walk_links(signal + t.signal_thread_head, cap, what):
            if node - t.thread_node != leader:
                yield node - t.thread_node, problem

    def all_tasks(self, init_task: int) -> list[Task]:
        """Every task, each leader followed by its threads.

        A broken list never hides the tasks already found: the row whose link
        is broken (or that was reached through a link that does not point
        back) carries the error, and the walk goes on where it safely can.
        The whole walk is bounded by `max_tasks`, counting every task it
        steps on, so thread lists that share their members cannot multiply
        the work.
        """
        cap = self.limits.max_tasks
        out: list[Task] = []
        seen: set[int] = set()
        steps = 0
        links = self.reader.walk_links(init_task + self.t.tasks, cap, "init_task.tasks")
        leader, link_problem = init_task, None
        while True:
            leader_row = len(out)
            seen.add(leader)
            task = self.decode(leader)
            decoded = task.error is None
            if link_problem:
                task = _with_error(task, link_problem)
            if leader != init_task and decoded and task.pid != task.tgid:
                # Only thread-group leaders are on init_task.tasks.
                task = _with_error(task, f"listed as a leader but its tgid is {task.tgid}")
            out.append(task)
            steps += 1
            if leader != init_task and decoded:
                problem = self._add_threads(leader, task.tgid, out, seen, cap - steps)
                steps = len(out)
                if problem:
                    out[leader_row] = _with_error(out[leader_row], problem)
            if steps >= cap:
                out[leader_row] = _with_error(out[leader_row], f"walk stopped at {cap} tasks")
                break
            try:
                node, link_problem = next(links)
            except StopIteration:
                break
            except GuestDataError as exc:
                out[leader_row] = _with_error(out[leader_row], f"tasks.next: {exc}")
                break
            leader = node - self.t.tasks
            if leader in seen:
                out[leader_row] = _with_error(
                    out[leader_row], f"tasks.next leads to task {leader:#x}, already listed"
                )
                break
        return out

    def _add_threads(
        self, leader: int, tgid: int, out: list[Task], seen: set[int], room: int
    ) -> str | None:
        """Append a leader's threads to `out`; the problem to mark the leader with, if any."""
        try:
            for address, link_problem in self._thread_links(leader):
                if address in seen:
                    # A thread belongs to one group: a shared member is a crafted
                    # or corrupt list, and walking on would repeat work per leader.
                    return f"thread list reaches task {address:#x}, already listed"
                if room <= 0:
                    return f"walk stopped at {self.limits.max_tasks} tasks"
                seen.add(address)
                thread = self.decode(address)
                if link_problem:
                    thread = _with_error(thread, link_problem)
                if thread.error is None and thread.tgid != tgid:
                    thread = _with_error(
                        thread, f"in thread group {tgid} but its tgid is {thread.tgid}"
                    )
                out.append(thread)
                room -= 1
        except VmiError as exc:
            return str(exc)
        return None


def _with_error(task: Task, error: str) -> Task:
    from dataclasses import replace

    return replace(task, error=f"{task.error}; {error}" if task.error else error)
