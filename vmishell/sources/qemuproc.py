"""Any running QEMU, given only its QMP socket: guest RAM read from QEMU's own process.

An unmodified QEMU keeps guest RAM in anonymous memory of its process. Its
monitor tells where: `query-memdev` names the RAM backends, HMP `info mtree -f`
places their pieces in the guest-physical address space (RAM above 4 GiB and
several backends included), and `gpa2hva` gives the host address of each
piece. The bytes are then read through /proc/PID/mem, whose preads fail with
an error, never a signal, if QEMU unmaps or exits (PID from the socket's peer
credentials). That needs ptrace rights over QEMU (root, or CAP_SYS_PTRACE).

When the RAM backend is a shared `memory-backend-file`, `open_qmp` returns the
memory-mapped `QemuRamSource` instead: the same guest, the fast path.

The QMP socket is never held between calls: QEMU serves one client per
monitor, and the analyst's other tools (virsh, scripts) need it too.
"""

from __future__ import annotations

import bisect
import errno
import json
import os
import re
import socket
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from vmishell.errors import PhysicalReadError, QmpError, SourceError
from vmishell.sources.base import PhysicalSource, PhysRange, Registers
from vmishell.sources.layout import qemu_ram_layout
from vmishell.sources.vmwatch import ProcessWatch, QmpEvents, Throttle, peer_pid

if TYPE_CHECKING:
    from vmishell.sources.files import QemuRamSource

#: Pieces of RAM a QEMU may report (a DIMM per slot, NUMA nodes): far more than any VM has.
MAX_RAM_PIECES = 1024
#: Reads up to this size are served from a page read whole (kept for one generation).
SMALL_READ = 512
PAGE_SIZE = 4096
PAGE_MASK = PAGE_SIZE - 1
#: Pages kept per generation (16 MiB) before the cache starts over.
CACHED_PAGES = 4096

_FLAT_LINE = re.compile(
    r"^\s+(?P<start>[0-9a-f]+)-(?P<end>[0-9a-f]+) \(prio -?\d+, (?P<type>[^)]+)\): "
    r"(?P<name>\S+)(?: @(?P<offset>[0-9a-f]+))?"
)
_HVA = re.compile(r"Host virtual address for (0x[0-9a-f]+) \((\S+)\) is (0x[0-9a-f]+)")


class Monitor(Protocol):
    """What attaching needs from a QEMU monitor: QMP commands and HMP text.

    `QmpClient` answers it over a socket; libvirt answers it through
    `qemuMonitorCommand`, for domains whose monitor libvirt holds.
    """

    def command(self, name: str, arguments: dict[str, Any] | None = None) -> Any: ...

    def hmp(self, cmdline: str) -> str: ...


@dataclass(frozen=True, slots=True)
class RamPiece:
    """Guest-physical [start, end) backed by RAM block `block` at `offset` in that block."""

    start: int
    end: int
    block: str
    offset: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Memdev:
    """A RAM backend as `query-memdev` and QOM describe it."""

    id: str
    size: int
    share: bool
    kind: str  # "memory-backend-ram", "memory-backend-file", "memory-backend-memfd", ...
    mem_path: str | None = None


def parse_flat_ram(text: str, blocks: set[str] | None) -> list[RamPiece]:
    """RAM pieces of the system address space from HMP `info mtree -f`.

    Only the flat view of the "memory" address space counts. A piece is RAM
    when its region is one of `blocks` (the memdev ids); with no memdevs
    known (old QEMU), any region of type "ram". ROM-typed pieces of a RAM
    block are RAM too (the BIOS shadow areas a chipset write-protects).
    Adjacent pieces that continue one block are joined.
    """
    pieces: list[RamPiece] = []
    in_memory = False
    for line in text.splitlines():
        if line.startswith("FlatView"):
            in_memory = False
            continue
        if line.startswith(" AS "):
            in_memory = in_memory or line.strip() == 'AS "memory", root: system'
            continue
        if not in_memory:
            continue
        m = _FLAT_LINE.match(line)
        if m is None:
            continue
        kind, name = m["type"], m["name"]
        if blocks is not None and name not in blocks:
            continue
        if blocks is None and kind != "ram":
            continue
        start, last = int(m["start"], 16), int(m["end"], 16)
        offset = int(m["offset"] or "0", 16)
        piece = RamPiece(start, last + 1, name, offset)
        if pieces:
            prev = pieces[-1]
            if (prev.end, prev.block, prev.offset + prev.size) == (start, name, offset):
                pieces[-1] = RamPiece(prev.start, piece.end, name, prev.offset)
                continue
        pieces.append(piece)
        if len(pieces) > MAX_RAM_PIECES:
            raise QmpError(f"QEMU reports over {MAX_RAM_PIECES} pieces of RAM")
    return pieces


def parse_gpa2hva(text: str) -> int:
    """The host address from HMP `gpa2hva` output."""
    m = _HVA.search(text)
    if m is None:
        raise QmpError(f"gpa2hva gave no host address: {text.strip()[:200]!r}")
    return int(m[3], 16)


def memdevs(monitor: Monitor) -> list[Memdev]:
    """The RAM backends of a QEMU, with their QOM type and (for files) their path."""
    listed = monitor.command("query-memdev")
    types: dict[str, str] = {}
    try:
        for child in monitor.command("qom-list", {"path": "/objects"}):
            kind = str(child.get("type", ""))
            if kind.startswith("child<") and kind.endswith(">"):
                types[str(child.get("name"))] = kind[6:-1]
    except QmpError:
        pass  # types only decide the fast path
    out = []
    for dev in listed[:MAX_RAM_PIECES]:
        ident = str(dev.get("id", ""))
        kind = types.get(ident, "memory-backend")
        mem_path = None
        if kind == "memory-backend-file":
            try:
                got = monitor.command(
                    "qom-get", {"path": f"/objects/{ident}", "property": "mem-path"}
                )
                mem_path = str(got)
            except QmpError:
                mem_path = None
        out.append(Memdev(ident, int(dev.get("size", 0)), bool(dev.get("share")), kind, mem_path))
    return out


@dataclass(frozen=True)
class QemuRamLayout:
    """Where a QEMU keeps guest RAM: physical pieces, their host addresses, the backends."""

    pieces: tuple[RamPiece, ...]
    hvas: tuple[int, ...]
    memdevs: tuple[Memdev, ...]


def learn_layout(monitor: Monitor, where: str) -> QemuRamLayout:
    """Ask QEMU's monitor where guest RAM lies, physically and in QEMU's address space."""
    devs = memdevs(monitor)
    blocks = {d.id for d in devs} or None
    pieces = parse_flat_ram(monitor.hmp("info mtree -f"), blocks)
    if not pieces:
        raise SourceError(f"{where}: QEMU's memory tree shows no guest RAM")
    hvas = tuple(parse_gpa2hva(monitor.hmp(f"gpa2hva {p.start:#x}")) for p in pieces)
    return QemuRamLayout(tuple(pieces), hvas, tuple(devs))


def shared_file_layout(
    layout: QemuRamLayout,
) -> tuple[Memdev, str] | None:
    """(memdev, machine) when all RAM is one shared file laid out as QEMU's q35/pc/virt do.

    Then `QemuRamSource` maps the file: the same bytes without a system call per read.
    """
    blocks = {p.block for p in layout.pieces}
    devs = [d for d in layout.memdevs if d.id in blocks]
    if len(devs) != 1 or len(blocks) != 1:
        return None
    dev = devs[0]
    if dev.kind != "memory-backend-file" or not dev.share or not dev.mem_path:
        return None
    try:
        st = os.stat(dev.mem_path)
    except OSError:
        return None
    if (
        not stat.S_ISREG(st.st_mode)
        or st.st_size < dev.size
        or not os.access(dev.mem_path, os.R_OK)
    ):
        return None
    for machine in ("q35", "pc", "virt"):
        triples = qemu_ram_layout(st.st_size, machine)
        if all(_inside(p, triples) for p in layout.pieces):
            return dev, machine
    return None


def _inside(piece: RamPiece, triples: list[tuple[int, int, int]]) -> bool:
    return any(
        phys <= piece.start
        and piece.end <= phys + size
        and piece.offset == offset + piece.start - phys
        for phys, offset, size in triples
    )


def no_ptrace_rights(pid: int) -> SourceError:
    """The one-line error for a QEMU whose memory this process may not read."""
    return SourceError(
        f"cannot read the memory of QEMU (pid {pid}): needs ptrace rights over it "
        "(run as root, or grant CAP_SYS_PTRACE)"
    )


class QemuProcessSource(PhysicalSource):
    """A running QEMU's guest RAM, read from the QEMU process through /proc/PID/mem.

    `monitor` opens a short-lived monitor connection per use (registers,
    pausing): a QMP socket path, or a callable returning a context manager
    (libvirt passes its own). Lifecycle as for the RAM-file source: QEMU's pid
    is watched, and an `events_path` (a QMP monitor reserved for listening)
    counts guest resets.
    """

    live = True

    def __init__(
        self,
        pid: int,
        layout: QemuRamLayout,
        *,
        qmp_path: str | os.PathLike[str] | None = None,
        open_monitor: Any = None,
        writable: bool = False,
        events_path: str | os.PathLike[str] | None = None,
        description: str | None = None,
    ) -> None:
        super().__init__()
        self.pid = pid
        self.layout = layout
        self.writable = writable
        self.qmp_path = Path(qmp_path) if qmp_path is not None else None
        self._open_monitor = open_monitor
        self.description = description or f"QEMU process {pid}" + (
            f" (QMP {self.qmp_path})" if self.qmp_path else ""
        )
        self._ranges = [PhysRange(p.start, p.end) for p in layout.pieces]
        self._range_starts = [p.start for p in layout.pieces]
        self._range_ends = [p.end for p in layout.pieces]
        self._pages: dict[int, bytes] = {}
        self._cached_generation = -1
        self._hvas = list(layout.hvas)
        self._throttle = Throttle()
        self._events: QmpEvents | None = None
        self._process = ProcessWatch(pid)
        try:
            self._fd = os.open(f"/proc/{pid}/mem", os.O_RDWR if writable else os.O_RDONLY)
        except PermissionError:
            self._process.close()
            raise no_ptrace_rights(pid) from None
        except FileNotFoundError:
            self._process.close()
            raise SourceError(f"QEMU (pid {pid}) is not running") from None
        except OSError as exc:
            self._process.close()
            raise SourceError(f"cannot open /proc/{pid}/mem: {exc.strerror}") from None
        try:
            self._probe()
            if events_path is not None:
                from vmishell.sources.files import _listen

                self._events = _listen(events_path)
        except BaseException:
            self.close()
            raise

    def _probe(self) -> None:
        """Read one byte of each piece: refused rights show up here, not mid-session."""
        for piece, hva in zip(self.layout.pieces, self._hvas, strict=True):
            try:
                got = os.pread(self._fd, 1, hva)
            except PermissionError:
                raise no_ptrace_rights(self.pid) from None
            except OSError as exc:
                raise SourceError(
                    f"QEMU (pid {self.pid}) has no readable memory at {hva:#x} for guest RAM "
                    f"at {piece.start:#x} ({exc.strerror}): the monitor's layout is wrong"
                ) from None
            if len(got) != 1:
                raise SourceError(f"QEMU (pid {self.pid}) has no memory at {hva:#x}")

    # -- memory ---------------------------------------------------------------------
    def ranges(self) -> Sequence[PhysRange]:
        return self._ranges

    def read(self, paddr: int, size: int) -> bytes:
        """A read inside one RAM piece goes straight to QEMU's memory (the hot path).

        Small reads are served from whole pages kept for the current generation:
        a task walk reads many fields of few pages, and each page then costs one
        system call per top-level call (the session bumps the generation per call).
        """
        if self._closed or self._ended is not None:
            self.check()
        i = bisect.bisect_right(self._range_starts, paddr) - 1
        if i < 0 or size <= 0 or paddr + size > self._range_ends[i]:
            return super().read(paddr, size)
        offset = paddr - self._range_starts[i]
        if size <= SMALL_READ:
            first = paddr & ~PAGE_MASK
            if (
                first == (paddr + size - 1) & ~PAGE_MASK
                and first >= self._range_starts[i]
                and first + PAGE_SIZE <= self._range_ends[i]
            ):
                if self._cached_generation != self._generation:
                    self._pages.clear()
                    self._cached_generation = self._generation
                page = self._pages.get(first)
                if page is None:
                    page = self._pread(first, PAGE_SIZE, self._hvas[i] + offset - (paddr - first))
                    if len(self._pages) >= CACHED_PAGES:
                        self._pages.clear()
                    self._pages[first] = page
                at = paddr - first
                return page[at : at + size]
        return self._pread(paddr, size, self._hvas[i] + offset)

    def _host(self, paddr: int) -> int:
        i = bisect.bisect_right(self._range_starts, paddr) - 1
        return self._hvas[i] + paddr - self._range_starts[i]

    def _read(self, paddr: int, size: int) -> bytes:
        return self._pread(paddr, size, self._host(paddr))

    def _pread(self, paddr: int, size: int, hva: int) -> bytes:
        # One pread for the whole request: the kernel copies page by page anyway, and a
        # single result object costs less than joining chunks (1.8 GB/s for 16 MiB here).
        try:
            data = os.pread(self._fd, size, hva)
            if len(data) == size:
                return data
            parts, got = [data], len(data)
            while got < size:  # a signal cut the copy short: ask for the rest
                more = os.pread(self._fd, size - got, hva + got)
                if not more:
                    return self._failed(paddr + got, size - got, hva + got, None)
                parts.append(more)
                got += len(more)
            return b"".join(parts)
        except OSError as exc:
            return self._failed(paddr, size, hva, exc)

    def _failed(self, paddr: int, size: int, hva: int, exc: OSError | None) -> bytes:
        """A read of QEMU's memory came back short or failed: did QEMU end?"""
        if self._fd < 0:
            self.check()
        if not self._process.alive():
            self._end(f"the QEMU process (pid {self.pid}) has exited")
        why = exc.strerror if exc is not None else "short read"
        if exc is not None and exc.errno in (errno.EPERM, errno.EACCES):
            raise no_ptrace_rights(self.pid)
        raise PhysicalReadError(paddr, size, f"QEMU (pid {self.pid}) host address {hva:#x}: {why}")

    def write(self, paddr: int, data: bytes) -> None:
        if not self.writable:
            raise SourceError(f"{self.description} is read-only (open it writable to change it)")
        self.check()
        if not self.is_valid(paddr, len(data)):
            raise PhysicalReadError(paddr, len(data), "write outside guest RAM")
        hva = self._host(paddr)
        self._pages.clear()
        try:
            n = os.pwrite(self._fd, data, hva)
        except OSError as exc:
            self._failed(paddr, len(data), hva, exc)
            return
        if n != len(data):
            self._failed(paddr, len(data), hva, None)

    # -- lifecycle ------------------------------------------------------------------
    @property
    def resets(self) -> int | None:
        return None if self._events is None else self._events.resets

    @property
    def state(self) -> str:
        state = super().state
        if state == "running" and self._events is not None and self._events.running is False:
            return "paused"
        return state

    def _check_alive(self) -> None:
        if not self._throttle():
            return
        if self._events is not None:
            self._events.poll()
            if self._events.closed_by_peer:
                self._end("QEMU closed its monitor (the VM process exited)")
        if not self._process.alive():
            self._end(f"the QEMU process (pid {self.pid}) has exited")

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        if self._events is not None:
            self._events.close()
        self._process.close()
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    # -- monitor ----------------------------------------------------------------------
    @contextmanager
    def _monitor(self) -> Iterator[Any]:
        if self._open_monitor is not None:
            with self._open_monitor() as monitor:
                yield monitor
            return
        if self.qmp_path is None:
            raise SourceError(f"{self.description} has no monitor: registers and pausing need one")
        from vmishell.sources.qmp import QmpClient

        with QmpClient(self.qmp_path) as client:
            yield client

    def registers(self) -> Registers:
        self.check()
        with self._monitor() as monitor:
            from vmishell.sources.registers_text import parse_registers

            return parse_registers(monitor.hmp("info registers"))

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Stop the guest for a consistent view; resume it only if it was running."""
        self.check()
        with self._monitor() as monitor:
            was_running = bool(monitor.command("query-status")["running"])
            if was_running:
                monitor.command("stop")
        self.refresh()
        try:
            yield
        finally:
            if was_running and self._ended is None and not self._closed:
                with self._monitor() as monitor:
                    monitor.command("cont")
            self.refresh()


def check_socket(path: str | os.PathLike[str]) -> Path:
    """The path of a unix socket, or a SourceError saying what it is instead."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise SourceError(f"no such QMP socket: {p}") from None
    except OSError as exc:
        raise SourceError(f"cannot look at {p}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise SourceError(f"{p} is not a unix socket (a QMP socket was expected)")
    return p


#: Seconds to wait for a QMP greeting at attach: a socket that is not QMP may say nothing.
GREETING_TIMEOUT = 3.0
#: Bytes of a greeting read before deciding the socket is not QMP.
MAX_GREETING = 1 << 16


def expect_qmp(path: Path, pid: int) -> None:
    """Check that `path` greets like QMP, on a connection of its own closed at once.

    Done with a plain socket so that a silent or chatty non-QMP peer (a serial
    console socket, say) gives one clear error instead of a protocol library's.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    data = b""
    try:
        sock.settimeout(GREETING_TIMEOUT)
        sock.connect(os.fspath(path))
        while b"\n" not in data and len(data) < MAX_GREETING:
            more = sock.recv(4096)
            if not more:
                break
            data += more
    except TimeoutError:
        pass
    except OSError as exc:
        raise SourceError(f"cannot connect to {path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    line = data.split(b"\n", 1)[0]
    try:
        greeting = json.loads(line)
    except ValueError:
        greeting = None
    if isinstance(greeting, dict) and "QMP" in greeting:
        return
    if not data:
        raise SourceError(
            f"{path} (served by pid {pid}) sent no QMP greeting in {GREETING_TIMEOUT:g} s: "
            "not a QMP socket, or another client holds this QMP monitor"
        )
    raise SourceError(f"{path} (served by pid {pid}) is not a QMP socket: it said {line[:60]!r}")


def open_qmp(
    qmp_path: str | os.PathLike[str],
    *,
    writable: bool = False,
    pid: int | None = None,
    events_path: str | os.PathLike[str] | None = None,
) -> QemuProcessSource | QemuRamSource:
    """The guest of the QEMU serving `qmp_path`: its RAM file if shared, else its process."""
    from vmishell.sources.qmp import QmpClient

    path = check_socket(qmp_path)
    if pid is None:
        pid = peer_pid(path)
        if pid is None:
            raise SourceError(f"cannot learn which process serves {path} (no SO_PEERCRED peer)")
    expect_qmp(path, pid)
    with QmpClient(path) as client:
        layout = learn_layout(client, f"QMP {path}")
    shared = shared_file_layout(layout)
    if shared is not None:
        from vmishell.sources.files import QemuRamSource

        dev, machine = shared
        assert dev.mem_path is not None
        return QemuRamSource(
            dev.mem_path, path, machine=machine, writable=writable, pid=pid, events_path=events_path
        )
    return QemuProcessSource(pid, layout, qmp_path=path, writable=writable, events_path=events_path)


__all__ = [
    "Memdev",
    "Monitor",
    "QemuProcessSource",
    "QemuRamLayout",
    "RamPiece",
    "check_socket",
    "expect_qmp",
    "learn_layout",
    "open_qmp",
    "parse_flat_ram",
    "parse_gpa2hva",
    "shared_file_layout",
]
