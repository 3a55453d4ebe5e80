"""Memory-mapped files of guest RAM: a running QEMU guest's shared RAM file and raw images.

A mapped file that shrinks under its map would kill the process with SIGBUS
on the next access to a page past its new end. So every top-level call
first checks the file's size (`check()`, one lseek on a descriptor kept
open for this) and refuses to touch the map once it shrank. `close()`
releases every view of the map and unmaps it: nothing of the file stays in
the process's address space.
"""

from __future__ import annotations

import bisect
import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from vmishell.errors import PhysicalReadError, QmpError, SourceError
from vmishell.sources.base import Registers
from vmishell.sources.layout import flat_layout, qemu_ram_layout
from vmishell.sources.memory import BufferSource
from vmishell.sources.registers_text import parse_registers
from vmishell.sources.vmwatch import ProcessWatch, QmpEvents, Throttle, peer_pid, qmp_command


def _map_file(path: Path, writable: bool) -> tuple[mmap.mmap, int]:
    fd = _open_file(path, writable)
    try:
        return _map_fd(path, fd, writable)
    finally:
        os.close(fd)


def _open_file(path: Path, writable: bool) -> int:
    try:
        return os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    except FileNotFoundError:
        raise SourceError(f"no such memory file: {path}") from None
    except PermissionError:
        raise SourceError(f"no permission to open {path} (try as root)") from None
    except OSError as exc:
        raise SourceError(f"cannot open {path}: {exc.strerror}") from None


#: Bytes of a mapped file searched at a time by `MappedFileSource.find`.
FIND_CHUNK = 16 << 20


def _drop_pages(mapped: mmap.mmap, begin: int, end: int) -> None:
    """Unmap [begin, end) of a file map from this process; the page cache keeps the
    pages (maps here are always shared, so nothing written is lost)."""
    begin -= begin % mmap.PAGESIZE
    if mapped.closed or end <= begin or not hasattr(mmap, "MADV_DONTNEED"):
        return
    with suppress(OSError, ValueError):
        mapped.madvise(mmap.MADV_DONTNEED, begin, end - begin)


def _map_fd(path: Path, fd: int, writable: bool) -> tuple[mmap.mmap, int]:
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise SourceError(f"{path} is empty")
        access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        return mmap.mmap(fd, size, access=access), size
    except OSError as exc:
        raise SourceError(f"cannot map {path}: {exc.strerror}") from None


def release_map(views: list[memoryview], mapping: mmap.mmap) -> None:
    """Release every view of a map, then unmap it.

    vmishell never hands out views of a map (reads return bytes), so once
    its own views are released nothing can keep the file mapped; if a
    BufferError says otherwise, that is a bug worth hearing about.
    """
    for view in views:
        view.release()
    try:
        mapping.close()
    except BufferError as exc:
        raise SourceError(f"cannot unmap: a view of the map is still held ({exc})") from exc


class MappedFileSource(BufferSource):
    """A file mapped into memory and placed at physical addresses by a layout."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        layout: list[tuple[int, int, int]] | None = None,
        *,
        writable: bool = False,
        live: bool = False,
        registers: Registers | None = None,
        kind: str = "raw image",
    ) -> None:
        self.path = Path(path)
        self._fd = _open_file(self.path, writable)
        try:
            self._mmap, file_size = _map_fd(self.path, self._fd, writable)
        except BaseException:
            os.close(self._fd)
            raise
        self._mapped_size = file_size
        layout = layout or flat_layout(file_size)
        #: (physical start, file offset, size) of each RAM range, for `find` and `read_sparse`.
        self._extents = sorted(layout)
        self._extent_starts = [phys for phys, _, _ in self._extents]
        view = memoryview(self._mmap)
        slices: list[memoryview] = []
        try:
            for phys, offset, size in layout:
                if offset + size > file_size:
                    raise SourceError(
                        f"{self.path} is {file_size:#x} bytes, too small for RAM at "
                        f"{phys:#x}+{size:#x} (file offset {offset:#x})"
                    )
                slices.append(view[offset : offset + size])
            super().__init__(
                [(phys, piece) for (phys, _, _), piece in zip(layout, slices, strict=True)],
                registers=registers,
                description=f"{kind} {self.path}",
                live=live,
                writable=writable,
            )
        except BaseException:
            release_map([*slices, view], self._mmap)
            os.close(self._fd)
            raise
        finally:
            for piece in slices:  # the segments hold their own views of these
                piece.release()
        self._view = view

    def read_sparse(self, paddr: int, size: int) -> bytes:
        """`read` by pread: a touch of the map would map the ~64 KiB around it (fault-around)."""
        if self._closed or self._ended is not None:
            self.check()
        i = bisect.bisect_right(self._extent_starts, paddr) - 1
        if i < 0 or size <= 0 or paddr + size > self._extents[i][0] + self._extents[i][2]:
            return self.read(paddr, size)  # an edge case: let read() answer or raise
        phys, offset, _ = self._extents[i]
        try:
            data = os.pread(self._fd, size, offset + paddr - phys)
        except OSError as exc:
            why = f"cannot read {self.path}: {exc.strerror}"
            raise PhysicalReadError(paddr, size, why) from None
        if len(data) != size:
            self._check_alive()  # the file shrank: the source ends here
            raise PhysicalReadError(paddr, size, f"short read of {self.path}")
        return data

    def find(self, needle: bytes, start: int = 0, end: int | None = None) -> Iterator[int]:
        """Physical addresses of `needle` in RAM, in order, searched in the map itself.

        No chunk is copied out (the map's own `find` runs over the file's
        pages), and each chunk's pages are dropped from this process once
        searched (they stay in the page cache), so scanning a whole dump costs
        neither a copy of it nor a resident set of its size.
        """
        if self._closed or self._ended is not None:
            self.check()
        if not needle:
            return
        chunk = FIND_CHUNK
        for phys, offset, length in self._extents:
            lo = max(start, phys)
            hi = phys + length if end is None else min(end, phys + length)
            pos = lo
            while pos < hi:
                stop = min(pos + chunk + len(needle) - 1, hi)
                base = offset - phys
                i = self._mmap.find(needle, pos + base, stop + base)
                while i != -1 and i - base < pos + chunk:
                    yield i - base
                    i = self._mmap.find(needle, i + 1, stop + base)
                _drop_pages(self._mmap, pos + base, min(pos + chunk, hi) + base)
                pos += chunk

    def _check_alive(self) -> None:
        try:
            # lseek to the end tells the size, at a fraction of fstat's cost (no stat
            # record); the descriptor is kept for this alone, so its offset is free.
            size = os.lseek(self._fd, 0, os.SEEK_END)
        except OSError as exc:
            self._end(f"cannot look at the memory file any more ({exc.strerror})")
        if size < self._mapped_size:
            self._unmap()
            self._end(
                f"the memory file shrank from {self._mapped_size:#x} to {size:#x} bytes "
                "(truncated under the session); it is no longer read"
            )

    def _unmap(self) -> None:
        """Drop every view and the map itself (idempotent)."""
        views = [s.view for s in self._segments]
        self._segments = []
        self._ranges = []
        self._starts = None
        if self._mmap.closed:
            return
        release_map([*views, self._view], self._mmap)

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        try:
            self._unmap()
        finally:
            fd, self._fd = self._fd, -1
            if fd >= 0:
                os.close(fd)


class RawImageSource(MappedFileSource):
    """A raw dump: file offset = physical address, or a QEMU RAM-file layout when
    `machine` names one ("q35", "pc", "virt": see `vmishell.sources.layout`)."""

    def __init__(self, path: str | os.PathLike[str], *, machine: str | None = None) -> None:
        size = _file_size(path)
        layout = qemu_ram_layout(size, machine) if machine else flat_layout(size)
        super().__init__(path, layout, kind="raw image")


class QemuRamSource(MappedFileSource):
    """A running QEMU guest: its shared RAM file, read live, plus its QMP socket.

    The RAM file is `-object memory-backend-file,...,share=on`. Reads see the
    guest's memory as it is now; `refresh()` tells caches that it moved on.
    Registers come from QMP when a socket is given. Nothing pauses the guest
    unless the caller asks (`paused()`).

    Lifecycle: the QEMU process is watched (its `pid`, given or learnt from
    the QMP socket's peer), so the source knows when the VM ended; with an
    `events_path` (a second QMP monitor reserved for events) it also counts
    guest resets, which the OS layer uses to find the new kernel.
    """

    def __init__(
        self,
        ram_path: str | os.PathLike[str],
        qmp_path: str | os.PathLike[str] | None = None,
        *,
        machine: str = "q35",
        writable: bool = False,
        pid: int | None = None,
        events_path: str | os.PathLike[str] | None = None,
    ) -> None:
        size = _file_size(ram_path)
        super().__init__(
            ram_path,
            qemu_ram_layout(size, machine),
            writable=writable,
            live=True,
            kind="live RAM file",
        )
        self.qmp_path = Path(qmp_path) if qmp_path else None
        self._throttle = Throttle()
        self._events: QmpEvents | None = None
        self._process: ProcessWatch | None = None
        try:
            if pid is None and self.qmp_path is not None:
                pid = peer_pid(self.qmp_path)
            if pid is not None:
                self._process = ProcessWatch(pid)
            if events_path is not None:
                self._events = _listen(events_path)
        except BaseException:
            self.close()
            raise
        self.pid = pid

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
        super()._check_alive()
        if not self._throttle():
            return
        if self._events is not None:
            self._events.poll()
            if self._events.closed_by_peer:
                self._end("QEMU closed its monitor (the VM process exited)")
        if self._process is not None and not self._process.alive():
            self._end(f"the QEMU process (pid {self._process.pid}) has exited")

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
        if self._process is not None:
            self._process.close()
        super().close()

    # -- QMP ------------------------------------------------------------------------
    def _command(self, name: str, **arguments: object) -> object:
        """One QMP command on a short-lived connection: QEMU serves one client at a
        time, so vmishell never keeps the socket from other tools between calls."""
        if self.qmp_path is None:
            raise SourceError(
                f"{self.description} has no QMP socket: registers and pausing need one"
            )
        return qmp_command(self.qmp_path, name, arguments or None)

    def registers(self) -> Registers:
        if self.qmp_path is None:
            return super().registers()
        self.check()
        text = self._command("human-monitor-command", **{"command-line": "info registers"})
        return parse_registers(str(text))

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Stop the guest for a consistent view; resume it only if it was running."""
        self.check()
        status = self._command("query-status")
        was_running = isinstance(status, dict) and bool(status.get("running"))
        if was_running:
            self._command("stop")
        self.refresh()
        try:
            yield
        finally:
            if was_running and self._ended is None and not self._closed:
                self._command("cont")
            self.refresh()


#: Seconds to wait for an event socket's greeting: QEMU serves one client per
#: monitor, so a socket another session listens on never greets.
EVENTS_GREETING_TIMEOUT = 1.0


def _listen(events_path: str | os.PathLike[str]) -> QmpEvents | None:
    """Listen for a guest's QMP events, or None when the socket is taken or gone.

    Without events the session still notices resets, through the kernel's ticks.
    """
    try:
        return QmpEvents(events_path, timeout=EVENTS_GREETING_TIMEOUT)
    except QmpError:
        return None


def _file_size(path: str | os.PathLike[str]) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        raise SourceError(f"no such memory file: {path}") from None
    except OSError as exc:
        raise SourceError(f"cannot stat {path}: {exc.strerror}") from None
