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
    return Session.qemu(
        record["ram_path"],
        record["qmp_path"],
        machine=get_guest(record["guest"]).machine,
        name=f"lab:{name}",
        pid=int(record["pid"]),
        events_path=record.get("events_path"),
        **options,
    )
