"""The plain Python API every front end uses: attach, list processes, read memory.

A Session joins a memory source, a kernel profile and the Linux layer. It
returns data (DataFrames, dataclasses, bytes) and never prints, so the same
calls serve the IPython magics, widgets, the command line and scripts.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vmishell.arch import AddressSpace, Mapping, Translation, Walk
from vmishell.errors import GuestDataError, SourceError, VmiError
from vmishell.limits import Limits, TextBudget
from vmishell.os.linux.guest import LinuxGuest
from vmishell.os.linux.tasks import Task
from vmishell.os.linux.vmas import Vma
from vmishell.sources import open_image
from vmishell.sources.base import PhysicalSource
from vmishell.symbols.finder import find_profile
from vmishell.symbols.profile import Profile, load_profile

if TYPE_CHECKING:
    import pandas as pd

ProfileArg = Profile | str | os.PathLike[str] | None

PROCESS_COLUMNS = [
    "pid", "tgid", "ppid", "comm", "state", "uid", "gid", "start_time",
    "kernel_thread", "dtb", "task", "cmdline", "error",
]  # fmt: skip
MAPS_COLUMNS = ["start", "end", "perms", "offset", "device", "inode", "path", "size", "error"]


@dataclass(frozen=True, slots=True)
class ProcessRow:
    """One row of the process table."""

    pid: int
    tgid: int
    ppid: int
    comm: str
    state: str
    uid: int
    gid: int
    start_time: float
    kernel_thread: bool
    dtb: int | None
    task: int
    cmdline: str | None
    error: str | None


class Process:
    """One process (or the kernel, pid 0) and its own view of virtual memory."""

    def __init__(self, session: Session, task: Task | None, dtb: int) -> None:
        self.session = session
        self.task = task
        self.pid = task.pid if task else 0
        self.dtb = dtb
        self.translator = session.guest.translator(dtb)
        self.space = AddressSpace(self.translator)

    @property
    def comm(self) -> str:
        return self.task.comm if self.task else "kernel"

    def read(self, vaddr: int, size: int, *, pad: bool = False) -> bytes:
        if size > self.session.limits.max_read:
            raise VmiError(
                f"read of {size} bytes is over the session limit of {self.session.limits.max_read}"
            )
        return self.space.read(vaddr, size, pad=pad)

    def translate(self, vaddr: int) -> Translation:
        return self.translator.translate(vaddr)

    def walk(self, vaddr: int) -> Walk:
        return self.translator.walk(vaddr)

    def mappings(
        self, start: int = 0, end: int | None = None, *, max_work: int | None = None
    ) -> Iterator[Mapping]:
        """Coalesced mapped runs; work capped by `max_work` or `Limits.max_mapping_work`."""
        return self.translator.mappings(start, end, max_work=max_work)

    def vmas(self) -> list[Vma]:
        if self.task is None:
            return []
        return self.session.guest.vmas(self.task)

    def maps(self) -> pd.DataFrame:
        """The memory map, like /proc/<pid>/maps, as a DataFrame."""
        import pandas as pd

        rows = [
            (v.start, v.end, v.perms, v.offset, v.device, v.inode, v.path, v.size, v.error)
            for v in self.vmas()
        ]
        return pd.DataFrame(rows, columns=MAPS_COLUMNS)

    def cmdline(self) -> list[str] | None:
        if self.task is None:
            return None
        return self.session.guest.cmdline(self.task, self.space)

    def __repr__(self) -> str:
        return f"<Process pid={self.pid} comm={self.comm!r} dtb={self.dtb:#x}>"


class Session:
    """One attached target: a live guest or an image, with its kernel found."""

    def __init__(
        self,
        source: PhysicalSource,
        profile: ProfileArg = None,
        *,
        limits: Limits | None = None,
        name: str | None = None,
    ) -> None:
        self.source = source
        self.limits = limits or Limits()
        self.name = name or source.description
        try:
            if profile is None:
                profile = find_profile(source, limits=self.limits)
            elif not isinstance(profile, Profile):
                profile = load_profile(Path(profile))
            self.profile = profile
            self.guest = LinuxGuest(source, profile, self.limits)
        except BaseException:
            source.close()
            raise

    # -- attaching ----------------------------------------------------------------
    @classmethod
    def image(
        cls,
        path: str | os.PathLike[str],
        *,
        profile: ProfileArg = None,
        limits: Limits | None = None,
    ) -> Session:
        """A memory image: raw, QEMU ELF core or LiME."""
        return cls(open_image(path), profile, limits=limits, name=str(path))

    @classmethod
    def qemu(
        cls,
        ram_path: str | os.PathLike[str],
        qmp_path: str | os.PathLike[str] | None = None,
        *,
        machine: str = "q35",
        writable: bool = False,
        profile: ProfileArg = None,
        limits: Limits | None = None,
        name: str | None = None,
    ) -> Session:
        """A running QEMU guest through its shared RAM file (and QMP socket)."""
        from vmishell.sources.files import QemuRamSource

        source = QemuRamSource(ram_path, qmp_path, machine=machine, writable=writable)
        return cls(source, profile, limits=limits, name=name or f"qemu:{ram_path}")

    @classmethod
    def lab(
        cls,
        name: str,
        *,
        profile: ProfileArg = None,
        limits: Limits | None = None,
        writable: bool = False,
    ) -> Session:
        """A running lab guest, by its instance name."""
        from vmishell.lab.runner import attach

        guest = attach(name)
        return cls.qemu(
            guest.ram_path,
            guest.qmp_path,
            machine=guest.guest.machine,
            writable=writable,
            profile=profile,
            limits=limits,
            name=f"lab:{name}",
        )

    @classmethod
    def attach(
        cls,
        target: str | os.PathLike[str],
        *,
        profile: ProfileArg = None,
        limits: Limits | None = None,
        writable: bool = False,
    ) -> Session:
        """Attach by one string: `lab:NAME`, `qemu:RAMFILE[,QMPSOCKET]`, `xen:NAME|ID`,
        `kvm:NAME`, `libvmi-file:DUMP` (through LibVMI), or an image path."""
        text = os.fspath(target)
        if text.startswith("lab:"):
            return cls.lab(text[4:], profile=profile, limits=limits, writable=writable)
        if text.startswith("qemu:"):
            ram, _, qmp = text[5:].partition(",")
            return cls.qemu(ram, qmp or None, profile=profile, limits=limits, writable=writable)
        for prefix, mode in (("xen:", "xen"), ("kvm:", "kvm"), ("libvmi-file:", "file")):
            if text.startswith(prefix):
                from vmishell.sources.libvmi import LibvmiSource

                if writable:
                    raise SourceError(f"{text}: LibVMI targets are opened read-only")
                source = LibvmiSource(text[len(prefix) :], mode)
                return cls(source, profile, limits=limits, name=text)
        if Path(text).exists():
            if writable:
                raise SourceError(f"{text}: memory images are opened read-only")
            return cls.image(text, profile=profile, limits=limits)
        try:
            return cls.lab(text, profile=profile, limits=limits, writable=writable)
        except VmiError:
            raise SourceError(
                f"{text!r} is neither a file nor a running lab guest "
                "(use lab:NAME, qemu:RAMFILE[,QMPSOCKET], xen:NAME, kvm:NAME, "
                "libvmi-file:DUMP or an image path)"
            ) from None

    # -- the guest's processes ----------------------------------------------------------
    def tasks(self) -> list[Task]:
        """Every task; on a live guest, as it is now (cached translations are dropped)."""
        if self.source.live:
            self.source.refresh()
        return self.guest.tasks()

    def process_rows(self, *, threads: bool = True, cmdline: bool = True) -> list[ProcessRow]:
        """Every task as a row (the data behind `processes()`, without pandas)."""
        rows = []
        dtbs: dict[int, int | None] = {}
        # Tasks may share an mm (and a crafted guest can make thousands do so):
        # each argument area is read once, and all text together is capped.
        budget = TextBudget(self.limits.max_text)
        args_of: dict[tuple[int, int], str | VmiError] = {}
        for task in self.tasks():
            if not threads and not task.is_thread_group_leader:
                continue
            error = task.error
            dtb = None
            if task.error is None:
                if task.mm in dtbs:
                    dtb = dtbs[task.mm]
                else:
                    try:
                        dtb = self.guest.dtb_of(task)
                    except VmiError as exc:
                        error = str(exc)
                    dtbs[task.mm] = dtb
            args = None
            if cmdline and task.mm and dtb is not None and task.is_thread_group_leader:
                known = args_of.get((task.mm, dtb))
                if known is None:
                    try:
                        argv = self.guest.cmdline(task, self._space(dtb), budget)
                        known = " ".join(argv or ())
                    except VmiError as exc:
                        known = exc
                    args_of[task.mm, dtb] = known
                if isinstance(known, VmiError):
                    error = f"{error}; cmdline: {known}" if error else f"cmdline: {known}"
                else:
                    args = known
            rows.append(
                ProcessRow(
                    pid=task.pid,
                    tgid=task.tgid,
                    ppid=task.ppid,
                    comm=task.comm,
                    state=task.state,
                    uid=task.uid,
                    gid=task.gid,
                    start_time=task.start_time / 1e9,
                    kernel_thread=task.kernel_thread,
                    dtb=dtb,
                    task=task.address,
                    cmdline=args,
                    error=error,
                )
            )
        return rows

    def processes(self, *, threads: bool = False, cmdline: bool = True) -> pd.DataFrame:
        """The processes as a DataFrame: one row per process like `ps` (as `%ps` and
        `vmishell ps`), or one per thread like `ps -eL` with `threads=True`.

        On a live guest each call looks at the guest as it is now.
        """
        import pandas as pd

        rows = self.process_rows(threads=threads, cmdline=cmdline)
        return pd.DataFrame([astuple(r) for r in rows], columns=PROCESS_COLUMNS)

    def _space(self, dtb: int) -> AddressSpace:
        return self.guest.address_space(dtb)

    def process(self, pid: int) -> Process:
        """A process by pid; pid 0 is the kernel's own address space."""
        if pid == 0:
            return Process(self, None, self.guest.location.dtb)
        for task in self.tasks():
            if task.pid == pid:
                if task.error:
                    raise GuestDataError(
                        f"pid {pid}: task at {task.address:#x} is corrupt: {task.error}"
                    )
                return Process(self, task, self.guest.dtb_of(task))
        raise GuestDataError(f"no process with pid {pid} in {self.name}")

    @property
    def kernel(self) -> Process:
        return self.process(0)

    def symbol(self, name: str) -> int:
        """Run-time virtual address of a kernel symbol (KASLR applied)."""
        return self.guest.symbol(name)

    # -- live guests ------------------------------------------------------------------------
    @property
    def live(self) -> bool:
        return self.source.live

    def refresh(self) -> None:
        """Drop cached views of a live guest so the next read sees it as it is now."""
        self.source.refresh()

    @contextmanager
    def paused(self) -> Iterator[Session]:
        """Stop a live guest for a consistent view, resuming it afterwards."""
        pause = getattr(self.source, "paused", None)
        if pause is None:
            if self.source.live:
                raise SourceError(f"{self.source.description} cannot be paused")
            yield self
            return
        with pause():
            yield self

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        loc = self.guest.location
        return (
            f"<Session {self.name}: {self.profile.name}, {loc.arch} {loc.mode.name}, "
            f"KASLR {loc.virtual_shift:#x}>"
        )


__all__ = ["Process", "Session"]
