"""`lab:NAME`: attach a Session to a running lab guest (registered as a target scheme)."""

from __future__ import annotations

from typing import Any

from vmishell.lab.runner import attach
from vmishell.session import Session


def open_lab(name: str, **options: Any) -> Session:
    """A Session on the running lab instance `name`, told its QEMU pid and event socket."""
    guest = attach(name)
    if guest.libvirt_uri is not None:  # `lab up --libvirt`: a libvirt domain
        from vmishell.sources.libvirt import open_libvirt

        writable = bool(options.pop("writable", False))
        source = open_libvirt(guest.target.removeprefix("libvirt:"), writable=writable)
        return Session(source, name=f"lab:{name}", **options)
    if guest.ram_path is None:  # `lab up --plain`: RAM in QEMU's own process
        from vmishell.sources.qemuproc import open_qmp

        writable = bool(options.pop("writable", False))
        source = open_qmp(
            guest.qmp_path, pid=guest.pid, events_path=guest.events_path, writable=writable
        )
        return Session(source, name=f"lab:{name}", **options)
    return Session.qemu(
        guest.ram_path,
        guest.qmp_path,
        machine=guest.guest.machine,
        name=f"lab:{name}",
        pid=guest.pid,
        events_path=guest.events_path,
        **options,
    )
