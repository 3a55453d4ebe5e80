"""`vmishell profile build TARGET` and `vmishell profile fetch TARGET`.

`build` on a target (a live guest, `qmp:`, `qemu:`, a memory image) carves
the profile from guest memory and verifies it against the running kernel
before writing it. `fetch` is the route for kernels without BTF (Debian's
i386 kernels, older ones): it reads the kernel's banner from memory, finds
the very package the banner names in the Debian archive through the lab's
private apt state, builds the profile from it (with the -dbg package through
pahole where the image lacks BTF, as the lab does) and verifies it against
the guest. A package of another version is used only when asked
(`--near-match`), with a warning, and only if the verification passes.

These commands live in the lab package because they need the lab's apt
machinery and the session (layers above `vmishell.symbols`); they join the
`profile` family that `vmishell.symbols.cli` registers.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmishell.errors import LabError, ProfileError, VmiError
from vmishell.limits import Limits
from vmishell.os.linux.guest import LinuxGuest
from vmishell.session import Session
from vmishell.sources.base import PhysicalSource
from vmishell.symbols.finder import banners_in
from vmishell.symbols.verify import verify_profile

#: Debian kernel flavour suffix -> Debian architecture of its packages.
FLAVOUR_ARCH = (
    ("-686-pae", "i386"),
    ("-686", "i386"),
    ("-amd64", "amd64"),
    ("-arm64", "arm64"),
    ("-arm64-16k", "arm64"),
)


class _SourceOnly(Session):
    """Session.attach's target parsing, stopping once the memory source is open."""

    def __init__(self, source: PhysicalSource, profile: Any = None, **_: Any) -> None:
        self.source = source


def open_target(target: str) -> PhysicalSource:
    """The physical memory of any target string Session.attach accepts (lab ones too)."""
    name = target.removeprefix("lab:")
    if target.startswith("lab:") or not (":" in target or Path(target).exists()):
        from vmishell.lab.guests import get_guest
        from vmishell.lab.instances import live_record

        record = live_record(name)
        if record.get("ram_path") is None:
            raise LabError(f"lab instance {name} keeps its RAM in QEMU: use its qmp: target")
        return _SourceOnly.qemu(
            record["ram_path"], record["qmp_path"], machine=get_guest(record["guest"]).machine,
            pid=int(record["pid"]),
        ).source  # fmt: skip
    return _SourceOnly.attach(target).source


@dataclass(frozen=True)
class KernelPackage:
    """The Debian package a banner names."""

    release: str
    debian_version: str
    debian_arch: str

    @property
    def package(self) -> str:
        return f"linux-image-{self.release}"


def package_of(banner: str) -> KernelPackage:
    """Release, Debian version and architecture from a Debian kernel's banner."""
    m = re.match(r"Linux version (\S+)", banner)
    versions = re.findall(r"\bDebian (\d\S*)", banner)
    if m is None or not versions:
        raise ProfileError(
            f"banner {banner[:80]!r} is not a Debian kernel's: cannot name its package"
        )
    release = m.group(1)
    for suffix, arch in FLAVOUR_ARCH:
        if release.endswith(suffix):
            return KernelPackage(release, versions[-1], arch)
    raise ProfileError(f"kernel {release}: no Debian architecture known for its flavour")


def fetch_profile(
    target: str,
    out: Path | None = None,
    *,
    near_match: bool = False,
    say: Any = print,
) -> tuple[Path, list[str]]:
    """Build the profile of the kernel in `target` from its package; verified. Returns
    (profile path, checks passed)."""
    from vmishell.lab.apt import PrivateApt
    from vmishell.lab.paths import cache_root
    from vmishell.lab.profiles import build_kernel_profile
    from vmishell.symbols.profile import load_profile

    source = open_target(target)
    try:
        found = banners_in(source)
        if not found:
            raise ProfileError(f"no Linux banner in {source.description}")
        wanted = package_of(found[0][1])
        root = cache_root()
        apt = PrivateApt(wanted.debian_arch, root / "apt" / wanted.debian_arch, say)
        version = wanted.debian_version
        try:
            deb = apt.download(wanted.package, version, root / "debs" / wanted.debian_arch)
        except LabError as exc:
            latest = apt.resolve(wanted.package)
            if not near_match:
                raise ProfileError(
                    f"the archive has no {wanted.package} {version} (the guest's build): "
                    f"{str(exc).splitlines()[0]}. Its candidate is {latest}: pass --near-match "
                    "to try it (it is verified against the guest, never used silently)"
                ) from exc
            say(f"warning: {wanted.package} {version} is gone; trying {latest}, a near match")
            version = latest
            deb = apt.download(wanted.package, version, root / "debs" / wanted.debian_arch)
        say(f"building the profile from {deb.name}")
        path = build_kernel_profile(wanted.debian_arch, wanted.package, version, deb, out, say)
        profile = load_profile(path)
        guest = LinuxGuest(source, profile, Limits())
        checks = verify_profile(guest)
    except VmiError:
        source.close()
        raise
    source.close()
    return path, checks


def cmd_fetch(args: argparse.Namespace) -> int:
    started = time.monotonic()
    say = (lambda _m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    path, checks = fetch_profile(
        args.target, Path(args.output) if args.output else None,
        near_match=args.near_match, say=say,
    )  # fmt: skip
    print(f"{path}  ({time.monotonic() - started:.1f} s; verified: {'; '.join(checks)})")
    return 0


def _looks_like_kernel_file(text: str) -> bool:
    """A .deb, vmlinux (ELF, not a core), bzImage or arm64 Image: build from it."""
    path = Path(text)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        head = f.read(0x240)
    if head.startswith(b"!<arch>\n"):
        return True
    if head.startswith(b"\x7fELF"):
        e_type = int.from_bytes(head[16:18], "little" if head[5] == 1 else "big")
        return e_type != 4  # ET_CORE is a memory dump
    return head[0x202:0x206] == b"HdrS" or head[0x38:0x3C] == b"ARM\x64"


def cmd_build(args: argparse.Namespace) -> int:
    """`profile build SOURCE`: a kernel file as before, else carve from the target."""
    from vmishell.symbols import cli as symbols_cli

    if _looks_like_kernel_file(args.source):
        return symbols_cli._cmd_build(args)
    from vmishell.symbols.builder import output_path
    from vmishell.symbols.carve import carve_kernel, carved_isf
    from vmishell.symbols.isf_build import write_isf
    from vmishell.symbols.locations import carved_dir
    from vmishell.symbols.profile import Profile

    started = time.monotonic()
    source = open_target(args.source)
    try:
        try:
            carved = carve_kernel(source)
        except ProfileError as exc:
            if not Path(args.source).is_file():
                raise
            raise ProfileError(
                f"{args.source} is not a kernel image (.deb, vmlinux, bzImage, Image), "
                f"and as a memory image: {exc}"
            ) from exc
        isf = carved_isf(carved, args.source)
        profile = Profile.from_isf(isf, name=carved.filename())
        checks = verify_profile(LinuxGuest(source, profile, Limits()))
    finally:
        source.close()
    out = Path(args.output) if args.output else carved_dir()
    path = write_isf(isf, output_path(out, carved.filename()))
    took = time.monotonic() - started
    print(f"{path}  ({path.stat().st_size / 1e6:.1f} MB, {took:.1f} s; carved from "
          f"{args.source}, {carved.slide_from}; verified: {'; '.join(checks)})")  # fmt: skip
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Join the `profile` family: build from targets too, and fetch."""
    from vmishell.symbols.cli import actions_of

    actions = actions_of(subparsers)
    if actions is None:
        return
    actions.choices["build"].set_defaults(func=cmd_build)
    p = actions.add_parser(
        "fetch",
        help="build the profile of a guest's kernel from its Debian package (kernels without BTF)",
        description="Reads the banner from the target, downloads that kernel's package "
        "(and -dbg package without BTF) and builds and verifies the profile.",
    )
    p.add_argument("target", help="lab:NAME, qmp:SOCKET, qemu:RAMFILE, an image path")
    p.add_argument("-o", "--output", help="output file or folder (default: built-profiles cache)")
    p.add_argument(
        "--near-match", action="store_true",
        help="if the guest's exact build is gone, try the archive's (verified; warns)",
    )  # fmt: skip
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=cmd_fetch)
