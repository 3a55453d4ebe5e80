"""`vmishell profile ...`: build a kernel profile from a kernel package, or show one.

Only vmishell errors leave these commands; the main CLI prints them as one line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from vmishell.symbols.sysmap import ESSENTIAL_DATA_SYMBOLS


class ProgressDisplay:
    """Progress on one line: a tqdm bar when tqdm is installed, else one line per stage.

    The bar's label is the current stage and its value that stage's fraction;
    a new stage resets it instead of opening another bar.
    """

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.stage: str | None = None
        self.bar: Any = None
        try:
            from tqdm import tqdm
        except ImportError:
            self._tqdm = None
        else:
            self._tqdm = tqdm

    def __call__(self, stage: str, fraction: float) -> None:
        if self._tqdm is None:
            if stage != self.stage:
                print(f"{stage} ...", file=self.stream, flush=True)
            self.stage = stage
            return
        if self.bar is None:
            self.bar = self._tqdm(
                total=100, file=self.stream, leave=False,
                bar_format="{desc:<30} {percentage:3.0f}%|{bar:30}| {elapsed}",
            )  # fmt: skip
        target = max(0, min(100, round(fraction * 100)))
        if stage != self.stage:
            self.stage = stage
            self.bar.set_description_str(stage, refresh=False)
            self.bar.n = 0
        if target != self.bar.n:
            self.bar.n = target
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cmd_build(args: argparse.Namespace) -> int:
    from vmishell.symbols.builder import build_profile

    started = time.monotonic()
    with ProgressDisplay() as progress:
        path = build_profile(
            Path(args.source),
            Path(args.output) if args.output else None,
            system_map=args.system_map,
            btf=args.btf,
            progress=None if args.quiet else progress,
        )
    size = path.stat().st_size
    print(f"{path}  ({size / 1e6:.1f} MB, {time.monotonic() - started:.1f} s)")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from vmishell.symbols.profile import load_profile

    profile = load_profile(Path(args.profile))
    names = profile.symbol_names()
    banner = profile.banner.decode("ascii", "replace").strip() if profile.banner else "(none)"
    missing = [n for n in ESSENTIAL_DATA_SYMBOLS if not profile.has_symbol(n)]
    lines = [
        f"profile      {profile.name}",
        f"file         {args.profile}",
        f"banner       {banner}",
        f"pointer size {profile.pointer_size} ({profile.pointer_size * 8}-bit, {profile.endian})",
        f"ISF format   {profile.format}",
        f"symbols      {len(names)}",
        f"types        {len(profile.type_names())}",
    ]
    if missing:
        lines.append(f"missing      {', '.join(missing)} (vmishell cannot walk processes)")
    print("\n".join(lines))
    return 0


def actions_of(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction | None:
    """The `profile` family's ACTION sub-parsers, for packages above this one that add
    actions (`vmishell.lab.fetch`: build from a target, fetch)."""
    parser = subparsers.choices.get("profile")
    return None if parser is None else parser.get_default("_profile_actions")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `profile` command family to the main `vmishell` parser."""
    parser = subparsers.add_parser("profile", help="build or inspect kernel profiles (ISF)")
    sub = parser.add_subparsers(dest="profile_command", metavar="ACTION", required=True)
    parser.set_defaults(_profile_actions=sub)

    p = sub.add_parser(
        "build",
        help="build a profile from a kernel .deb, vmlinuz/bzImage, Image or vmlinux, "
        "or carve it from a guest's memory (TARGET)",
        description="Types from BTF, symbols from System.map or the kernel's kallsyms. "
        "Given a target (lab:NAME, qmp:SOCKET, qemu:RAMFILE, a memory image), both are "
        "carved from guest memory and the profile is verified against the running kernel.",
    )
    p.add_argument("source", help="linux-image-*.deb, vmlinuz, Image, vmlinux, or a TARGET")
    p.add_argument(
        "-o", "--output",
        help="output file or folder (default: the built-profiles cache the finder searches)",
    )  # fmt: skip
    p.add_argument(
        "--system-map", metavar="F", help="System.map, or the kernel -dbg .deb holding it"
    )
    p.add_argument("--btf", metavar="F", help="detached BTF (pahole --btf_encode_detached)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("show", help="banner, pointer size and counts of a profile")
    p.add_argument("profile", help="profile file (.json, .json.xz, .json.gz)")
    p.set_defaults(func=_cmd_show)
