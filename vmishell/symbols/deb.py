"""Read Debian .deb packages with the standard library: no dpkg, no installation.

A .deb is an `ar` archive of debian-binary, control.tar.* and data.tar.*.
vmishell needs a few files out of one (a kernel image, a System.map, a -dbg
vmlinux, busybox) and its control fields, so the data tarball is streamed and
the scan stops as soon as everything wanted was seen. dpkg-deb writes members
sorted, so a scan told which `folder` holds the wanted files also stops once
the names are past it: the modules that make up most of a kernel package are
then never decompressed.
"""

from __future__ import annotations

import contextlib
import io
import lzma
import re
import shutil
import tarfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

from vmishell.errors import PackageError

AR_MAGIC = b"!<arch>\n"
_AR_HEADER = 60
_CHUNK = 1 << 20

Fraction = Callable[[float], None]


@dataclass(frozen=True, slots=True)
class ArMember:
    """One member of an ar archive: its name and where its bytes are in the file."""

    name: str
    offset: int
    size: int


def ar_members(path: Path) -> list[ArMember]:
    """The members of the Debian package at `path`, checked to lie inside the file."""
    try:
        with path.open("rb") as f:
            if f.read(len(AR_MAGIC)) != AR_MAGIC:
                raise PackageError(f"{path} is not a Debian package (no ar header)")
            file_size = f.seek(0, io.SEEK_END)
            members: list[ArMember] = []
            pos = len(AR_MAGIC)
            while pos < file_size:
                f.seek(pos)
                header = f.read(_AR_HEADER)
                if len(header) < _AR_HEADER or header[58:60] != b"`\n":
                    raise PackageError(f"{path}: malformed ar archive (bad member header at {pos})")
                name = header[:16].decode("ascii", "replace").strip().rstrip("/")
                try:
                    size = int(header[48:58].decode("ascii").strip() or 0)
                except ValueError:
                    raise PackageError(f"{path}: corrupt ar member header at {pos}") from None
                offset = pos + _AR_HEADER
                if offset + size > file_size:
                    raise PackageError(
                        f"{path}: truncated package: member {name} ends past the file"
                    )
                members.append(ArMember(name, offset, size))
                pos = offset + size + (size & 1)
    except OSError as exc:
        raise PackageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    names = [m.name for m in members]
    if not names or names[0] != "debian-binary":
        raise PackageError(
            f"{path} is an ar archive that is not a Debian package "
            f"(members: {', '.join(names[:4]) or 'none'})"
        )
    return members


class _Window(io.RawIOBase):
    """A read-only view of [offset, offset+size) of an open file (one ar member)."""

    def __init__(self, f: BinaryIO, offset: int, size: int, report: Fraction) -> None:
        self._f, self._start, self._size, self._pos = f, offset, size, 0
        self._report = report

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self._size - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._start + self._pos)
        data = self._f.read(n)
        buffer[: len(data)] = data
        self._pos += len(data)
        self._report(self._pos / self._size if self._size else 1.0)
        return len(data)


def _open_tar(f: BinaryIO, member: ArMember, report: Fraction) -> tarfile.TarFile:
    """A streaming tar reader over one compressed tarball member."""
    raw = io.BufferedReader(_Window(f, member.offset, member.size, report), _CHUNK)
    suffix = member.name.rsplit(".", 1)[-1]
    if suffix == "zst":
        import zstandard

        stream = zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(raw)
        return tarfile.open(fileobj=stream, mode="r|")
    if suffix == "xz":
        return tarfile.open(fileobj=raw, mode="r|xz")
    if suffix == "gz":
        return tarfile.open(fileobj=raw, mode="r|gz")
    if suffix == "bz2":
        return tarfile.open(fileobj=raw, mode="r|bz2")
    if suffix == "tar":
        return tarfile.open(fileobj=raw, mode="r|")
    raise PackageError(f"unsupported package member compression: {member.name}")


@contextlib.contextmanager
def _tarball(
    path: Path, prefix: str, report: Fraction | None = None
) -> Iterator[Iterator[tuple[str, tarfile.TarInfo, tarfile.TarFile]]]:
    """(normalised name, info, tar) of each entry of the package's `prefix`.tar.* member."""
    member = next((m for m in ar_members(path) if m.name.startswith(prefix + ".tar")), None)
    if member is None:
        raise PackageError(f"{path} has no {prefix}.tar.* member")
    try:
        with path.open("rb") as f, _open_tar(f, member, report or (lambda _f: None)) as tar:
            yield ((info.name.removeprefix("./"), info, tar) for info in tar)
    except _corrupt_data_errors() as exc:
        raise PackageError(f"{path}: corrupt or truncated package data: {exc}") from exc


def data_entries(
    path: Path,
) -> contextlib.AbstractContextManager[Iterator[tuple[str, tarfile.TarInfo, tarfile.TarFile]]]:
    """(normalised name, info, tar) of each entry of the package's data tarball, streamed.

    For callers that need more than file contents (symlinks, modes), e.g. a root filesystem.
    """
    return _tarball(path, "data")


def _corrupt_data_errors() -> tuple[type[Exception], ...]:
    """What the decompressors and tarfile raise on damaged data."""
    import zstandard

    return (tarfile.TarError, lzma.LZMAError, EOFError, zlib.error, OSError, zstandard.ZstdError)


def control_fields(path: Path) -> dict[str, str]:
    """The fields of the package's control file (Package, Version, Architecture, ...)."""
    with _tarball(path, "control") as entries:
        for name, info, tar in entries:
            if name == "control" and info.isfile():
                f = tar.extractfile(info)
                return parse_control(f.read().decode("utf-8", "replace") if f else "")
    raise PackageError(f"{path} has no control file")


def parse_control(text: str) -> dict[str, str]:
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


class _SortedScan:
    """Tells when a scan has left `folder`, in dpkg-deb's sorted order (checked, not assumed)."""

    def __init__(self, folder: str | None) -> None:
        self._end = folder + "~" if folder is not None else None
        self._last = ""
        self._in_order = True

    def past(self, name: str) -> bool:
        self._in_order = self._in_order and self._last <= name
        self._last = name
        return self._end is not None and self._in_order and name > self._end


def extract(
    path: Path,
    wanted: Callable[[str], bool],
    *,
    stop_when: Callable[[dict[str, bytes]], bool] | None = None,
    folder: str | None = None,
    progress: Fraction | None = None,
) -> dict[str, bytes]:
    """Regular files of the package's data tarball whose normalised path `wanted` accepts.

    Paths are given without the leading "./" (e.g. "boot/vmlinuz-6.1.0-57-amd64").
    `stop_when(found)` ends the scan once everything needed was seen; `folder`
    (e.g. "boot/") ends it once a sorted archive is past that folder.
    """
    found: dict[str, bytes] = {}
    scan = _SortedScan(folder)
    with _tarball(path, "data", progress) as entries:
        for name, info, tar in entries:
            if info.isfile() and wanted(name):
                f = tar.extractfile(info)
                if f is not None:
                    found[name] = f.read()
                if stop_when is not None and stop_when(found):
                    break
            if scan.past(name):
                break
    return found


def find_files(
    path: Path,
    patterns: Mapping[str, re.Pattern[str]],
    folder: str | None = None,
    progress: Fraction | None = None,
) -> dict[str, bytes]:
    """{kind: content} of the first file whose path matches each of `patterns`."""
    kinds: dict[str, str] = {}

    def wanted(name: str) -> bool:
        for kind, pattern in patterns.items():
            if kind not in kinds and pattern.match(name):
                kinds[kind] = name
                return True
        return False

    files = extract(
        path, wanted, stop_when=lambda _found: len(kinds) == len(patterns), folder=folder,
        progress=progress,
    )  # fmt: skip
    return {kind: files[name] for kind, name in kinds.items() if name in files}


def extract_to(
    path: Path, targets: Mapping[str, Path], *, folder: str | None = None
) -> dict[str, Path]:
    """Stream the named files (paths without "./") of the data tarball to `targets`.

    For files too large to hold in memory (a -dbg vmlinux is 300-650 MB). Each
    lands under its final name only once complete. Returns what was written.
    """
    written: dict[str, Path] = {}
    scan = _SortedScan(folder)
    with _tarball(path, "data") as entries:
        for name, info, tar in entries:
            dest = targets.get(name)
            if dest is not None and info.isfile() and name not in written:
                src = tar.extractfile(info)
                if src is not None:
                    _copy_to(src, dest)
                    written[name] = dest
                if len(written) == len(targets):
                    break
            if scan.past(name):
                break
    return written


def _copy_to(src: IO[bytes], dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as out:
            shutil.copyfileobj(src, out, _CHUNK)
        tmp.replace(dest)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise PackageError(f"cannot write {dest}: {exc.strerror or exc}") from exc
