"""`vmishell fleet ps|search|maps|run TARGET...`: a Fleet sweep on the command line.

Thin: parse, build a `Fleet`, print its frame (table, JSON or CSV, guest
strings escaped as in `vmishell ps`), and the targets that failed on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import json
import runpy
import sys
from typing import Any

from vmishell.fleet.errors import FleetError


def _fleet(args: argparse.Namespace) -> Any:
    from vmishell.fleet import Fleet

    return Fleet(
        args.targets,
        args.scheduler,
        n_workers=args.workers,
        profile=args.profile,
        timeout=args.timeout,
        progress=False if args.quiet else None,
    )


def load_function(ref: str) -> Any:
    """`package.module:function` or `path/to/file.py:function` (the function a target gets)."""
    where, _, name = ref.rpartition(":")
    if not where or not name:
        raise FleetError(f"name the function as MODULE:FUNCTION or FILE.py:FUNCTION, not {ref!r}")
    try:
        if where.endswith(".py"):
            namespace = runpy.run_path(where)
            return namespace[name]
        return getattr(importlib.import_module(where), name)
    except (ImportError, OSError, KeyError, AttributeError) as exc:
        raise FleetError(f"cannot load {ref}: {exc}") from exc


def _print(df: Any, fmt: str) -> None:
    from vmishell.frontends.cli import print_csv, print_json
    from vmishell.frontends.frames import frame_text

    if fmt == "table":
        import pandas as pd

        with pd.option_context("display.max_rows", None, "display.width", 200):
            print(frame_text(df))
        return
    records = json.loads(df.to_json(orient="records", default_handler=str))
    if fmt == "json":
        print_json(records)
    else:
        print_csv([str(c) for c in df.columns], records)


def _report(fleet: Any) -> int:
    from vmishell.frontends.text import safe_cell

    for row in fleet.errors.itertuples(index=False):
        print(f"vmishell fleet: {safe_cell(row.target)}: {row.error_type}: "
              f"{safe_cell(str(row.error))}", file=sys.stderr)  # fmt: skip
    for row in fleet.notes.itertuples(index=False):
        print(f"vmishell fleet: {safe_cell(row.target)}: {safe_cell(row.note)}", file=sys.stderr)
    return 1 if len(fleet.errors) == len(fleet.timings) else 0


def cmd_fleet(args: argparse.Namespace) -> int:
    with _fleet(args) as fleet:
        if args.fleet_command == "ps":
            df = fleet.processes(threads=args.threads)
        elif args.fleet_command == "maps":
            df = fleet.maps(int(args.process) if args.process.isdigit() else args.process)
        elif args.fleet_command == "search":
            from vmishell.search.cli import pattern_of

            pattern, kind = pattern_of(args)
            df = fleet.search(
                pattern,
                kind=kind,
                encoding=args.encoding,
                max_hits=args.max_hits,
                context=args.context,
                pids=args.pids,
                kernel=args.kernel,
                physical=args.physical,
            )
        else:
            df = fleet.run(load_function(args.function))
        _print(df, getattr(args, "format", None) or "table")
        return _report(fleet)


def _common(p: argparse.ArgumentParser) -> None:
    from vmishell.frontends.cli import _add_format

    p.add_argument("targets", nargs="+", metavar="TARGET", help="lab:NAME, qmp:..., images, globs")
    p.add_argument("--scheduler", help="Dask scheduler address (default: a local cluster)")
    p.add_argument("--workers", type=int, help="workers of the local cluster (default: cores)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per target (600)")
    p.add_argument("--profile", help="ISF profile for every target (a path on the workers)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_format(p)
    p.set_defaults(func=cmd_fleet)


def register(sub: argparse._SubParsersAction) -> None:
    fleet = sub.add_parser("fleet", help="ask many guests and images at once (on Dask)")
    actions = fleet.add_subparsers(dest="fleet_command", metavar="ACTION", required=True)
    p = actions.add_parser("ps", help="processes of every target")
    p.add_argument("--threads", action="store_true", help="one row per thread")
    _common(p)
    p = actions.add_parser("maps", help="memory maps of a pid or comm on every target")
    p.add_argument("process", help="a pid, or a comm (every process of that name)")
    _common(p)
    p = actions.add_parser("search", help="search every target's memory")
    from vmishell.search.cli import add_pattern_options

    add_pattern_options(p)
    _common(p)
    p = actions.add_parser("run", help="MODULE:FUNCTION(session) on every target")
    p.add_argument("function", help="MODULE:FUNCTION or FILE.py:FUNCTION")
    _common(p)


__all__ = ["cmd_fleet", "load_function", "register"]
