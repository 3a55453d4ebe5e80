"""`lab:NAME`: attach a Session to a running lab guest (registered as a target scheme).

Reads the instance's record only (no image building, no QMP client import), so
attaching to a lab guest costs what attaching to any QEMU does.
"""

from __future__ import annotations

from typing import Any

from vmishell.lab.guests import get_guest
from vmishell.lab.instances import live_record
from vmishell.session import Session


def open_lab(name: str, **options: Any) -> Session:
    """A Session on the running lab instance `name`, told its QEMU pid and event socket."""
    record = live_record(name)
    if record.get("libvirt_uri") is not None or record.get("ram_path") is None:
        from vmishell.lab.runner import attach

        guest = attach(name)
        writable = bool(options.pop("writable", False))
        if guest.libvirt_uri is not None:  # `lab up --libvirt`: a libvirt domain
            from vmishell.sources.libvirt import open_libvirt

            source = open_libvirt(guest.target.removeprefix("libvirt:"), writable=writable)
            return Session(source, name=f"lab:{name}", **options)
        from vmishell.sources.qemuproc import open_qmp  # `lab up --plain`: RAM in QEMU

        source = open_qmp(
            guest.qmp_path, pid=guest.pid, events_path=guest.events_path, writable=writable
        )
        return Session(source, name=f"lab:{name}", **options)
    return Session.qemu(
        record["ram_path"],
        record["qmp_path"],
        machine=get_guest(record["guest"]).machine,
        name=f"lab:{name}",
        pid=int(record["pid"]),
        events_path=record.get("events_path"),
        **options,
    )
