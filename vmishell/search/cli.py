"""`vmishell search TARGET PATTERN`: the search API on the command line.

The table, CSV and JSON forms show matched bytes and context escaped
(`\\xNN` for anything but printable ASCII), so a guest cannot write to
the terminal through a hit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from vmishell.search.engine import META_KEY, SEARCH_COLUMNS, escape

KINDS = ("text", "bytes", "hex", "regex", "yara")


def _int(text: str) -> int:
    return int(text, 0)


def add_pattern_options(p: argparse.ArgumentParser) -> None:
    """The options %search and `vmishell search` share."""
    p.add_argument(
        "pattern",
        help="what to find: text (default), hex bytes with ?? wildcards (--hex), a regex "
        "(--regex) or YARA rules (--yara: rule text or a .yar file)",
    )
    kinds = p.add_mutually_exclusive_group()
    for kind in KINDS[1:]:
        kinds.add_argument(
            f"--{kind}", dest="kind", action="store_const", const=kind, help=f"PATTERN is {kind}"
        )
    p.add_argument("--encoding", default="utf-8", help="encoding of a text pattern (utf-8)")
    p.add_argument(
        "-p", "--pid", type=_int, action="append", dest="pids", help="only this pid (repeatable)"
    )
    p.add_argument("--kernel", action="store_true", help="the kernel's mappings too")
    p.add_argument("--physical", action="store_true", help="all of RAM, mapped or not")
    p.add_argument("--max-hits", type=_int, default=None, help="stop after this many hits")
    p.add_argument("--context", type=_int, default=16, help="bytes of context each side (16)")


def pattern_of(args: argparse.Namespace) -> tuple[Any, str]:
    """(pattern, kind) from parsed options: a bytes value for --bytes, file text for --yara FILE."""
    kind = args.kind or "text"
    pattern: Any = args.pattern
    if kind == "bytes":
        pattern = pattern.encode("utf-8").decode("unicode_escape").encode("latin-1")
    elif kind == "yara" and "{" not in pattern and Path(pattern).is_file():
        pattern = Path(pattern).read_text()
    return pattern, kind


def run_search(session: Any, args: argparse.Namespace) -> Any:
    pattern, kind = pattern_of(args)
    options = {
        "kind": kind,
        "encoding": args.encoding,
        "max_hits": args.max_hits,
        "context": args.context,
    }
    if args.physical:
        return session.physical.search(pattern, **options)
    return session.search(pattern, pids=args.pids, kernel=args.kernel, **options)


def _records(df: Any) -> list[dict[str, Any]]:
    out = []
    for row in df.itertuples(index=False):
        r = dict(zip(SEARCH_COLUMNS, row, strict=True))
        r["match"] = escape(r["match"])
        for key, value in r.items():
            if value is not None and not isinstance(value, str | int):
                r[key] = None if value != value else int(value)  # NaN -> None
        out.append(r)
    return out


def cmd_search(args: argparse.Namespace) -> int:
    from vmishell.frontends.cli import _format, print_csv, print_json
    from vmishell.frontends.text import safe_cell
    from vmishell.session import Session

    with Session.attach(args.target, profile=args.profile) as s:
        df = run_search(s, args)
    records = _records(df)
    fmt = _format(args)
    if fmt == "json":
        print_json(records)
    elif fmt == "csv":
        print_csv(SEARCH_COLUMNS, records)
    else:
        for r in records:
            pid = "-" if r["pid"] is None else str(r["pid"])
            vaddr = "-" if r["vaddr"] is None else f"{r['vaddr']:#x}"
            print(
                f"{pid:>6} {safe_cell(r['comm']):<15} {vaddr:>18} {r['paddr']:#12x} "
                f"{r['perms'] or '':4} {safe_cell(r['rule'])}  {r['context']}  "
                f"{safe_cell(r['path'] or '')}".rstrip()
            )
    meta = df.attrs.get(META_KEY, {})
    for problem in meta.get("problems", []):
        print(f"vmishell search: {safe_cell(problem)}", file=sys.stderr)
    if meta.get("stopped"):
        print(f"vmishell search: {meta['stopped']}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from vmishell.frontends.cli import _add_format, _add_target

    p = sub.add_parser("search", help="find bytes, text, hex, regex or YARA hits in guest memory")
    _add_target(p)
    add_pattern_options(p)
    _add_format(p)
    p.set_defaults(func=cmd_search)


__all__ = ["add_pattern_options", "cmd_search", "pattern_of", "register", "run_search"]
