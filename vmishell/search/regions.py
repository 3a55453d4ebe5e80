"""Who maps what: the mapped runs of processes (and the kernel), split at their VMAs.

A search scans physical frames, not virtual addresses, so that a frame
shared by fifty processes (a library's text, the page cache) is read once;
each hit is then reported for every run that maps it. `Regions` is that
list of runs, sorted both ways: by process and address (to find runs that
follow each other virtually) and by physical address (the reverse map).
Its size is bounded by `Limits.max_reverse_map`, and each process's
enumeration by `Limits.max_mapping_work`.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING, NamedTuple

from vmishell.errors import VmiError

if TYPE_CHECKING:
    from vmishell.os.linux.vmas import Vma
    from vmishell.session import Process, Session


#: Runs larger than this are kept apart in the reverse map (see Regions.covering).
SMALL = 1 << 21


class Region(NamedTuple):
    """One virtually and physically contiguous run of one owner, inside one VMA."""

    owner: int  # index into Regions.owners
    vaddr: int
    paddr: int
    size: int
    vma: int  # index into Regions.vmas, -1 for a run no VMA covers (or the kernel)
    writable: bool
    nx: bool


@dataclass(frozen=True, slots=True)
class Owner:
    """A process (pid 0: the kernel) whose runs are in the map."""

    pid: int
    comm: str


@dataclass
class Regions:
    """The runs of the processes scanned; `problems` says what could not be enumerated."""

    owners: list[Owner]
    vmas: list[Vma]
    runs: list[Region]
    problems: list[str]
    stopped: str | None = None

    def __post_init__(self) -> None:
        self.by_phys = sorted(self.runs, key=lambda r: r.paddr)
        # Runs up to SMALL bytes are found by bisection and a short look back; the few
        # larger ones (a kernel's direct map, huge pages) are checked one by one, so one
        # 1 GiB run does not make every lookup walk back over all the small ones.
        small = [r for r in self.by_phys if r.size <= SMALL]
        self._small = small
        self._starts = [r.paddr for r in small]
        self._large = [r for r in self.by_phys if r.size > SMALL]

    def covering(self, paddr: int, size: int = 1) -> Iterator[Region]:
        """Every run that maps all of physical [paddr, paddr+size)."""
        runs, starts = self._small, self._starts
        i = bisect.bisect_right(starts, paddr) - 1
        low = paddr - SMALL
        while i >= 0 and starts[i] > low:
            r = runs[i]
            if paddr + size <= r.paddr + r.size:
                yield r
            i -= 1
        for r in self._large:
            if r.paddr > paddr:
                break
            if paddr + size <= r.paddr + r.size:
                yield r

    def frames(self) -> list[tuple[int, int]]:
        """The physical intervals the runs cover, merged: each byte once."""
        merged: list[tuple[int, int]] = []
        for r in self.by_phys:
            end = r.paddr + r.size
            if merged and r.paddr <= merged[-1][1]:
                if end > merged[-1][1]:
                    merged[-1] = (merged[-1][0], end)
            else:
                merged.append((r.paddr, end))
        return merged

    def chains(self) -> Iterator[list[Region]]:
        """Each owner's runs that follow each other virtually, in address order."""
        runs = self.runs
        ordered = all((a.owner, a.vaddr) < (b.owner, b.vaddr) for a, b in pairwise(runs))
        if not ordered:  # `collect` makes them in order; anything else is sorted first
            runs = sorted(runs, key=lambda r: (r.owner, r.vaddr))
        chain: list[Region] = []
        for r in runs:
            if chain and (
                r.owner != chain[-1].owner or r.vaddr != chain[-1].vaddr + chain[-1].size
            ):
                yield chain
                chain = []
            chain.append(r)
        if chain:
            yield chain


def user_processes(session: Session, pids: Iterable[int] | None) -> list[Process]:
    """Thread-group leaders with an address space (one per mm), optionally only `pids`."""
    from vmishell.session import Process

    wanted = None if pids is None else set(pids)
    seen: set[int] = set()
    out = []
    for task in session.tasks():
        if not task.is_thread_group_leader or not task.mm or task.error:
            continue
        if wanted is not None and task.pid not in wanted:
            continue
        if task.mm in seen:
            continue
        seen.add(task.mm)
        try:
            out.append(Process(session, task, session.guest.dtb_of(task)))
        except VmiError:
            continue
    if wanted is not None:
        missing = wanted - {p.pid for p in out} - {0}
        if missing:
            from vmishell.errors import GuestDataError

            raise GuestDataError(
                f"no user process with pid {', '.join(map(str, sorted(missing)))} in {session.name}"
            )
    return out


def collect(
    session: Session,
    processes: list[Process],
    *,
    kernel: bool = False,
    kernel_user: bool = False,
) -> Regions:
    """The runs of `processes` (user half, split at VMAs) and, with `kernel`, the kernel's.

    `kernel_user` keeps runs of the kernel's page tables marked user too (for
    the physical reverse map, which wants every mapping).
    """
    limit = session.limits.max_reverse_map
    owners: list[Owner] = []
    vmas: list[Vma] = []
    runs: list[Region] = []
    problems: list[str] = []
    stopped = None
    targets: list[Process | None] = list(processes)
    if kernel:
        targets.append(None)
    for process in targets:
        if process is None:
            process = session.process(0)
        owner = len(owners)
        owners.append(Owner(process.pid, process.comm))
        try:
            added = _runs_of(process, owner, vmas, kernel_user)
            for region in added:
                if len(runs) >= limit:
                    stopped = (
                        f"reverse map stopped at {limit} runs (Limits.max_reverse_map): "
                        f"pid {process.pid} and later processes are incomplete"
                    )
                    break
                runs.append(region)
        except VmiError as exc:
            problems.append(f"pid {process.pid} ({process.comm}): {exc}")
        if stopped:
            break
    return Regions(owners, vmas, runs, problems, stopped)


def _runs_of(process: Process, owner: int, vmas: list[Vma], kernel_user: bool) -> list[Region]:
    if process.pid == 0:
        return [
            Region(owner, m.vaddr, m.paddr, m.size, -1, m.writable, m.nx)
            for m in process.mappings()
            if kernel_user or not m.user
        ]
    mine = sorted(
        (v for v in process.vmas() if v.error is None and v.end > v.start), key=lambda v: v.start
    )
    if not mine:
        return []
    base = len(vmas)
    vmas.extend(mine)
    starts = [v.start for v in mine]
    out = []
    for m in process.mappings(mine[0].start, mine[-1].end):
        if not m.user:
            continue
        pos, end = m.vaddr, m.vaddr + m.size
        while pos < end:
            i = bisect.bisect_right(starts, pos) - 1
            if i >= 0 and pos < mine[i].end:
                stop, index = min(end, mine[i].end), base + i
            else:  # mapped by the page tables but not in any VMA: still reported
                nxt = starts[i + 1] if i + 1 < len(starts) else end
                stop, index = min(end, nxt), -1
            out.append(
                Region(owner, pos, m.paddr + (pos - m.vaddr), stop - pos, index, m.writable, m.nx)
            )
            pos = stop
    return out


__all__ = ["Owner", "Region", "Regions", "collect", "user_processes"]
