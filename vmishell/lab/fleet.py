"""A fleet of lab guests: N instances of one guest, each running a different scenario.

Instance k (1..N) is `NAME-k`; its scenario starts k long-running processes
named `busybox-flK` (a symlink to busybox whose name starts with "busybox"
runs the applet named by its first argument, and the kernel takes the comm
from the file name), so each guest of the fleet answers `ps` differently
and a sweep can tell them apart. A teaching lab hands each student a fleet.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

from vmishell.errors import LabError, VmiError
from vmishell.lab import runner

#: Instances one `up_fleet` may boot (each is a QEMU process with its own RAM).
MAX_COUNT = 64


def comm_of(index: int) -> str:
    """The comm of the processes the scenario of instance `index` starts."""
    return f"busybox-fl{index}"


def scenario(index: int) -> str:
    """The /vmi/scenario script of fleet instance `index` (busybox sh)."""
    comm = comm_of(index)
    return (
        "#!/bin/sh\n"
        f"# vmishell fleet scenario {index}: {index} sleepers named {comm}\n"
        f"ln -s /bin/busybox /tmp/{comm}\n"
        f"i=0; while [ $i -lt {index} ]; do /tmp/{comm} sleep 2147483647 & i=$((i + 1)); done\n"
        f"printf '@@vmi fleet index {index}\\n'\n"
    )


def instance_names(name: str, count: int) -> list[str]:
    if not 1 <= count <= MAX_COUNT:
        raise LabError(f"a lab fleet has 1..{MAX_COUNT} instances, not {count}")
    return [f"{name}-{k}" for k in range(1, count + 1)]


def up_fleet(
    guest: str, name: str | None = None, count: int = 2, *, first: int = 1, **options: Any
) -> list[runner.RunningGuest]:
    """Boot `count` instances `NAME-k` (k from `first`), instance k with `scenario(k)`, one
    after another; options as `runner.up` (`init_script` runs after the scenario). If one
    fails to boot, those already booted are stopped and the error is raised."""
    base = name or guest
    instance_names(base, count)  # checks count
    user = options.pop("init_script", None)
    extra = Path(user).read_text() if user is not None else ""
    booted: list[runner.RunningGuest] = []
    with tempfile.TemporaryDirectory(prefix="vmishell-fleet-") as tmp:
        try:
            for k in range(first, first + count):
                script = Path(tmp) / f"scenario-{k}.sh"
                script.write_text(scenario(k) + extra)
                booted.append(runner.up(guest, f"{base}-{k}", init_script=script, **options))
        except BaseException:
            for running in booted:
                with contextlib.suppress(VmiError):
                    runner.down(running.name)
            raise
    return booted


__all__ = ["MAX_COUNT", "comm_of", "instance_names", "scenario", "up_fleet"]
