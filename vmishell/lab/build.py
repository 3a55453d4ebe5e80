"""Build a lab guest image from Debian packages: kernel, busybox, workload, /init.

Nothing is installed on the host. The kernel and busybox-static .deb files of
the guest's Debian architecture are downloaded with a private apt state (see
`vmishell.lab.apt`), unpacked in Python, and combined with the generated
workload and /init into an initramfs. Everything lands in the lab cache (see
`vmishell.lab.paths`) with a manifest.json that records exactly which packages
(name, version, sha256) went in, so a test failure can be tied to a kernel
build and the profile builder can find the very .deb the guest boots.

An image is rebuilt only when it is missing or `force` is given; when only the
generated parts changed (init.sh, the workload), just the initramfs is redone.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmishell.errors import LabError, PackageError
from vmishell.lab import initramfs
from vmishell.lab.apt import PrivateApt, lab_apt, lock_name
from vmishell.lab.bootscript import render_init
from vmishell.lab.guests import GuestSpec, get_guest
from vmishell.lab.paths import cache_root
from vmishell.lab.workload import build_workload, layout
from vmishell.symbols import deb

Progress = Callable[[str], None]

MANIFEST_FORMAT = 1
BUSYBOX_PACKAGE = "busybox-static"


@dataclass(frozen=True)
class BuiltGuest:
    """A guest image ready to boot: kernel, initramfs and where they came from."""

    guest: GuestSpec
    image_dir: Path
    vmlinuz: Path
    initramfs: Path
    kernel_deb: Path
    kernel_release: str
    manifest_path: Path
    manifest: dict[str, Any]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise builds of one image across processes (tests, CLI, notebooks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _initramfs_inputs(spec: GuestSpec, busybox_sha: str) -> tuple[str, bytes, str]:
    """(rendered /init, workload binary, hash of every initramfs input)."""
    init = render_init(layout(spec.arch))
    workload = build_workload(spec.arch)
    key = _sha256(f"{_sha256(init.encode())}:{_sha256(workload)}:{busybox_sha}".encode())
    return init, workload, key


def _from_manifest(spec: GuestSpec, image_dir: Path, manifest: dict[str, Any]) -> BuiltGuest:
    return BuiltGuest(
        guest=spec,
        image_dir=image_dir,
        vmlinuz=Path(manifest["vmlinuz"]),
        initramfs=Path(manifest["initramfs"]),
        kernel_deb=Path(manifest["kernel_deb"]),
        kernel_release=manifest["kernel_release"],
        manifest_path=image_dir / "manifest.json",
        manifest=manifest,
    )


def load_manifest(image_dir: Path) -> dict[str, Any] | None:
    """The manifest of a complete image, or None if any recorded file is missing."""
    try:
        manifest = json.loads((image_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != MANIFEST_FORMAT:
        return None
    for key in ("vmlinuz", "initramfs", "kernel_deb", "busybox"):
        if not Path(manifest.get(key, "")).is_file():
            return None
    return manifest


def built_release(guest: str | GuestSpec, cache_dir: Path | None = None) -> str | None:
    """The kernel release the guest's built image boots, or None if it is not built yet."""
    spec = get_guest(guest)
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    manifest = load_manifest(root / "images" / spec.image_name)
    return None if manifest is None else manifest.get("kernel_release")


def build_guest(
    guest: str | GuestSpec,
    *,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    force: bool = False,
) -> BuiltGuest:
    """The built image of `guest`, building (downloading) only what is missing."""
    spec = get_guest(guest)
    say = progress or (lambda _msg: None)
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    image_dir = root / "images" / spec.image_name
    with _locked(root / "locks" / f"image-{spec.image_name}.lock"):
        manifest = None if force else load_manifest(image_dir)
        if manifest is None:
            manifest = _build_image(spec, root, image_dir, say, force)
        else:
            manifest = _refresh_initramfs(spec, image_dir, manifest, say)
    return _from_manifest(spec, image_dir, manifest)


def _refresh_initramfs(
    spec: GuestSpec, image_dir: Path, manifest: dict[str, Any], say: Progress
) -> dict[str, Any]:
    """Redo only the initramfs when init.sh or the workload changed since the build."""
    busybox = Path(manifest["busybox"])
    init, workload, key = _initramfs_inputs(spec, manifest["packages"]["busybox"]["binary_sha256"])
    if manifest.get("initramfs_inputs") == key:
        return manifest
    say(f"{spec.image_name}: /init or workload changed, rebuilding the initramfs")
    _write_initramfs(spec, image_dir, manifest, busybox.read_bytes(), init, workload, key)
    return manifest


def _write_initramfs(
    spec: GuestSpec,
    image_dir: Path,
    manifest: dict[str, Any],
    busybox: bytes,
    init: str,
    workload: bytes,
    key: str,
) -> None:
    archive = initramfs.base_archive(busybox=busybox, init=init, workload=workload)
    path = image_dir / "initramfs.cpio.gz"
    _write_atomic(path, archive)
    lay = layout(spec.arch)
    manifest.update(
        initramfs=str(path),
        initramfs_sha256=_sha256(archive),
        initramfs_inputs=key,
        init_sha256=_sha256(init.encode()),
        workload={
            "arch": spec.arch,
            "sha256": _sha256(workload),
            "marker_va": lay.marker_va,
            "counter_va": lay.counter_va,
            "counter_size": lay.counter_size,
        },
    )
    _write_atomic(image_dir / "manifest.json", json.dumps(manifest, indent=2).encode() + b"\n")


def _fetch(apt: PrivateApt, spec: GuestSpec, debs: Path, roles: tuple[str, ...]) -> dict[str, Any]:
    """Resolve the concrete kernel package and download what `roles` names with `apt`.

    roles: "kernel" (the package that holds the image) and/or "busybox".
    """
    out: dict[str, Any] = {}
    apt.ensure_lists()
    wanted: list[tuple[str, str]] = []
    if "kernel" in roles:
        kernel = _kernel_package(apt, spec)
        out["kernel_meta"] = {
            "name": spec.kernel_package,
            "version": apt.candidate(spec.kernel_package),
        }
        wanted.append(("kernel", kernel))
    if "busybox" in roles:
        wanted.append(("busybox", BUSYBOX_PACKAGE))
    for role, name in wanted:
        version = apt.resolve(name)
        path = apt.download(name, version, debs)
        out[role] = {"name": name, "version": version, "deb": str(path)}
    return out


def _kernel_package(apt: PrivateApt, spec: GuestSpec) -> str:
    """The package holding the kernel image that `spec.kernel_package` stands for.

    The meta package depends on linux-image-VERSION; since Debian 14 that one is
    empty and depends on linux-binary-VERSION, which holds the image.
    """
    names = apt.depends(spec.kernel_package, prefix="linux-image-")
    if not names and not apt.updated:
        apt.update()
        names = apt.depends(spec.kernel_package, prefix="linux-image-")
    if not names:
        raise LabError(f"cannot resolve {spec.kernel_package} ({apt.what}) to a kernel package")
    binary = apt.depends(names[0], prefix="linux-binary-")
    return binary[0] if binary else names[0]


def _fetch_all(spec: GuestSpec, root: Path, say: Progress, force: bool) -> dict[str, Any]:
    """Download the kernel (from the guest's suite) and busybox (from the host's)."""
    debs = root / "debs" / spec.debian_arch
    host = lab_apt(root, spec.debian_arch, "", say)
    apts = [(host, ("busybox",) if spec.suite else ("kernel", "busybox"))]
    if spec.suite:
        apts.insert(0, (lab_apt(root, spec.debian_arch, spec.suite, say), ("kernel",)))
    packages: dict[str, Any] = {}
    for apt, roles in apts:
        with _locked(root / "locks" / lock_name(apt)):
            if force:
                apt.update()
            try:
                packages.update(_fetch(apt, spec, debs, roles))
            except LabError:
                if apt.updated:
                    raise
                apt.update()  # stale lists can name versions the mirror dropped
                packages.update(_fetch(apt, spec, debs, roles))
    return packages


def _unpack(
    packages: dict[str, Any], kernel_deb: Path, busybox_deb: Path
) -> tuple[bytes, bytes | None, bytes]:
    """(vmlinuz, config or None, busybox) after checking what each .deb holds."""
    for role in ("kernel", "busybox"):
        path = Path(packages[role]["deb"])
        fields = deb.control_fields(path)
        if fields.get("Package") != packages[role]["name"]:
            raise LabError(f"{path} holds {fields.get('Package')}, not {packages[role]['name']}")
        packages[role].update(version=fields.get("Version"), sha256=_sha256_file(path))
    boot = deb.extract(
        kernel_deb,
        lambda n: n.startswith(("boot/vmlinuz-", "boot/config-")),
        stop_when=lambda found: len(found) >= 2,
        folder="boot/",
    )
    vmlinuz = next((n for n in boot if n.startswith("boot/vmlinuz-")), None)
    if vmlinuz is None:
        # Debian 14's linux-binary-VERSION: usr/lib/modules/VERSION/vmlinuz, no config.
        boot = deb.extract(
            kernel_deb, lambda n: MODULES_VMLINUZ.match(n) is not None, stop_when=bool
        )
        vmlinuz = next(iter(boot), None)
    if vmlinuz is None:
        raise LabError(f"{kernel_deb} has no boot/vmlinuz-* nor usr/lib/modules/*/vmlinuz")
    config = next((data for n, data in boot.items() if n.startswith("boot/config-")), None)
    packages["kernel"]["release"] = kernel_release(vmlinuz)
    bb = deb.extract(busybox_deb, lambda n: n == "bin/busybox", stop_when=bool, folder="bin/")
    if "bin/busybox" not in bb:
        raise LabError(f"{busybox_deb} has no bin/busybox")
    return boot[vmlinuz], config, bb["bin/busybox"]


#: Where Debian 14 and later keep the kernel image inside linux-binary-VERSION.
MODULES_VMLINUZ = re.compile(r"^usr/lib/modules/([^/]+)/vmlinuz$")


def kernel_release(member: str) -> str:
    """The release ("6.12.117+deb13-amd64") from the image's path inside the package."""
    m = MODULES_VMLINUZ.match(member)
    return m.group(1) if m else member.removeprefix("boot/vmlinuz-")


def _build_image(
    spec: GuestSpec, root: Path, image_dir: Path, say: Progress, force: bool
) -> dict[str, Any]:
    started = time.monotonic()
    say(f"{spec.image_name}: building from Debian {spec.debian_arch} packages")
    packages = _fetch_all(spec, root, say, force)

    kernel_deb = Path(packages["kernel"]["deb"])
    busybox_deb = Path(packages["busybox"]["deb"])
    say(f"{spec.image_name}: unpacking {kernel_deb.name}")
    try:
        image, config, busybox = _unpack(packages, kernel_deb, busybox_deb)
    except PackageError as exc:
        raise LabError(f"{spec.image_name}: {exc}") from exc
    release = packages["kernel"]["release"]

    image_dir.mkdir(parents=True, exist_ok=True)
    vmlinuz = image_dir / "vmlinuz"
    _write_atomic(vmlinuz, image)
    if config is not None:
        _write_atomic(image_dir / "config", config)
    busybox_path = image_dir / "busybox"
    _write_atomic(busybox_path, busybox)
    packages["busybox"]["binary_sha256"] = _sha256(busybox)

    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "image": spec.image_name,
        "arch": spec.arch,
        "debian_arch": spec.debian_arch,
        "kernel_release": release,
        "packages": packages,
        "kernel_deb": str(kernel_deb),
        "vmlinuz": str(vmlinuz),
        "suite": spec.suite or None,
        "vmlinuz_sha256": _sha256(image),
        "config": str(image_dir / "config") if config is not None else None,
        "busybox": str(busybox_path),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    init, workload, key = _initramfs_inputs(spec, packages["busybox"]["binary_sha256"])
    _write_initramfs(spec, image_dir, manifest, busybox, init, workload, key)
    say(f"{spec.image_name}: built {release} in {time.monotonic() - started:.1f} s")
    return manifest
