"""A snapshot of what a guest runs: processes, threads, credentials, memory maps, page hashes.

`s.snapshot()` records tables that `diff()` compares: a process that
appeared, a uid that became 0, a new writable-and-executable mapping, a
library page whose bytes changed. Snapshots save to one gzipped JSON file
(data only: loading one never runs code) so an image taken yesterday can
be compared with the live guest today. Rows are bounded by
`Limits.max_snapshot_rows`, the bound named in the error.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vmishell.errors import GuestDataError, SymbolNotFound, VmiError

if TYPE_CHECKING:
    import pandas as pd

    from vmishell.session import Session

FORMAT = "vmishell-snapshot/1"
PROCESS_FIELDS = [
    "pid", "tgid", "ppid", "comm", "uid", "gid", "euid", "egid", "start_time",
    "kernel_thread", "cmdline",
]  # fmt: skip
THREAD_FIELDS = ["pid", "tgid", "comm", "uid", "euid", "start_time"]
MAP_FIELDS = ["pid", "start", "end", "perms", "offset", "inode", "path"]
HASH_FIELDS = ["pid", "path", "offset", "vaddr", "sha256"]
PAGE = 0x1000


@dataclass
class Snapshot:
    """Tables of one moment of a guest (lists of dicts; `frame(name)` for a DataFrame)."""

    target: str
    taken: float
    processes: list[dict[str, Any]] = field(default_factory=list)
    threads: list[dict[str, Any]] = field(default_factory=list)
    maps: list[dict[str, Any]] = field(default_factory=list)
    hashes: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def frame(self, name: str) -> pd.DataFrame:
        import pandas as pd

        from vmishell.frontends.frames import guest_frame

        columns = {
            "processes": PROCESS_FIELDS,
            "threads": THREAD_FIELDS,
            "maps": MAP_FIELDS,
            "hashes": HASH_FIELDS,
        }[name]
        hex_cols = [c for c in ("start", "end", "offset", "vaddr") if c in columns]
        return guest_frame(pd.DataFrame(getattr(self, name), columns=columns), hex=hex_cols)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the snapshot as gzipped JSON."""
        doc = {"format": FORMAT, **{k: getattr(self, k) for k in _KEYS}}
        with gzip.open(path, "wt", encoding="utf-8") as out:
            json.dump(doc, out)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Snapshot:
        """Read a snapshot written by `save` (any other file is a VmiError)."""
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError, EOFError) as exc:
            raise VmiError(f"{os.fspath(path)}: not a vmishell snapshot ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise VmiError(f"{os.fspath(path)}: not a vmishell snapshot ({FORMAT})")
        try:
            return cls(**{k: doc[k] for k in _KEYS})
        except (KeyError, TypeError) as exc:
            raise VmiError(f"{os.fspath(path)}: incomplete snapshot ({exc})") from None

    def __repr__(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.taken))
        return (
            f"<Snapshot of {self.target} at {when}: {len(self.processes)} processes, "
            f"{len(self.threads)} threads, {len(self.maps)} mappings, {len(self.hashes)} hashes>"
        )


_KEYS = ("target", "taken", "processes", "threads", "maps", "hashes", "problems")


class _Rows:
    """Counts rows against Limits.max_snapshot_rows."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int = 1) -> None:
        self.used += n
        if self.used > self.limit:
            raise GuestDataError(
                f"snapshot holds more than {self.limit} rows (Limits.max_snapshot_rows)"
            )


def take(
    session: Session, *, maps: bool = True, hashes: bool | str = False, cmdline: bool = True
) -> Snapshot:
    """Record processes, threads and credentials, memory maps and, with `hashes`, a SHA-256
    of every mapped page of executable file mappings ("exec"), or of every mapping whose
    path contains the given text."""
    session._begin()
    rows = _Rows(session.limits.max_snapshot_rows)
    snap = Snapshot(session.name, time.time())
    effective = _effective_creds(session)
    leaders = {r.pid: r for r in session.process_rows(threads=False, cmdline=cmdline)}
    for task in session.tasks():
        rows.take()
        euid, egid = effective(task.address)
        if task.is_thread_group_leader:
            row = leaders.get(task.pid)
            snap.processes.append(
                {
                    "pid": task.pid,
                    "tgid": task.tgid,
                    "ppid": task.ppid,
                    "comm": task.comm,
                    "uid": task.uid,
                    "gid": task.gid,
                    "euid": euid,
                    "egid": egid,
                    "start_time": task.start_time,
                    "kernel_thread": task.kernel_thread,
                    "cmdline": row.cmdline if row is not None else None,
                }
            )
        snap.threads.append(
            {
                "pid": task.pid,
                "tgid": task.tgid,
                "comm": task.comm,
                "uid": task.uid,
                "euid": euid,
                "start_time": task.start_time,
            }
        )
    if maps or hashes:
        _maps(session, snap, rows, hashes)
    return snap


def _effective_creds(session: Session) -> Any:
    """task address -> (euid, egid) from task->cred, or (-1, -1) when unreadable."""
    profile = session.profile
    kernel = session.process(0)
    try:
        cred = profile.offset_of("task_struct", "cred")
        euid = profile.offset_of("cred", "euid")
        egid = profile.offset_of("cred", "egid")
    except SymbolNotFound:
        return lambda _task: (-1, -1)
    ptr = profile.pointer_size
    read = kernel.space.read

    def creds(task: int) -> tuple[int, int]:
        try:
            at = int.from_bytes(read(task + cred, ptr), "little")
            return (
                int.from_bytes(read(at + euid, 4), "little"),
                int.from_bytes(read(at + egid, 4), "little"),
            )
        except VmiError:
            return (-1, -1)

    return creds


def _maps(session: Session, snap: Snapshot, rows: _Rows, hashes: bool | str) -> None:
    from vmishell.search.regions import user_processes

    for process in user_processes(session, None):
        try:
            vmas = process.vmas()
        except VmiError as exc:
            snap.problems.append(f"pid {process.pid}: {exc}")
            continue
        for v in vmas:
            rows.take()
            snap.maps.append(
                {
                    "pid": process.pid,
                    "start": v.start,
                    "end": v.end,
                    "perms": v.perms,
                    "offset": v.offset,
                    "inode": v.inode,
                    "path": v.path,
                }
            )
            if hashes and _wanted(v.perms, v.path, hashes):
                _hash_pages(process, v, snap, rows)


def _wanted(perms: str, path: str, hashes: bool | str) -> bool:
    if isinstance(hashes, str) and hashes != "exec":
        return hashes in path
    return "x" in perms and path.startswith("/")


def _hash_pages(process: Any, vma: Any, snap: Snapshot, rows: _Rows) -> None:
    """One SHA-256 per mapped page of the VMA (pages not present are left out)."""
    source = process.session.source
    try:
        runs = list(process.mappings(vma.start, vma.end))
    except VmiError as exc:
        snap.problems.append(f"pid {process.pid} {vma.path}: {exc}")
        return
    for m in runs:
        for off in range(0, m.size, PAGE):
            rows.take()
            vaddr = m.vaddr + off
            try:
                data = source.read(m.paddr + off, PAGE)
            except VmiError:
                continue
            snap.hashes.append(
                {
                    "pid": process.pid,
                    "path": vma.path,
                    "offset": vma.offset + (vaddr - vma.start),
                    "vaddr": vaddr,
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            )


__all__ = ["Snapshot", "take"]
