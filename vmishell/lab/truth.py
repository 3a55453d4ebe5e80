"""Parse the ground truth a lab guest prints on its serial console.

The guest's /init (vmishell/lab/init.sh) reports what its own kernel says:
release, kernel symbol addresses, /proc/iomem, the marker process's maps and
pagemap entries, and every task. Tests compare vmishell's findings from raw
RAM against this. Each fact is one line `@@vmi KIND FIELDS...`; anything else
on the console (kernel messages, a user scenario's output) is ignored. The
closing `@@vmi ready tasks=N maps=M format=F` line carries counts, so a truth
line lost or mangled on the way is detected instead of silently missing, and
the format of the task lines (2: with the start time; logs without `format`
are 1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from vmishell.errors import LabError

PREFIX = "@@vmi "
#: The page size when the guest does not say (logs from before `@@vmi pagesize`).
PAGE_SIZE = 4096
_PFN_MASK = (1 << 55) - 1
_PRESENT = 1 << 63


@dataclass(frozen=True)
class MapLine:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str
    offset: int
    dev: str
    inode: int
    path: str

    @classmethod
    def parse(cls, line: str) -> MapLine:
        parts = line.split(None, 5)
        if len(parts) < 5:
            raise ValueError(f"not a maps line: {line!r}")
        start, _, end = parts[0].partition("-")
        return cls(
            start=int(start, 16),
            end=int(end, 16),
            perms=parts[1],
            offset=int(parts[2], 16),
            dev=parts[3],
            inode=int(parts[4]),
            path=parts[5].strip() if len(parts) > 5 else "",
        )

    def __contains__(self, vaddr: object) -> bool:
        return isinstance(vaddr, int) and self.start <= vaddr < self.end


class PagemapEntry(NamedTuple):
    """A /proc/PID/pagemap entry: the raw 64-bit value and its PFN (bits 0-54)."""

    raw: int
    pfn: int

    @property
    def present(self) -> bool:
        return bool(self.raw & _PRESENT)


@dataclass(frozen=True)
class TruthTask:
    """A task (process or thread) as the guest's /proc lists it."""

    pid: int  # the task id (tid); equals tgid for a thread group leader
    tgid: int
    ppid: int
    uid: int
    comm: str
    kernel_thread: bool
    state: str = "?"
    #: /proc/PID/stat field 22: start time in clock ticks (USER_HZ) since boot.
    start_ticks: int | None = None


@dataclass(frozen=True)
class IomemRange:
    """One line of /proc/iomem: [start, end] inclusive, nesting depth from the indent."""

    start: int
    end: int
    name: str
    depth: int


@dataclass(frozen=True)
class GroundTruth:
    """Everything the guest said about itself, parsed."""

    release: str
    machine: str
    cmdline: str
    mem_total_kb: int | None
    symbols: dict[str, int]
    iomem: tuple[IomemRange, ...]
    processes: tuple[TruthTask, ...]
    marker_pid: int
    marker_va: int
    counter_va: int
    maps: tuple[MapLine, ...]
    pagemap: dict[int, PagemapEntry]
    pagemap_labels: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    #: Physical and virtual address widths from /proc/cpuinfo ("address sizes").
    phys_bits: int | None = None
    virt_bits: int | None = None
    #: /sys/devices/system/cpu/vulnerabilities/meltdown, e.g. "Mitigation: PTI".
    meltdown: str | None = None
    #: The kernel's PAGE_SIZE (smaps' KernelPageSize): the unit of pagemap indices and PFNs.
    page_size: int = PAGE_SIZE

    # -- convenience -------------------------------------------------------------
    def _iomem(self, name: str) -> tuple[int, int] | None:
        for r in self.iomem:
            if r.name == name:
                return (r.start, r.end)
        return None

    @property
    def kernel_code(self) -> tuple[int, int] | None:
        """Physical [start, end] (inclusive) of the kernel's text, from /proc/iomem."""
        return self._iomem("Kernel code")

    @property
    def kernel_data(self) -> tuple[int, int] | None:
        return self._iomem("Kernel data")

    @property
    def system_ram(self) -> tuple[tuple[int, int], ...]:
        """Top-level "System RAM" ranges, [start, end] inclusive."""
        return tuple((r.start, r.end) for r in self.iomem if r.name == "System RAM")

    def tasks_named(self, comm: str) -> list[TruthTask]:
        return [t for t in self.processes if t.comm == comm]

    def threads_of(self, tgid: int) -> list[TruthTask]:
        return [t for t in self.processes if t.tgid == tgid]

    def task(self, pid: int) -> TruthTask:
        for t in self.processes:
            if t.pid == pid:
                return t
        raise KeyError(pid)

    @property
    def marker(self) -> TruthTask:
        return self.task(self.marker_pid)

    def paddr_of(self, vaddr: int) -> int | None:
        """Physical address of a pagemap-reported `vaddr` of the marker process."""
        entry = self.pagemap.get(vaddr)
        if entry is None or not entry.present:
            return None
        return entry.pfn * self.page_size + vaddr % self.page_size

    @property
    def marker_paddr(self) -> int | None:
        return self.paddr_of(self.marker_va)

    @property
    def counter_paddr(self) -> int | None:
        return self.paddr_of(self.counter_va)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (addresses as ints; pagemap keys as hex strings)."""
        out = asdict(self)
        out["pagemap"] = {
            f"{va:#x}": {"raw": f"{e.raw:#018x}", "pfn": e.pfn, "present": e.present}
            for va, e in self.pagemap.items()
        }
        out["kernel_code"] = self.kernel_code
        out["kernel_data"] = self.kernel_data
        out["marker_paddr"] = self.marker_paddr
        out["counter_paddr"] = self.counter_paddr
        return out


def _kv(fields: list[str]) -> dict[str, str]:
    return dict(f.split("=", 1) for f in fields if "=" in f)


def truth_lines(text: str) -> list[tuple[str, str]]:
    """(kind, rest) of each `@@vmi` line, up to and including the first `ready`."""
    out = []
    for raw in text.splitlines():
        line = raw.replace("\r", "")
        at = line.rfind(PREFIX)
        if at < 0:
            continue
        kind, _, rest = line[at + len(PREFIX) :].partition(" ")
        out.append((kind, rest))
        if kind == "ready":
            break
    return out


def is_ready(text: str) -> bool:
    """Whether the console text contains the final `@@vmi ready` line."""
    return any(kind == "ready" for kind, _ in truth_lines(text))


def parse_truth(text: str, source: str = "serial log") -> GroundTruth:
    """Parse console text into GroundTruth; LabError if incomplete or inconsistent."""
    lines = truth_lines(text)
    if not lines or lines[-1][0] != "ready":
        raise LabError(f"{source}: no `@@vmi ready` line: the guest has not finished booting")
    release = machine = cmdline = ""
    mem_total = None
    symbols: dict[str, int] = {}
    iomem: list[IomemRange] = []
    tasks: list[TruthTask] = []
    maps: list[MapLine] = []
    pagemap: dict[int, PagemapEntry] = {}
    labels: dict[str, int] = {}
    pids: dict[str, int] = {}
    marker: dict[str, str] = {}
    cpu: dict[str, str] = {}
    meltdown = None
    page_size = PAGE_SIZE
    ready = _kv(lines[-1][1].split())
    with_start = ready.get("format", "1") != "1"
    try:
        for kind, rest in lines:
            fields = rest.split()
            if kind == "uname":
                release, machine = fields[0], fields[1] if len(fields) > 1 else ""
            elif kind == "cmdline":
                cmdline = rest
            elif kind == "meminfo" and fields[0] == "MemTotal":
                mem_total = int(fields[1])
            elif kind == "symbol":
                symbols.setdefault(fields[0], int(fields[1], 16))
            elif kind == "iomem":
                iomem.append(_parse_iomem(rest))
            elif kind == "marker":
                marker = _kv(fields)
            elif kind == "pids":
                pids = {k: int(v) for k, v in _kv(fields).items() if v}
            elif kind == "map":
                maps.append(MapLine.parse(rest))
            elif kind == "pagemap" and len(fields) >= 4:
                va, raw = int(fields[1], 16), int(fields[2], 16)
                pagemap[va] = PagemapEntry(raw, raw & _PFN_MASK)
                labels[fields[0]] = va
            elif kind == "task":
                tasks.append(_parse_task(rest, with_start))
            elif kind == "cpu":
                cpu = _kv(fields)
            elif kind == "meltdown":
                meltdown = rest.strip()
            elif kind == "pagesize":
                page_size = int(fields[0])
                if page_size not in (4096, 16384, 65536):
                    raise ValueError(f"page size {page_size} is none of 4, 16 or 64 KiB")
    except (ValueError, IndexError) as exc:
        raise LabError(f"{source}: malformed ground truth line: {exc}") from exc

    if not marker:
        raise LabError(f"{source}: no `@@vmi marker` line")
    for what, found in (("tasks", len(tasks)), ("maps", len(maps))):
        if what in ready and int(ready[what]) != found:
            raise LabError(
                f"{source}: the guest printed {ready[what]} {what} lines but {found} "
                "were readable (a line was garbled on the console?)"
            )
    return GroundTruth(
        release=release,
        machine=machine,
        cmdline=cmdline,
        mem_total_kb=mem_total,
        symbols=symbols,
        iomem=tuple(iomem),
        processes=tuple(tasks),
        marker_pid=int(marker["pid"]),
        marker_va=int(marker["marker_va"], 0),
        counter_va=int(marker["counter_va"], 0),
        maps=tuple(maps),
        pagemap=pagemap,
        pagemap_labels=labels,
        pids=pids,
        phys_bits=int(cpu["phys_bits"]) if cpu.get("phys_bits") else None,
        virt_bits=int(cpu["virt_bits"]) if cpu.get("virt_bits") else None,
        meltdown=meltdown,
        page_size=page_size,
    )


def _parse_iomem(rest: str) -> IomemRange:
    depth = (len(rest) - len(rest.lstrip(" "))) // 2
    span, _, name = rest.strip().partition(" : ")
    start, _, end = span.partition("-")
    return IomemRange(int(start, 16), int(end, 16), name.strip(), depth)


def _parse_task(rest: str, with_start: bool) -> TruthTask:
    # tid tgid ppid uid kthread state [start] comm (comm may contain spaces: it is last)
    width = 8 if with_start else 7
    parts = rest.split(" ", width - 1)
    if len(parts) < width:
        raise ValueError(f"short task line: {rest!r}")
    return TruthTask(
        pid=int(parts[0]),
        tgid=int(parts[1]),
        ppid=int(parts[2]),
        uid=int(parts[3]),
        kernel_thread=parts[4] == "1",
        state=parts[5],
        start_ticks=int(parts[6]) if with_start else None,
        comm=parts[-1],
    )


def read_truth(serial_log: Path) -> GroundTruth:
    """Parse the ground truth from a guest's serial log file."""
    try:
        text = serial_log.read_bytes().decode("utf-8", "replace")
    except OSError as exc:
        raise LabError(f"cannot read serial log {serial_log}: {exc}") from exc
    return parse_truth(text, str(serial_log))
