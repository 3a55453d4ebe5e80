"""Write Linux initramfs archives (newc cpio, gzip) in pure Python.

No cpio or root privileges are needed, and the output is byte-for-byte
reproducible (fixed mtimes, sorted inode numbers), so a cached image can be
compared with a fresh one. The kernel accepts several archives concatenated
into one initrd file; `up` uses that to add a user scenario to the cached
base image without rebuilding it.
"""

from __future__ import annotations

import gzip
import stat

_NEWC_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


class Cpio:
    """An in-memory newc archive: add entries, then take `bytes()`."""

    def __init__(self) -> None:
        self._out = bytearray()
        self._ino = 1
        self._names: set[str] = set()

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes = b"",
        nlink: int = 1,
        rdev: tuple[int, int] = (0, 0),
    ) -> None:
        name = name.lstrip("/")
        if name in self._names:
            raise ValueError(f"duplicate initramfs entry {name!r}")
        self._names.add(name)
        encoded = name.encode() + b"\0"
        fields = (
            self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, *rdev, len(encoded), 0,
        )  # fmt: skip
        header = _NEWC_MAGIC + b"".join(b"%08x" % v for v in fields)
        self._out += header + encoded + _pad4(len(header) + len(encoded))
        self._out += data + _pad4(len(data))
        self._ino += 1

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode, nlink=2)

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def add_symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def __bytes__(self) -> bytes:
        trailer = Cpio()
        trailer._entry(_TRAILER, 0)
        return bytes(self._out) + bytes(trailer._out)


def compress(archive: bytes) -> bytes:
    """gzip with a fixed mtime, padded to 4 bytes so archives concatenate cleanly."""
    data = gzip.compress(archive, compresslevel=6, mtime=0)
    return data + _pad4(len(data))


def base_archive(*, busybox: bytes, init: str, workload: bytes) -> bytes:
    """The guest's root filesystem: busybox, /init and the workload, gzip-compressed.

    Applet links are made by `busybox --install -s` at boot, so the same
    archive works for any busybox build without running it on the host.
    """
    cpio = Cpio()
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "run", "vmi", "root", "etc"):
        cpio.add_dir(d)
    # The kernel opens /dev/console for pid 1 before /init can mount devtmpfs.
    cpio.add_chardev("dev/console", 5, 1)
    cpio.add_file("bin/busybox", busybox, 0o755)
    cpio.add_symlink("bin/sh", "busybox")
    cpio.add_file("bin/vmi-marker", workload, 0o755)
    cpio.add_file("init", init.encode(), 0o755)
    cpio.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.add_file("etc/group", b"root:x:0:\n")
    return compress(bytes(cpio))


def scenario_archive(script: bytes) -> bytes:
    """An extra archive placing a user scenario at /vmi/scenario (run by /init)."""
    cpio = Cpio()
    cpio.add_file("vmi/scenario", script, 0o755)
    return compress(bytes(cpio))
