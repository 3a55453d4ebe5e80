"""The plain Python API every front end uses: attach, list processes, read memory.

A Session joins a memory source, a kernel profile and the Linux layer. It
returns data (DataFrames, dataclasses, bytes) and never prints, so the same
calls serve the IPython magics, widgets, the command line and scripts.

Live truth: on a live guest every top-level call (a `Process`'s read,
translate, walk, mappings, maps; the session's processes and process) sees
the guest's page tables as they are when the call starts, as a CPU does
after a TLB flush. Caches live within one call, or across calls inside
`paused()` (the guest is stopped) or `cached()` (the caller accepts stale
answers for speed); batch calls (`read_many`, `translate_many`) are one call.

Lifecycle: each top-level call first asks the source whether the target
still exists (cheaply) and whether the guest was reset. An ended target
raises TargetEnded on every call, for the session and every Process taken
from it. A reboot makes the session find the kernel again (new KASLR, new
task list) and say so once (a RuntimeWarning and `events`); a Process
taken before the reboot raises StaleObjectError instead of reading another
process's memory.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmishell import schemes
from vmishell.arch import AddressSpace, Mapping, Translation, Walk
from vmishell.errors import (
    GuestDataError,
    GuestRebooting,
    NoSuchInstance,
    SessionClosed,
    SourceError,
    StaleObjectError,
    VmiError,
)
from vmishell.limits import Limits, TextBudget
from vmishell.os.linux.guest import LinuxGuest
from vmishell.os.linux.kernel import (
    KernelHints,
    KernelLocation,
    banner_candidates,
    locate_kernel,
)
from vmishell.os.linux.liveness import KernelPulse, runs_on_cpu, ticks
from vmishell.os.linux.locate import is_arm64
from vmishell.os.linux.tasks import Task
from vmishell.os.linux.vmas import Vma
from vmishell.os.linux.vmcoreinfo import locate_by_vmcoreinfo, vmcoreinfo_of
from vmishell.sources import open_image
from vmishell.sources.base import PhysicalSource, Registers
from vmishell.symbols.carve_cache import find_or_carve, is_carved
from vmishell.symbols.placement import kernel_phys
from vmishell.symbols.profile import Profile, load_profile
from vmishell.symbols.verify import verify_profile

if TYPE_CHECKING:
    import pandas as pd

    from vmishell.search import PhysicalView

ProfileArg = Profile | str | os.PathLike[str] | None
_TARGET_KINDS = (
    "lab:NAME, qmp:SOCKET, libvirt:NAME[@URI], qemu:RAMFILE[,QMPSOCKET], xen:NAME, "
    "libvmi-xen:NAME, kvm:NAME, "
    "libvmi-file:DUMP or an image path"
)

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
        #: The boot of the guest this process belongs to (see `Session.boot`).
        self.boot = session.boot

    @property
    def comm(self) -> str:
        return self.task.comm if self.task else "kernel"

    def _begin(self) -> None:
        """Start a top-level call: the target must live and this process's boot be current."""
        self.session._begin()
        if self.boot != self.session.boot:
            raise StaleObjectError(
                f"pid {self.pid} ({self.comm}) was taken before {self.session.name} "
                f"rebooted ({self.session.events[-1] if self.session.events else 'reboot'}): "
                f"take it again with process({self.pid})"
            )

    def _check_size(self, size: int) -> None:
        if size > self.session.limits.max_read:
            raise VmiError(
                f"read of {size} bytes is over the session limit of {self.session.limits.max_read}"
            )

    def read(self, vaddr: int, size: int, *, pad: bool = False) -> bytes:
        self._check_size(size)
        self._begin()
        return self.space.read(vaddr, size, pad=pad)

    def read_many(self, requests: Iterable[tuple[int, int]], *, pad: bool = False) -> list[bytes]:
        """Several reads as one call: one look at the guest's page tables serves them all."""
        wanted = list(requests)
        self._check_size(sum(size for _, size in wanted))
        self._begin()
        read = self.space.read
        return [read(vaddr, size, pad=pad) for vaddr, size in wanted]

    def translate(self, vaddr: int) -> Translation:
        self._begin()
        return self.translator.translate(vaddr)

    def translate_many(self, vaddrs: Iterable[int]) -> list[Translation]:
        """Several translations as one call (one walk per page; raises the first PageFault)."""
        self._begin()
        translate = self.translator.translate
        return [translate(v) for v in vaddrs]

    def walk(self, vaddr: int) -> Walk:
        self._begin()
        return self.translator.walk(vaddr)

    def mappings(
        self, start: int = 0, end: int | None = None, *, max_work: int | None = None
    ) -> Iterator[Mapping]:
        """Coalesced mapped runs; work capped by `max_work` or `Limits.max_mapping_work`."""
        self._begin()
        return self.translator.mappings(start, end, max_work=max_work)

    def runs(
        self, start: int = 0, end: int | None = None, *, max_work: int | None = None
    ) -> list[tuple[int, int, int, bool, bool, bool]]:
        """`mappings()` as plain (vaddr, paddr, size, writable, user, nx) tuples, built
        with numpy a batch of page tables at a time: for whole address spaces."""
        self._begin()
        return self.translator.runs(start, end, max_work=max_work)

    def vmas(self) -> list[Vma]:
        if self.task is None:
            self._begin()
            return []
        self._begin()
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
        self._begin()
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
        #: Boots of the guest this session has followed (0 at attach, +1 per reboot).
        self.boot = 0
        #: What happened to the target while attached, one line each, oldest first.
        self.events: list[str] = []
        self._closed = False
        self._pinned = 0
        self._resets = source.resets
        self._reboot_pending: str | None = None
        self._lifecycle_lock = threading.RLock()  # a watch thread and the caller may both notice
        #: How the kernel was found: "VMCOREINFO" (the kernel's own note, checked) or "banner".
        self.found_by = "banner"
        try:
            if profile is None:
                profile = find_or_carve(source, self.limits)
            elif not isinstance(profile, Profile):
                profile = load_profile(Path(profile))
            self.profile = profile
            self.guest = LinuxGuest(source, profile, self.limits, self._locate())
            if is_carved(profile):  # guest data made it: check it against the kernel first
                verify_profile(self.guest)
            #: One line: which profile, and where it came from.
            self.profile_note = f"profile: {profile.provenance}"
        except BaseException:
            source.close()
            raise
        self._pulse = self._new_pulse()

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
        pid: int | None = None,
        events_path: str | os.PathLike[str] | None = None,
    ) -> Session:
        """A running QEMU guest through its shared RAM file (and QMP socket).

        `pid` (QEMU's; learnt from the QMP socket when not given) lets the
        session notice that the VM ended; `events_path`, a QMP socket reserved
        for events, lets it notice a guest reset at once.
        """
        from vmishell.sources.files import QemuRamSource

        source = QemuRamSource(
            ram_path,
            qmp_path,
            machine=machine,
            writable=writable,
            pid=pid,
            events_path=events_path,
        )
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
        """A running lab guest, by its instance name (`lab:NAME`)."""
        return cls.attach(f"lab:{name}", profile=profile, limits=limits, writable=writable)

    @classmethod
    def attach(
        cls,
        target: str | os.PathLike[str],
        *,
        profile: ProfileArg = None,
        limits: Limits | None = None,
        writable: bool = False,
    ) -> Session:
        """Attach by one string: `lab:NAME`, `qmp:SOCKET` (any running QEMU),
        `libvirt:NAME[@URI]`, `qemu:RAMFILE[,QMPSOCKET]`, `xen:NAME|ID` (from dom0,
        through Xen's own libraries), `libvmi-xen:NAME|ID`, `kvm:NAME`,
        `libvmi-file:DUMP` (through LibVMI), an image path, or a bare lab instance
        name. Schemes of other packages come from `vmishell.schemes`."""
        text = os.fspath(target)
        if text.startswith("qmp:"):
            from vmishell.sources.qemuproc import open_qmp

            source = open_qmp(text[4:], writable=writable)
            return cls(source, profile, limits=limits, name=text)
        if text.startswith("libvirt:"):
            from vmishell.sources.libvirt import open_libvirt

            return cls(open_libvirt(text[8:], writable=writable), profile, limits=limits, name=text)
        if text.startswith("qemu:"):
            ram, _, qmp = text[5:].partition(",")
            return cls.qemu(ram, qmp or None, profile=profile, limits=limits, writable=writable)
        if text.startswith("xen:"):
            from vmishell.sources.xen import XenDomainSource

            source = XenDomainSource(text[4:], writable=writable)
            return cls(source, profile, limits=limits, name=text)
        for prefix, mode in (("libvmi-xen:", "xen"), ("kvm:", "kvm"), ("libvmi-file:", "file")):
            if text.startswith(prefix):
                from vmishell.sources.libvmi import LibvmiSource

                if writable:
                    raise SourceError(f"{text}: LibVMI targets are opened read-only")
                source = LibvmiSource(text[len(prefix) :], mode)
                return cls(source, profile, limits=limits, name=text)
        options = {"profile": profile, "limits": limits, "writable": writable}
        scheme, colon, rest = text.partition(":")
        if colon and scheme.isidentifier():
            open_scheme = schemes.opener(scheme)
            if open_scheme is not None:
                return open_scheme(rest, **options)
        if Path(text).exists():
            if writable:
                raise SourceError(f"{text}: memory images are opened read-only")
            return cls.image(text, profile=profile, limits=limits)
        if colon and scheme.isidentifier():
            builtin = ["qemu", "qmp", "libvirt", "xen", "libvmi-xen", "kvm", "libvmi-file"]
            kinds = ", ".join([*builtin, *schemes.known()])
            raise SourceError(f"{text!r}: no target kind {scheme!r} and no such file ({kinds})")
        open_lab = schemes.opener("lab")
        if open_lab is not None:
            try:
                return open_lab(text, **options)
            except NoSuchInstance as exc:
                raise SourceError(
                    f"{text!r} is neither a file nor a lab instance: {exc} "
                    f"(targets: {_TARGET_KINDS})"
                ) from exc
        raise SourceError(f"{text!r} is not a file, nor a target vmishell knows ({_TARGET_KINDS})")

    # -- live truth and lifecycle -------------------------------------------------------
    def _locate(self, *, after_reset: bool = False) -> KernelLocation:
        """Find the running kernel: the one the vCPU's page tables map, when registers tell.

        RAM can hold the remains of an earlier boot's kernel next to the
        running one, both checking out. With registers (QMP, an ELF core's
        notes) the kernel that CR3 maps wins; after a reset a candidate must
        show a sign of life (CR3, or its ticks). Otherwise, as before any
        reboot, the first placement that checks out is taken.
        """
        source = self.source
        try:
            regs: Registers | None = source.registers()
        except VmiError:
            regs = None
        if is_arm64(self.profile):
            return self._locate_arm64(regs, after_reset=after_reset)
        accept = runs_on_cpu(source, self.profile, regs) if regs is not None else None
        found = self._locate_by_vmcoreinfo(regs, accept)
        if found is not None:
            return found
        self.found_by = "banner"
        if accept is None and after_reset:
            accept = ticks(source, self.profile)
        try:
            return locate_kernel(source, self.profile, self.limits, accept=accept, regs=regs)
        except GuestDataError:
            if after_reset or accept is None:
                raise
        # No candidate is mapped by this CR3 (a vCPU caught in firmware, say): take the first.
        return locate_kernel(source, self.profile, self.limits, regs=regs)

    def _locate_arm64(self, regs: Registers | None, *, after_reset: bool) -> KernelLocation:
        """An arm64 kernel: no register names its tables (QEMU 7.2 reports no TTBR), so
        VMCOREINFO and the kernel image's own mapping decide (see `os.linux.arm64`);
        after a reset the candidate must tick."""

        def noted(info: object) -> None:
            self.found_by = "VMCOREINFO"

        self.found_by = "banner"
        accept = ticks(self.source, self.profile) if after_reset else None
        from vmishell.os.linux.arm64 import locate_arm64

        return locate_arm64(
            self.source,
            self.profile,
            self.limits,
            accept=accept,
            regs=regs,
            on_vmcoreinfo=noted,
        )

    def _locate_by_vmcoreinfo(
        self, regs: Registers | None, accept: Callable[[KernelLocation], bool] | None
    ) -> KernelLocation | None:
        """The kernel where its VMCOREINFO note says, if the source has one and it checks out.

        A note that disagrees with memory is reported in `events` and the banner
        search decides.
        """
        info = vmcoreinfo_of(self.source)
        if info is None:
            return None
        try:
            location = locate_by_vmcoreinfo(self.source, self.profile, info, regs)
        except VmiError as exc:
            self.events.append(f"VMCOREINFO not used: {exc}")
            return None
        if location is None:
            return None
        if accept is not None and not accept(location):
            self.events.append("VMCOREINFO not used: its kernel is not the one the vCPU runs")
            return None
        self.found_by = "VMCOREINFO"
        return location

    def _new_pulse(self) -> KernelPulse | None:
        """Watch the kernel's ticks when the source cannot report resets itself."""
        if not self.source.live or self.source.resets is not None:
            return None
        return KernelPulse(self.source, self.guest.location, self.profile)

    def _begin(self) -> None:
        """Start a top-level call: check the target's life, then drop stale views.

        Cheap (a few attribute reads and one fstat on a RAM file) because every
        read of a live guest goes through here.
        """
        if self._closed:
            raise SessionClosed(f"session {self.name} is closed")
        source = self.source
        source.check()
        if not source.live:
            return
        if not self._pinned:
            source.refresh()
        resets = source.resets
        if resets is not None:
            if resets != self._resets or self._reboot_pending is not None:
                with self._lifecycle_lock:
                    if resets != self._resets:
                        self._reboot_pending = self._reboot_pending or "QEMU reported a reset"
                        self._resets = resets
                    if self._reboot_pending is not None:
                        self._follow_reboot()
        elif self._pulse is not None:
            sign = self._pulse.check()
            if sign is not None or self._reboot_pending is not None:
                with self._lifecycle_lock:
                    if sign == "still":
                        self._verify_kernel()
                    elif sign is not None:
                        self._reboot_pending = sign
                    if self._reboot_pending is not None:
                        self._follow_reboot()

    def _verify_kernel(self) -> None:
        """The kernel's ticks stopped: paused, idle, or rebooted elsewhere? Look again.

        Only a second kernel in RAM is worth a closer look (which of them ticks):
        a guest paused by another tool, or idle, still holds just the one.
        """
        if self.source.state == "paused":
            return
        old = self.guest.location
        try:
            hints = KernelHints.from_profile(self.profile)
            shifts = banner_candidates(self.source, hints, self.limits)
        except VmiError:
            return
        # Compared by where the banner lies: what a shift counts from is the locator's.
        banners = [kernel_phys(hints.arch, hints.linux_banner, shift) for shift in shifts]
        if banners == [old.banner_paddr]:
            return
        try:
            location = self._locate(after_reset=True)
        except VmiError:
            return  # no live kernel visible now (paused by another tool, or booting): ask later
        if (location.physical_shift, location.virtual_shift) != (
            old.physical_shift,
            old.virtual_shift,
        ):
            self._reboot_pending = "the located kernel stopped ticking and another one runs"

    def _follow_reboot(self) -> None:
        """Locate the new boot's kernel and move the session onto it (or say why not yet)."""
        why = self._reboot_pending
        stamp = time.strftime("%H:%M:%S")
        try:
            location = self._locate(after_reset=True)
            guest = LinuxGuest(self.source, self.profile, self.limits, location)
        except VmiError as exc:
            raise GuestRebooting(
                f"{self.name} rebooted ({why}) and its new kernel is not found yet: {exc}"
            ) from exc
        old = self.guest.location
        self.guest = guest
        self.boot += 1
        self._reboot_pending = None
        self._pulse = self._new_pulse()
        message = (
            f"guest rebooted at {stamp} ({why}); kernel located again "
            f"(KASLR {old.virtual_shift:#x} -> {location.virtual_shift:#x})"
        )
        self.events.append(message)
        warnings.warn(f"{self.name}: {message}", RuntimeWarning, stacklevel=4)

    @property
    def state(self) -> str:
        """What the session last saw of its target.

        "running", "paused", "rebooting" (reset, new kernel not found yet),
        "rebooted" (running a boot after the one attached to), "ended",
        "closed", or "image" (not live).
        """
        if self._closed:
            return "closed"
        state = self.source.state
        if state == "running":
            if self._reboot_pending is not None:
                return "rebooting"
            if self.boot:
                return "rebooted"
        return state

    def poll(self) -> str:
        """Look at the target now (its life only, cheaply) and return `state`."""
        with contextlib.suppress(VmiError):  # the state says what happened
            self._begin()
        return self.state

    # -- the guest's processes ----------------------------------------------------------
    def tasks(self) -> list[Task]:
        """Every task; on a live guest, as it is now (cached translations are dropped)."""
        self._begin()
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
        # Column lists, not a tuple per row: the frame is built column-wise anyway.
        return pd.DataFrame(
            {name: [getattr(r, name) for r in rows] for name in PROCESS_COLUMNS},
            columns=PROCESS_COLUMNS,
        )

    def _space(self, dtb: int) -> AddressSpace:
        return self.guest.address_space(dtb)

    def process(self, pid: int) -> Process:
        """A process by pid; pid 0 is the kernel's own address space."""
        if pid == 0:
            self._begin()
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
        self._begin()
        return self.guest.symbol(name)

    # -- hunting (vmishell.search, vmishell.monitor) ---------------------------------------
    def search(
        self,
        pattern: bytes | str | re.Pattern[bytes],
        *,
        pids: Iterable[int] | None = None,
        kernel: bool = False,
        max_hits: int | None = None,
        **options: Any,
    ) -> pd.DataFrame:
        """Hits of a pattern in processes' memory, one row per hit and mapping: see
        `vmishell.search.search` (kind, encoding, context, overlap, progress)."""
        from vmishell.search import search

        return search(self, pattern, pids=pids, kernel=kernel, max_hits=max_hits, **options)

    @property
    def physical(self) -> PhysicalView:
        """All of guest RAM: `s.physical.search(...)` finds mapped and unmapped hits."""
        from vmishell.search import PhysicalView

        return PhysicalView(self)

    def watch(self, *targets: str | int, **options: Any) -> Any:
        """Watch addresses, symbols or struct fields: see `vmishell.monitor.watch`."""
        from vmishell.monitor.watch import watch

        return watch(self, *targets, **options)

    def snapshot(self, **options: Any) -> Any:
        """Processes, threads, credentials and maps now: see `vmishell.monitor.snapshot`."""
        from vmishell.monitor.snapshot import take

        return take(self, **options)

    def diff(self, before: Any, after: Any = None) -> pd.DataFrame:
        """What appeared, disappeared or changed since a snapshot or saved file (or between two)."""
        from vmishell.monitor.diff import as_snapshot, diff

        before = as_snapshot(before)
        return diff(
            before, after if after is not None else self.snapshot(hashes=bool(before.hashes))
        )

    # -- live guests ------------------------------------------------------------------------
    @property
    def live(self) -> bool:
        return self.source.live

    def refresh(self) -> None:
        """Drop cached views of a live guest so the next read sees it as it is now."""
        self.source.refresh()

    @contextmanager
    def paused(self) -> Iterator[Session]:
        """Stop a live guest for a consistent view, resuming it afterwards.

        While paused, caches are kept across calls: the guest cannot change.
        """
        self._begin()
        pause = getattr(self.source, "paused", None)
        if pause is None:
            if self.source.live:
                raise SourceError(f"{self.source.description} cannot be paused")
            yield self
            return
        with pause(), self._pin():
            yield self

    @contextmanager
    def cached(self) -> Iterator[Session]:
        """Keep translations and tables across calls although a live guest runs.

        An explicit trade of truth for speed: inside the block a page the
        guest remaps may still be read at its old frame. Prefer `paused()`,
        or batch calls (`read_many`, `translate_many`), which are fast and true.
        """
        self._begin()
        with self._pin():
            yield self

    @contextmanager
    def _pin(self) -> Iterator[None]:
        self._pinned += 1
        try:
            yield
        finally:
            self._pinned -= 1
            self.source.refresh()

    def close(self) -> None:
        """Release the target: nothing of it stays mapped, later calls raise SessionClosed."""
        self._closed = True
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
