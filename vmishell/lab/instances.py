"""Bookkeeping of lab instances: run directories, instance.json, liveness, cleanup.

An instance is a name, a run directory (sockets, serial log, pid file,
instance.json) and a RAM file in /dev/shm. A QEMU that crashed, or a host
that rebooted, leaves these behind; this module tells a live instance from
such leftovers (a pid can be reused, so the process must also be a QEMU that
mentions our run directory) and removes exactly one instance's files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from vmishell.errors import LabError, NoSuchInstance
from vmishell.lab.paths import ram_path, run_root
from vmishell.lab.qemucmd import LaunchFiles

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(name: str) -> str:
    """Instance names become file names: keep them short and shell-safe."""
    if not _NAME.match(name):
        raise LabError(
            f"invalid instance name {name!r}: use letters, digits, '.', '_' or '-' "
            "(at most 64 characters, starting with a letter or digit)"
        )
    return name


def files_for(name: str) -> LaunchFiles:
    return LaunchFiles(run_dir=run_root() / check_name(name), ram_path=ram_path(name))


def read_record(files: LaunchFiles) -> dict[str, Any] | None:
    """instance.json of an instance, or None if absent or unreadable."""
    try:
        record = json.loads(files.instance_json.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def write_record(files: LaunchFiles, record: dict[str, Any]) -> None:
    tmp = files.instance_json.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(files.instance_json)


def read_pid(files: LaunchFiles) -> int | None:
    """The QEMU pid from the pid file, else from instance.json."""
    try:
        return int(files.pidfile.read_text().strip())
    except (OSError, ValueError):
        pass
    record = read_record(files)
    pid = record.get("pid") if record else None
    return pid if isinstance(pid, int) else None


def pid_alive(pid: int | None, run_dir: Path | None = None) -> bool:
    """Whether `pid` is a live (non-zombie) process, and ours when `run_dir` is given.

    A daemonized QEMU is not our child, so a dead one may linger as a zombie
    under a non-reaping init: the state letter in /proc/PID/stat decides.
    """
    if not pid or pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    if state in ("Z", "X"):
        return False
    if run_dir is not None:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            return False
        if str(run_dir).encode() not in cmdline:
            return False  # the pid was reused by an unrelated process
    return True


def remove_files(files: LaunchFiles) -> list[str]:
    """Delete the instance's run directory and RAM file; return what was removed."""
    removed = []
    if files.run_dir.exists():
        shutil.rmtree(files.run_dir, ignore_errors=True)
        removed.append(str(files.run_dir))
    try:
        files.ram_path.unlink()
        removed.append(str(files.ram_path))
    except FileNotFoundError:
        pass
    return removed


def known_names() -> list[str]:
    """Names of every instance that has a run directory (live or stale)."""
    root = run_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _NAME.match(p.name))


def leftovers(files: LaunchFiles) -> bool:
    """Whether anything of an instance exists on disk."""
    return files.run_dir.exists() or files.ram_path.exists()


def kill(pid: int, sig: int) -> bool:
    """Send a signal; False when the process is already gone."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def live_record(name: str) -> dict[str, Any]:
    """The record of running instance `name`: NoSuchInstance if there is none, LabError if
    its QEMU is gone. Light on imports, so attaching to a lab guest stays fast."""
    files = files_for(name)
    record = read_record(files)
    if record is None or record.get("pid") is None:
        names = known_names()
        hint = f" (known: {', '.join(names)})" if names else " (none is running)"
        raise NoSuchInstance(f"no lab instance named {name!r}{hint}")
    if not pid_alive(int(record["pid"]), files.run_dir):
        raise LabError(
            f"lab instance {name!r} is not running (QEMU pid {record['pid']} is gone); "
            f"`vmishell lab down {name}` cleans up"
        )
    return record
