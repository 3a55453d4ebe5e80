"""`vmishell ps | maps | peek | translate TARGET`: the Session API on the command line.

Each command prints a table for people, or with `--json` / `--csv` records for
programs. Guest strings stay data in every form: the table and CSV show each
one through `safe_cell` (control, bidi and invisible characters, tabs and
newlines as visible escapes: one row per line, nothing raw reaches a
terminal); JSON keeps them exact and escapes every non-ASCII or control
character as `\\uXXXX` (ASCII output).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from typing import Any

from vmishell.frontends.text import flag_names, hexdump, safe_cell, walk_table

#: Help of the thread option, shared with %ps: the default is the one `ps` has.
THREADS_HELP = "one row per thread, like ps -eL (default: one row per process, like ps)"


def _int(text: str) -> int:
    return int(text, 0)


def _session(args: argparse.Namespace):
    from vmishell.session import Session

    return Session.attach(args.target, profile=args.profile)


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "target", help="lab:NAME, a running lab guest's name, qemu:RAM[,QMP] or an image"
    )
    p.add_argument("--profile", help="ISF profile to use instead of finding one by banner")


def _format(args: argparse.Namespace) -> str:
    """ "json", "csv" or "table" (a Namespace built without the option prints the table)."""
    return getattr(args, "format", None) or "table"


def _add_format(p: argparse.ArgumentParser, *, with_csv: bool = True) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--json",
        dest="format",
        action="store_const",
        const="json",
        help="a JSON array of records (guest strings exact, escaped as JSON)",
    )
    if with_csv:
        group.add_argument(
            "--csv",
            dest="format",
            action="store_const",
            const="csv",
            help="CSV with a header row (guest strings escaped as in the table)",
        )


def print_json(records: Iterable[dict[str, Any]] | dict[str, Any]) -> None:
    """Records as one JSON array (one record per line), or one JSON object; ASCII only."""
    if isinstance(records, dict):
        print(json.dumps(records, ensure_ascii=True))
        return
    lines = [json.dumps(r, ensure_ascii=True) for r in records]
    print("[\n" + ",\n".join(lines) + "\n]" if lines else "[]")


def print_csv(columns: Sequence[str], records: Iterable[dict[str, Any]]) -> None:
    """Records as CSV; every string cell through `safe_cell`, so one record is one line."""
    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow(columns)
    for r in records:
        out.writerow(
            [
                "" if r[c] is None else safe_cell(r[c]) if isinstance(r[c], str) else r[c]
                for c in columns
            ]
        )


def cmd_ps(args: argparse.Namespace) -> int:
    with _session(args) as s:
        rows = s.process_rows(threads=args.threads)
    fmt = _format(args)
    if fmt != "table":
        records = [asdict(r) for r in rows]
        if fmt == "json":
            print_json(records)
        else:
            print_csv(PS_COLUMNS, records)
        return 0
    header = ("PID", "PPID", "TGID", "UID", "S", "COMM", "COMMAND")
    # Each guest string is escaped on its own (before widths are measured), so a
    # name holding a newline or an escape sequence stays inside its cell; a row
    # vmishell could not trust says so after its command line.
    table = [header] + [
        (
            str(r.pid),
            str(r.ppid),
            str(r.tgid),
            str(r.uid),
            safe_cell(r.state),
            safe_cell(r.comm),
            safe_cell(r.cmdline or "") + (f"  !! {safe_cell(r.error)}" if r.error else ""),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        cells = [
            c.rjust(w) if i < 4 else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=False))
        ]
        print(" ".join([*cells, row[-1]]).rstrip())
    return 0


def cmd_maps(args: argparse.Namespace) -> int:
    with _session(args) as s:
        vmas = s.process(args.pid).vmas()
    fmt = _format(args)
    if fmt != "table":
        records = [
            {
                "start": v.start,
                "end": v.end,
                "perms": v.perms,
                "offset": v.offset,
                "device": v.device,
                "inode": v.inode,
                "path": v.path,
                "error": v.error,
            }
            for v in vmas
        ]
        if fmt == "json":
            print_json(records)
        else:
            print_csv(MAPS_COLUMNS, records)
        return 0
    for v in vmas:
        note = f"  !! {safe_cell(v.error)}" if v.error else ""
        print(
            f"{v.start:08x}-{v.end:08x} {v.perms} {v.offset:08x} {safe_cell(v.device)} "
            f"{v.inode:<10d} {safe_cell(v.path)}{note}"
        )
    return 0


def cmd_peek(args: argparse.Namespace) -> int:
    with _session(args) as s:
        addr = args.address if isinstance(args.address, int) else s.symbol(args.address)
        data = s.process(args.pid).read(addr, args.length, pad=args.pad)
    if _format(args) == "json":
        print_json({"pid": args.pid, "address": addr, "length": len(data), "hex": data.hex()})
    else:
        print(hexdump(data, addr))
    return 0


def cmd_translate(args: argparse.Namespace) -> int:
    with _session(args) as s:
        walk = s.process(args.pid).walk(args.address)
    fmt = _format(args)
    steps = [
        {
            "level": step.level,
            "table": step.table,
            "index": step.index,
            "entry_address": step.entry_address,
            "entry": step.entry,
            "present": step.present,
            "flags": flag_names(step.flags) if step.present else "",
            "leaf": step.leaf,
            "target": step.target,
            "page_size": step.page_size,
        }
        for step in walk.steps
    ]
    t = walk.translation
    if fmt == "json":
        print_json(
            {
                "pid": args.pid,
                "vaddr": walk.vaddr,
                "steps": steps,
                "paddr": None if t is None else t.paddr,
                "page_size": None if t is None else t.page_size,
                "fault": None if walk.fault is None else str(walk.fault),
            }
        )
    elif fmt == "csv":
        print_csv(WALK_COLUMNS, steps)
    else:
        print(walk_table(walk))
    return 0 if t is not None else 1


PS_COLUMNS = (
    "pid",
    "tgid",
    "ppid",
    "comm",
    "state",
    "uid",
    "gid",
    "start_time",
    "kernel_thread",
    "dtb",
    "task",
    "cmdline",
    "error",
)
MAPS_COLUMNS = ("start", "end", "perms", "offset", "device", "inode", "path", "error")
WALK_COLUMNS = (
    "level",
    "table",
    "index",
    "entry_address",
    "entry",
    "present",
    "flags",
    "leaf",
    "target",
    "page_size",
)


def _address(text: str) -> int | str:
    try:
        return int(text, 0)
    except ValueError:
        return text


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ps",
        help="list a guest's processes (one row per process, like ps; --threads: per thread)",
    )
    _add_target(p)
    p.add_argument("--threads", action="store_true", help=THREADS_HELP)
    _add_format(p)
    p.set_defaults(func=cmd_ps)

    p = sub.add_parser("maps", help="a process's memory map, like /proc/PID/maps")
    _add_target(p)
    p.add_argument("-p", "--pid", type=_int, required=True)
    _add_format(p)
    p.set_defaults(func=cmd_maps)

    p = sub.add_parser("peek", help="hex dump of guest virtual memory")
    _add_target(p)
    p.add_argument("address", type=_address, help="address or kernel symbol")
    p.add_argument("length", type=_int, nargs="?", default=64)
    p.add_argument("-p", "--pid", type=_int, default=0, help="process (0: kernel)")
    p.add_argument("--pad", action="store_true", help="read unmapped pages as zeros")
    _add_format(p, with_csv=False)
    p.set_defaults(func=cmd_peek)

    p = sub.add_parser("translate", help="page walk of a virtual address, level by level")
    _add_target(p)
    p.add_argument("address", type=_int)
    p.add_argument("-p", "--pid", type=_int, default=0)
    _add_format(p)
    p.set_defaults(func=cmd_translate)


if __name__ == "__main__":
    sys.exit(0)
