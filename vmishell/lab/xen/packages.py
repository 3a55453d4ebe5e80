"""The Debian packages a Xen lab host is made of, and the files taken from them.

Three groups: the hypervisor (a multiboot image QEMU boots), the toolstack
(xl, xenstored, xenconsoled and the libraries vmishell binds to) and the
device model that HVM guests need (Debian's `qemu-system-xen` and SeaBIOS).
Their shared-library dependencies are followed through apt (first
alternative of each dependency) so that a new Debian point release brings
its own library versions; packages that only matter to a full Debian system
(maintainer scripts, init systems, Python for pygrub) are left out. From each
package only what a busybox dom0 runs is kept (`wanted_file`): executables
of the toolstack, shared libraries, the dynamic loader and firmware.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vmishell.errors import LabError
from vmishell.lab.apt import PrivateApt

XEN_VERSION = "4.17"
HYPERVISOR_PACKAGE = f"xen-hypervisor-{XEN_VERSION}-amd64"
#: Where the hypervisor package keeps its (gzip-compressed) multiboot image.
HYPERVISOR_IMAGE = f"boot/xen-{XEN_VERSION}-amd64.gz"
TOOLSTACK_ROOTS = (f"xen-utils-{XEN_VERSION}", "xenstore-utils")
DEVICE_MODEL_ROOTS = ("qemu-system-xen", "seabios")
#: Where the toolstack's programs live (Debian keeps them out of PATH).
TOOLSTACK_BIN = f"/usr/lib/xen-{XEN_VERSION}/bin"

#: Dependencies a busybox dom0 does without: package management, init systems,
#: hotplug, Python (pygrub and friends) and network boot ROMs (the lab's DomUs
#: have no network cards).
EXCLUDED = frozenset(
    {
        "adduser", "bridge-utils", "debconf", "dpkg", "init-system-helpers", "iproute2",
        "ipxe-qemu", "iso-codes", "libc-bin", "lsb-base", "perl-base", "python3",
        "sysvinit-utils", "ucf", "udev", "xen-utils-common",
    }
)  # fmt: skip

_LIBDIR = re.compile(r"^(?:usr/)?lib/x86_64-linux-gnu/[^/]+\.so(?:\.[0-9][^/]*)?$")
_PROGRAMS = re.compile(
    rf"^(?:usr/lib/xen-{re.escape(XEN_VERSION)}/(?:bin/[^/]+|boot/hvmloader)"
    r"|usr/bin/xenstore[^/]*|usr/libexec/xen-qemu-system-i386"
    r"|usr/share/seabios/bios-256k\.bin|lib64/ld-linux-x86-64\.so\.2"
    # The device model boots an HVM DomU's kernel with an option ROM, and loads
    # a keymap even without a display.
    r"|usr/share/qemu/(?:linuxboot(?:_dma)?\.bin|keymaps/en-us))$"
)
#: Python programs of xen-utils: without Python in dom0's own root they cannot run.
_PYTHON_PROGRAMS = frozenset({"pygrub", "xenpvnetboot"})


def recipe() -> str:
    """A digest of what this module selects: a cached image built otherwise is rebuilt."""
    import hashlib

    text = repr(
        (HYPERVISOR_PACKAGE, TOOLSTACK_ROOTS, DEVICE_MODEL_ROOTS, sorted(EXCLUDED),
         _LIBDIR.pattern, _PROGRAMS.pattern, sorted(_PYTHON_PROGRAMS))
    )  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def wanted_file(path: str) -> bool:
    """Whether a package member (path without "./") belongs in the dom0 image."""
    if _LIBDIR.match(path):
        return True
    if not _PROGRAMS.match(path):
        return False
    return path.rsplit("/", 1)[-1] not in _PYTHON_PROGRAMS


def parse_depends(text: str) -> dict[str, list[str]]:
    """`apt-cache depends` output -> {package: the first alternative of each Depends}.

    Virtual packages (`<name>`) are dropped: a real alternative or a real
    package of the same group provides them.
    """
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    in_group = False
    for line in text.splitlines():
        if line and not line[0].isspace():
            current = out.setdefault(line.strip(), [])
            in_group = False
            continue
        m = re.match(r"\s*(\|?)(?:Pre)?Depends:\s*(\S+)", line)
        if m is None or current is None:
            continue
        alternative, name = m.group(1) == "|", m.group(2)
        if not in_group and not name.startswith("<"):
            current.append(name.split(":", 1)[0])
        in_group = alternative
    return out


def closure(apt: PrivateApt, roots: Iterable[str]) -> list[str]:
    """`roots` and everything they depend on, minus EXCLUDED, one apt call per level."""
    seen: set[str] = set()
    frontier = sorted(set(roots) - EXCLUDED)
    while frontier:
        seen.update(frontier)
        deps = parse_depends(_apt_cache_depends(apt, frontier))
        missing = [p for p in frontier if p not in deps]
        if missing:
            raise LabError(f"apt knows no package {', '.join(missing)} ({apt.debian_arch})")
        frontier = sorted({d for ds in deps.values() for d in ds} - seen - EXCLUDED)
    return sorted(seen)


def _apt_cache_depends(apt: PrivateApt, names: list[str]) -> str:
    env = dict(os.environ, LC_ALL="C")
    proc = subprocess.run(
        ["apt-cache", *apt.options(), "depends", *names],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stdout


def fetch(apt: PrivateApt, dest: Path, *, device_model: bool = True) -> dict[str, Any]:
    """Download the host's packages; {name: {"version", "deb"}} with the hypervisor first."""
    apt.ensure_lists()
    roots = [HYPERVISOR_PACKAGE, *TOOLSTACK_ROOTS, *(DEVICE_MODEL_ROOTS if device_model else ())]
    try:
        names = closure(apt, roots)
    except LabError:
        if apt.updated:
            raise
        apt.update()
        names = closure(apt, roots)
    out: dict[str, Any] = {}
    for name in [HYPERVISOR_PACKAGE, *(n for n in names if n != HYPERVISOR_PACKAGE)]:
        version = apt.resolve(name)
        # Architecture-independent packages ("all") are not named as apt.download
        # expects for amd64: look for them first, or they are downloaded every build.
        have = sorted(dest.glob(f"{name}_{version.replace(':', '%3a')}_*.deb"))
        path = have[0] if have else apt.download(name, version, dest)
        out[name] = {"version": version, "deb": str(path)}
    return out
