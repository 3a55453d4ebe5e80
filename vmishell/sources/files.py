"""Memory-mapped files of guest RAM: a running QEMU guest's shared RAM file and raw images."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from vmishell.errors import SourceError
from vmishell.sources.base import Registers
from vmishell.sources.layout import flat_layout, qemu_x86_ram_layout
from vmishell.sources.memory import BufferSource

if TYPE_CHECKING:
    from vmishell.sources.qmp import QmpClient


def _map_file(path: Path, writable: bool) -> tuple[mmap.mmap, int]:
    try:
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    except FileNotFoundError:
        raise SourceError(f"no such memory file: {path}") from None
    except PermissionError:
        raise SourceError(f"no permission to open {path} (try as root)") from None
    except OSError as exc:
        raise SourceError(f"cannot open {path}: {exc.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise SourceError(f"{path} is empty")
        access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        return mmap.mmap(fd, size, access=access), size
    except OSError as exc:
        raise SourceError(f"cannot map {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


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
        self._mmap, file_size = _map_file(self.path, writable)
        layout = layout or flat_layout(file_size)
        view = memoryview(self._mmap)
        segments = []
        for phys, offset, size in layout:
            if offset + size > file_size:
                raise SourceError(
                    f"{self.path} is {file_size:#x} bytes, too small for RAM at "
                    f"{phys:#x}+{size:#x} (file offset {offset:#x})"
                )
            segments.append((phys, view[offset : offset + size]))
        super().__init__(
            segments,
            registers=registers,
            description=f"{kind} {self.path}",
            live=live,
            writable=writable,
        )
        self._view = view

    def close(self) -> None:
        self._segments = []
        self._ranges = []
        try:
            self._view.release()
            self._mmap.close()
        except BufferError:
            # A caller still holds a view into the map; it closes when they drop it.
            pass


class RawImageSource(MappedFileSource):
    """A raw dump: file offset = physical address (or a QEMU RAM-file layout)."""

    def __init__(self, path: str | os.PathLike[str], *, machine: str | None = None) -> None:
        size = _file_size(path)
        layout = qemu_x86_ram_layout(size, machine) if machine else flat_layout(size)
        super().__init__(path, layout, kind="raw image")


class QemuRamSource(MappedFileSource):
    """A running QEMU guest: its shared RAM file, read live, plus its QMP socket.

    The RAM file is `-object memory-backend-file,...,share=on`. Reads see the
    guest's memory as it is now; `refresh()` tells caches that it moved on.
    Registers come from QMP when a socket is given. Nothing pauses the guest
    unless the caller asks (`paused()`).
    """

    def __init__(
        self,
        ram_path: str | os.PathLike[str],
        qmp_path: str | os.PathLike[str] | None = None,
        *,
        machine: str = "q35",
        writable: bool = False,
    ) -> None:
        size = _file_size(ram_path)
        super().__init__(
            ram_path,
            qemu_x86_ram_layout(size, machine),
            writable=writable,
            live=True,
            kind="live RAM file",
        )
        self.qmp_path = Path(qmp_path) if qmp_path else None

    def _qmp(self) -> QmpClient:
        """A short-lived QMP connection: QEMU serves one client at a time, so
        vmishell never keeps the socket from other tools between calls."""
        if self.qmp_path is None:
            raise SourceError(
                f"{self.description} has no QMP socket: registers and pausing need one"
            )
        from vmishell.sources.qmp import QmpClient

        return QmpClient(self.qmp_path)

    def registers(self) -> Registers:
        if self.qmp_path is None:
            return super().registers()
        with self._qmp() as qmp:
            return qmp.registers()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Stop the guest for a consistent view; resume it only if it was running."""
        with self._qmp() as qmp:
            was_running = qmp.running()
            if was_running:
                qmp.stop()
        self.refresh()
        try:
            yield
        finally:
            if was_running:
                with self._qmp() as qmp:
                    qmp.cont()
            self.refresh()


def _file_size(path: str | os.PathLike[str]) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        raise SourceError(f"no such memory file: {path}") from None
    except OSError as exc:
        raise SourceError(f"cannot stat {path}: {exc.strerror}") from None
