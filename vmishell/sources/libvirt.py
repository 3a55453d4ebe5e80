"""A libvirt domain by name (`libvirt:NAME[@URI]`): the VMs virsh, virt-manager and OpenStack run.

libvirt holds the domain's QMP socket, so monitor commands go through its API
(`qemuMonitorCommand`), and only commands that read are let through: the RAM
layout (`query-memdev`, `qom-list`/`qom-get`, HMP `info mtree -f`, `gpa2hva`),
registers (HMP `info registers`) and the run state. Pausing for `paused()` is
libvirt's own suspend/resume, so libvirt's view of the domain stays right.
Guest RAM is read from the domain's QEMU process like `qmp:` does; the QEMU
must run on this host. Nothing else touches the domain: a writable session is
refused.

Using `qemuMonitorCommand` makes libvirt mark the domain "tainted: custom-monitor"
in its log; that is a note for its administrators, not a change of the domain.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vmishell.errors import QmpError, SourceError
from vmishell.sources.qemuproc import QemuProcessSource, learn_layout

#: QMP commands that only read; everything else is refused before it reaches libvirt.
READ_ONLY_QMP = frozenset(
    ["query-memdev", "qom-list", "qom-get", "query-status", "human-monitor-command"]
)
#: HMP commands (first words) that only read.
READ_ONLY_HMP = ("info registers", "info mtree", "gpa2hva ", "info status")


def _libvirt() -> tuple[Any, Any]:
    try:
        import libvirt
        import libvirt_qemu
    except ImportError:
        raise SourceError(
            "libvirt: targets need libvirt-python (pip install libvirt-python; it builds "
            "against libvirt-dev and pkg-config)"
        ) from None
    return libvirt, libvirt_qemu


def _message(exc: Exception) -> str:
    get = getattr(exc, "get_error_message", None)
    text = get() if callable(get) else None
    return str(text or exc).strip()


class LibvirtMonitor:
    """A read-only monitor of one domain through `qemuMonitorCommand` (QMP and HMP)."""

    def __init__(self, domain: Any, where: str) -> None:
        self._domain = domain
        self.where = where

    def command(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        if name not in READ_ONLY_QMP:
            raise SourceError(f"{self.where}: refused QMP {name!r}: it could change the domain")
        if name == "human-monitor-command":
            line = str((arguments or {}).get("command-line", ""))
            if not line.startswith(READ_ONLY_HMP):
                raise SourceError(f"{self.where}: refused HMP {line!r}: it could change the domain")
        request: dict[str, Any] = {"execute": name}
        if arguments:
            request["arguments"] = arguments
        libvirt, libvirt_qemu = _libvirt()
        try:
            reply = libvirt_qemu.qemuMonitorCommand(self._domain, json.dumps(request), 0)
        except libvirt.libvirtError as exc:
            raise QmpError(f"{self.where}: {name} through libvirt: {_message(exc)}") from None
        try:
            answer = json.loads(reply)
        except ValueError:
            raise QmpError(f"{self.where}: {name}: libvirt returned {reply[:80]!r}") from None
        if not isinstance(answer, dict) or "return" not in answer:
            raise QmpError(f"{self.where}: {name} failed: {answer!r:.200}")
        return answer["return"]

    def hmp(self, cmdline: str) -> str:
        return str(self.command("human-monitor-command", {"command-line": cmdline}))

    def __enter__(self) -> LibvirtMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def qemu_pid(domain: Any, name: str) -> int:
    """The pid of the domain's QEMU on this host: the process started with its UUID."""
    uuid = domain.UUIDString().encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if uuid in argv and (b"-uuid", uuid) in itertools.pairwise(argv):
            return int(entry.name)
    raise SourceError(
        f"libvirt domain {name!r} runs no QEMU process on this host (a remote libvirt?): "
        "vmishell reads guest memory from a local QEMU"
    )


class LibvirtSource(QemuProcessSource):
    """A running libvirt/QEMU domain: RAM from its QEMU process, the rest through libvirt."""

    def __init__(self, conn: Any, domain: Any, uri: str | None, pid: int, layout: Any) -> None:
        self._conn = conn
        self.domain = domain
        self.uri = uri
        self.domain_name = domain.name()
        where = f"libvirt domain {self.domain_name}" + (f" ({uri})" if uri else "")
        self._where = where
        super().__init__(
            pid,
            layout,
            open_monitor=lambda: LibvirtMonitor(domain, where),
            description=f"{where}, QEMU pid {pid}",
        )

    @property
    def state(self) -> str:
        state = super().state
        if state == "running":
            libvirt, _ = _libvirt()
            try:
                if self.domain.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                    return "paused"
            except libvirt.libvirtError:
                return state
        return state

    @contextmanager
    def paused(self) -> Iterator[None]:
        """libvirt's suspend for a consistent view; resumed only if it was running."""
        libvirt, _ = _libvirt()
        self.check()
        try:
            was_running = self.domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING
            if was_running:
                self.domain.suspend()
        except libvirt.libvirtError as exc:
            raise SourceError(f"{self._where}: cannot suspend: {_message(exc)}") from None
        self.refresh()
        try:
            yield
        finally:
            if was_running and self._ended is None and not self._closed:
                try:
                    self.domain.resume()
                except libvirt.libvirtError as exc:
                    raise SourceError(f"{self._where}: cannot resume: {_message(exc)}") from None
            self.refresh()

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        libvirt, _ = _libvirt()
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()


def open_libvirt(target: str, *, writable: bool = False) -> LibvirtSource:
    """`NAME[@URI]`: the running domain NAME of libvirt at URI (libvirt's default if none)."""
    name, _, uri = target.partition("@")
    shown = uri or "libvirt's default URI"
    if not name:
        raise SourceError("libvirt: needs a domain name (libvirt:NAME or libvirt:NAME@URI)")
    if writable:
        raise SourceError(
            f"libvirt:{target}: libvirt domains are opened read-only (vmishell does not "
            "change a domain libvirt manages)"
        )
    libvirt, _ = _libvirt()
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors come as exceptions
    try:
        conn = libvirt.open(uri or None)
    except libvirt.libvirtError as exc:
        raise SourceError(f"cannot connect to libvirt at {shown}: {_message(exc)}") from None
    try:
        if conn.getType() != "QEMU":
            raise SourceError(f"libvirt at {shown} drives {conn.getType()}, not QEMU")
        try:
            domain = conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                known = ", ".join(sorted(d.name() for d in conn.listAllDomains())) or "none"
                raise SourceError(
                    f"no libvirt domain named {name!r} at {shown} (domains: {known})"
                ) from None
            raise SourceError(f"libvirt at {shown}: {_message(exc)}") from None
        if not domain.isActive():
            raise SourceError(f"libvirt domain {name!r} at {shown} is not running")
        pid = qemu_pid(domain, name)
        where = f"libvirt domain {name}" + (f" ({uri})" if uri else "")
        layout = learn_layout(LibvirtMonitor(domain, where), where)
    except BaseException:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()
        raise
    return LibvirtSource(conn, domain, uri or None, pid, layout)  # closes conn if it fails


__all__ = ["READ_ONLY_HMP", "READ_ONLY_QMP", "LibvirtMonitor", "LibvirtSource", "open_libvirt"]
