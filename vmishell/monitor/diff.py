"""What changed between two snapshots, one row per fact.

Processes and threads are keyed by (pid, start time), so a reused pid is
one process gone and another new. Mappings are keyed by where and how they
map (start, end, perms, path): a permission change shows as the old
mapping gone and the new one there. Page hashes are keyed by process,
file and offset. `note` flags what a hunter looks for first: a uid or
euid that became 0, a writable-and-executable mapping, a changed page of
executable code.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from vmishell.monitor.snapshot import PROCESS_FIELDS, Snapshot

if TYPE_CHECKING:
    import pandas as pd

DIFF_COLUMNS = ["kind", "change", "pid", "comm", "what", "field", "old", "new", "note"]
#: Process fields compared (the key fields pid and start_time are not).
_COMPARED = [f for f in PROCESS_FIELDS if f not in ("pid", "start_time")]


def _by(rows: Iterable[dict[str, Any]], *keys: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    return {tuple(r[k] for k in keys): r for r in rows}


def as_snapshot(value: Snapshot | str | os.PathLike[str]) -> Snapshot:
    """A Snapshot, or one loaded from a file `Snapshot.save` wrote."""
    return value if isinstance(value, Snapshot) else Snapshot.load(value)


def diff(
    before: Snapshot | str | os.PathLike[str], after: Snapshot | str | os.PathLike[str]
) -> pd.DataFrame:
    """Rows of DIFF_COLUMNS: what appeared, disappeared or changed from `before` to `after`."""
    import pandas as pd

    from vmishell.frontends.frames import guest_frame

    before, after = as_snapshot(before), as_snapshot(after)
    out: list[tuple[Any, ...]] = []
    old_p = _by(before.processes, "pid", "start_time")
    new_p = _by(after.processes, "pid", "start_time")
    comm = {r["pid"]: r["comm"] for r in [*before.processes, *after.processes]}
    for key in sorted(new_p.keys() - old_p.keys()):
        r = new_p[key]
        out.append(("process", "appeared", r["pid"], r["comm"], r["cmdline"] or "", "", "", "", ""))
    for key in sorted(old_p.keys() - new_p.keys()):
        r = old_p[key]
        out.append(
            ("process", "disappeared", r["pid"], r["comm"], r["cmdline"] or "", "", "", "", "")
        )
    for key in sorted(old_p.keys() & new_p.keys()):
        a, b = old_p[key], new_p[key]
        for f in _COMPARED:
            if a.get(f) != b.get(f):
                note = "became root" if f in ("uid", "euid") and b[f] == 0 else ""
                out.append(("process", "changed", b["pid"], b["comm"], "", f, a[f], b[f], note))
    old_t = _by(before.threads, "pid", "start_time")
    new_t = _by(after.threads, "pid", "start_time")
    for key in sorted(new_t.keys() - old_t.keys()):
        r = new_t[key]
        if r["pid"] != r["tgid"]:
            out.append(
                ("thread", "appeared", r["pid"], r["comm"], f"of {r['tgid']}", "", "", "", "")
            )
    for key in sorted(old_t.keys() & new_t.keys()):
        a, b = old_t[key], new_t[key]
        if a["pid"] != a["tgid"]:
            for f in ("uid", "euid"):
                if a[f] != b[f]:
                    note = "became root" if b[f] == 0 else ""
                    out.append(("thread", "changed", b["pid"], b["comm"], "", f, a[f], b[f], note))
    mkeys = ("pid", "start", "end", "perms", "path")
    old_m = _by(before.maps, *mkeys) if before.maps else {}
    new_m = _by(after.maps, *mkeys)
    alive = {k[0] for k in new_p} & {k[0] for k in old_p}
    for key in sorted(new_m.keys() - old_m.keys(), key=_sortable):
        if key[0] not in alive or not before.maps:
            continue  # a new process's maps are new by definition
        r = new_m[key]
        note = "writable and executable" if "w" in r["perms"] and "x" in r["perms"] else ""
        out.append(
            ("mapping", "appeared", r["pid"], comm.get(r["pid"], ""), _where(r), "", "", "", note)
        )
    for key in sorted(old_m.keys() - new_m.keys(), key=_sortable):
        if key[0] not in alive:
            continue
        r = old_m[key]
        out.append(
            ("mapping", "disappeared", r["pid"], comm.get(r["pid"], ""), _where(r), "", "", "", "")
        )
    old_h = _by(before.hashes, "pid", "path", "offset")
    new_h = _by(after.hashes, "pid", "path", "offset")
    for key in sorted(old_h.keys() & new_h.keys(), key=_sortable):
        a, b = old_h[key], new_h[key]
        if a["sha256"] != b["sha256"]:
            what = f"{b['path']} +{b['offset']:#x} at {b['vaddr']:#x}"
            row = ("page", "changed", b["pid"], comm.get(b["pid"], ""), what, "sha256")
            out.append((*row, a["sha256"][:16], b["sha256"][:16], "executable page changed"))
    df = pd.DataFrame(out, columns=DIFF_COLUMNS)
    return guest_frame(df)


def _sortable(key: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple("" if v is None else v for v in key)


def _where(r: dict[str, Any]) -> str:
    return f"{r['start']:#x}-{r['end']:#x} {r['perms']} {r['path']}".rstrip()


__all__ = ["DIFF_COLUMNS", "as_snapshot", "diff"]
