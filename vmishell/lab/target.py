"""`lab:NAME`: attach a Session to a running lab guest (registered as a target scheme)."""

from __future__ import annotations

from typing import Any

from vmishell.lab.runner import attach
from vmishell.session import Session


def open_lab(name: str, **options: Any) -> Session:
    """A Session on the running lab instance `name`, told its QEMU pid and event socket."""
    guest = attach(name)
    return Session.qemu(
        guest.ram_path,
        guest.qmp_path,
        machine=guest.spec.machine,
        name=f"lab:{name}",
        pid=guest.pid,
        events_path=guest.events_path,
        **options,
    )
