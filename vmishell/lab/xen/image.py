"""Build (once, cached) what a Xen lab host boots: Xen, the dom0 kernel and initramfs.

The dom0 kernel is the lab's `x86_64` guest kernel (Debian's amd64 kernel
runs as a PV dom0 unchanged), so that image is built first. The Xen
packages are fetched with the lab's private apt state and unpacked in
Python. Everything lands in `images/xen-4.17/` of the lab cache with a
manifest naming each package and version. The image is rebuilt when it is
missing, when `force` is given, or when the dom0 kernel or the recipe
(packages, files and modules chosen, see `packages.recipe`) changed. dom0's
/init is not part of the image (see `dom0fs.boot_archive`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmishell.errors import LabError
from vmishell.lab.apt import PrivateApt
from vmishell.lab.build import BuiltGuest, _locked, _sha256_file, _write_atomic, build_guest
from vmishell.lab.paths import cache_root
from vmishell.lab.xen import dom0fs, packages
from vmishell.symbols import deb

Progress = Callable[[str], None]

IMAGE_NAME = f"xen-{packages.XEN_VERSION}"
MANIFEST_FORMAT = 2
#: The lab guest whose kernel runs as dom0 (and whose image DomUs boot by default).
DOM0_GUEST = "x86_64"


@dataclass(frozen=True)
class XenImage:
    """A Xen host ready to boot: hypervisor, dom0 kernel and initramfs, and their origin."""

    image_dir: Path
    xen: Path
    dom0_kernel: Path
    dom0_initramfs: Path
    dom0_guest: BuiltGuest
    manifest: dict[str, Any]

    @property
    def kernel_release(self) -> str:
        return self.dom0_guest.kernel_release

    @property
    def modules(self) -> list[str]:
        """dom0's kernel modules in load order."""
        return list(self.manifest["modules"])


def build_xen_image(
    *, cache_dir: Path | None = None, progress: Progress | None = None, force: bool = False
) -> XenImage:
    """The built Xen host image, building (downloading) only what is missing."""
    say = progress or (lambda _msg: None)
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    dom0 = build_guest(DOM0_GUEST, cache_dir=cache_dir, progress=progress, force=force)
    image_dir = root / "images" / IMAGE_NAME
    with _locked(root / "locks" / f"image-{IMAGE_NAME}.lock"):
        manifest = None if force else _load(image_dir)
        if manifest is not None and manifest.get("dom0_kernel_sha256") != dom0.manifest.get(
            "vmlinuz_sha256"
        ):
            say(f"{IMAGE_NAME}: the dom0 kernel changed, rebuilding")
            manifest = None
        if manifest is not None and manifest.get("recipe") != _recipe():
            say(f"{IMAGE_NAME}: the choice of packages, files or modules changed, rebuilding")
            manifest = None
        if manifest is None:
            manifest = _build(root, image_dir, dom0, say, force)
    return XenImage(
        image_dir=image_dir,
        xen=Path(manifest["xen"]),
        dom0_kernel=dom0.vmlinuz,
        dom0_initramfs=Path(manifest["dom0_initramfs"]),
        dom0_guest=dom0,
        manifest=manifest,
    )


def _recipe() -> str:
    return f"{packages.recipe()}:{','.join(dom0fs.DOM0_MODULES)}:{','.join(dom0fs.DEV_LINKS)}"


def _load(image_dir: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((image_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != MANIFEST_FORMAT:
        return None
    for key in ("xen", "dom0_initramfs"):
        if not Path(manifest.get(key, "")).is_file():
            return None
    return manifest


def _build(
    root: Path, image_dir: Path, dom0: BuiltGuest, say: Progress, force: bool
) -> dict[str, Any]:
    started = time.monotonic()
    say(f"{IMAGE_NAME}: building from Debian packages")
    apt = PrivateApt("amd64", root / "apt" / "amd64", say)
    with _locked(root / "locks" / "apt-amd64.lock"):
        if force:
            apt.update()
        pkgs = packages.fetch(apt, root / "debs" / "amd64")
    hyper = Path(pkgs[packages.HYPERVISOR_PACKAGE]["deb"])
    found = deb.extract(hyper, lambda n: n == packages.HYPERVISOR_IMAGE, stop_when=bool)
    if packages.HYPERVISOR_IMAGE not in found:
        raise LabError(f"{hyper} has no {packages.HYPERVISOR_IMAGE}")
    image_dir.mkdir(parents=True, exist_ok=True)
    xen = image_dir / "xen"
    _write_atomic(xen, gzip.decompress(found[packages.HYPERVISOR_IMAGE]))

    say(f"{IMAGE_NAME}: unpacking {len(pkgs) - 1} toolstack packages")
    members: list[dom0fs.Member] = []
    for name, info in pkgs.items():
        if name != packages.HYPERVISOR_PACKAGE:
            members += dom0fs.package_members(Path(info["deb"]), packages.wanted_file)
    say(f"{IMAGE_NAME}: taking dom0's modules from {dom0.kernel_deb.name}")
    modules = dom0fs.kernel_modules(dom0.kernel_deb, dom0.kernel_release, dom0fs.DOM0_MODULES)
    busybox = Path(dom0.manifest["busybox"]).read_bytes()
    archive = dom0fs.dom0_archive(busybox=busybox, members=members, modules=modules)
    initramfs = image_dir / "dom0-initramfs.cpio.gz"
    _write_atomic(initramfs, archive)
    versions = {name: info["version"] for name, info in pkgs.items()}
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "image": IMAGE_NAME,
        "xen": str(xen),
        "xen_sha256": _sha256_file(xen),
        "dom0_initramfs": str(initramfs),
        "dom0_initramfs_sha256": hashlib.sha256(archive).hexdigest(),
        "dom0_kernel": str(dom0.vmlinuz),
        "dom0_kernel_sha256": dom0.manifest.get("vmlinuz_sha256"),
        "dom0_kernel_release": dom0.kernel_release,
        "modules": list(modules),
        "packages": {
            name: {**info, "sha256": _sha256_file(Path(info["deb"]))} for name, info in pkgs.items()
        },
        "versions": versions,
        "recipe": _recipe(),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_atomic(image_dir / "manifest.json", json.dumps(manifest, indent=2).encode() + b"\n")
    say(
        f"{IMAGE_NAME}: built in {time.monotonic() - started:.1f} s "
        f"(dom0 initramfs {len(archive) >> 20} MiB)"
    )
    return manifest
