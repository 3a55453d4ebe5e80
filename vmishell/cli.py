"""The `vmishell` command: one sub-command family per area, each registered by its package."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from vmishell.errors import VmiError

#: Modules that each add a sub-command family with `register(subparsers)`.
COMMAND_MODULES = (
    "vmishell.lab.cli",
    "vmishell.symbols.cli",
    "vmishell.lab.fetch",
    "vmishell.frontends.cli",
    "vmishell.search.cli",
    "vmishell.fleet.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmishell",
        description="Look inside running virtual machines: lab guests, profiles, processes.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except VmiError as exc:
        # A message may quote guest output (a lab guest's serial console): escaped.
        from vmishell.frontends.text import safe_text

        print(f"vmishell: {safe_text(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
