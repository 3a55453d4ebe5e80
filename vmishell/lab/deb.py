"""Read Debian .deb files with the standard library: no dpkg, no installation.

A .deb is an `ar` archive holding control.tar.* and data.tar.*. We only need
a few files out of it (the kernel image, busybox, a package's version), so we
stream the data tarball and stop as soon as everything wanted was seen: the
kernel's modules, which make up most of the archive, are never decompressed
when the wanted files come first.
"""

from __future__ import annotations

import contextlib
import io
import lzma
import tarfile
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import BinaryIO

from vmishell.errors import LabError

_AR_MAGIC = b"!<arch>\n"
_AR_HEADER = 60


def ar_members(path: Path) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each member of the ar archive at `path`."""
    with path.open("rb") as f:
        if f.read(len(_AR_MAGIC)) != _AR_MAGIC:
            raise LabError(f"{path} is not a Debian package (no ar header)")
        pos = len(_AR_MAGIC)
        while True:
            f.seek(pos)
            header = f.read(_AR_HEADER)
            if len(header) < _AR_HEADER:
                return
            name = header[:16].decode("ascii", "replace").strip().rstrip("/")
            try:
                size = int(header[48:58].decode("ascii").strip())
            except ValueError:
                raise LabError(f"{path}: corrupt ar member header at {pos}") from None
            yield name, pos + _AR_HEADER, size
            pos += _AR_HEADER + size + (size & 1)


class _Slice(io.RawIOBase):
    """A read-only window [offset, offset+size) of a file, for streaming decompressors."""

    def __init__(self, f: BinaryIO, offset: int, size: int) -> None:
        self._f, self._pos, self._end = f, offset, offset + size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self._end - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._pos)
        data = self._f.read(n)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


def _open_tar_stream(raw: BinaryIO, member: str) -> BinaryIO:
    """A decompressed stream of a data/control tarball named `member`."""
    if member.endswith(".xz"):
        return lzma.open(raw)  # type: ignore[return-value]
    if member.endswith(".gz"):
        import gzip

        return gzip.open(raw)  # type: ignore[return-value]
    if member.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw)
    if member.endswith(".tar"):
        return raw
    raise LabError(f"unsupported compression for {member}")


def _walk_tar(
    path: Path, prefix: str
) -> Generator[tuple[tarfile.TarInfo, tarfile.TarFile], None, None]:
    """Stream the members of the `prefix`.tar.* member of the .deb at `path`."""
    for name, offset, size in ar_members(path):
        if not name.startswith(prefix + ".tar"):
            continue
        with path.open("rb") as f:
            raw = io.BufferedReader(_Slice(f, offset, size), buffer_size=1 << 20)
            stream = _open_tar_stream(raw, name)
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for info in tar:
                    yield info, tar
        return
    raise LabError(f"{path} has no {prefix}.tar.* member")


def extract(
    path: Path,
    wanted: Callable[[str], bool],
    *,
    stop_when: Callable[[dict[str, bytes]], bool] | None = None,
) -> dict[str, bytes]:
    """Regular files of the package's data tarball whose normalised path `wanted` accepts.

    Paths are given without the leading "./" (e.g. "boot/vmlinuz-6.1.0-57-amd64").
    `stop_when(found)` ends the scan early once everything needed was seen.
    """
    found: dict[str, bytes] = {}
    with contextlib.closing(_walk_tar(path, "data")) as members:
        for info, tar in members:
            name = info.name.removeprefix("./")
            if info.isfile() and wanted(name):
                f = tar.extractfile(info)
                if f is not None:
                    found[name] = f.read()
                if stop_when is not None and stop_when(found):
                    break
    return found


def control_fields(path: Path) -> dict[str, str]:
    """The fields of the package's control file (Package, Version, Architecture, ...)."""
    with contextlib.closing(_walk_tar(path, "control")) as members:
        for info, tar in members:
            if info.name.removeprefix("./") != "control" or not info.isfile():
                continue
            f = tar.extractfile(info)
            return _parse_control(f.read().decode("utf-8", "replace") if f else "")
    raise LabError(f"{path} has no control file")


def _parse_control(text: str) -> dict[str, str]:
    """RFC822-style control fields; continuation lines are joined with newlines."""
    fields: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if line[:1] in (" ", "\t") and key:
            fields[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip()
            fields[key] = value.strip()
    return fields
