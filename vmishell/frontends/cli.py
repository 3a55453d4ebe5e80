"""`vmishell ps | maps | peek | translate TARGET`: the Session API on the command line."""

from __future__ import annotations

import argparse
import sys

from vmishell.frontends.text import hexdump, safe_cell, walk_table


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


def cmd_ps(args: argparse.Namespace) -> int:
    with _session(args) as s:
        rows = s.process_rows(threads=args.threads)
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
        for v in s.process(args.pid).vmas():
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
    print(hexdump(data, addr))
    return 0


def cmd_translate(args: argparse.Namespace) -> int:
    with _session(args) as s:
        walk = s.process(args.pid).walk(args.address)
    print(walk_table(walk))
    return 0 if walk.translation is not None else 1


def _address(text: str) -> int | str:
    try:
        return int(text, 0)
    except ValueError:
        return text


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ps", help="list a guest's processes")
    _add_target(p)
    p.add_argument("--threads", action="store_true", help="one row per thread")
    p.set_defaults(func=cmd_ps)

    p = sub.add_parser("maps", help="a process's memory map, like /proc/PID/maps")
    _add_target(p)
    p.add_argument("-p", "--pid", type=_int, required=True)
    p.set_defaults(func=cmd_maps)

    p = sub.add_parser("peek", help="hex dump of guest virtual memory")
    _add_target(p)
    p.add_argument("address", type=_address, help="address or kernel symbol")
    p.add_argument("length", type=_int, nargs="?", default=64)
    p.add_argument("-p", "--pid", type=_int, default=0, help="process (0: kernel)")
    p.add_argument("--pad", action="store_true", help="read unmapped pages as zeros")
    p.set_defaults(func=cmd_peek)

    p = sub.add_parser("translate", help="page walk of a virtual address, level by level")
    _add_target(p)
    p.add_argument("address", type=_int)
    p.add_argument("-p", "--pid", type=_int, default=0)
    p.set_defaults(func=cmd_translate)


if __name__ == "__main__":
    sys.exit(0)
