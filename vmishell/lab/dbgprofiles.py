"""A lab kernel's -dbg package, boiled down to System.map, DWARF layouts and BTF.

Debian ships each kernel's DWARF vmlinux and real System.map in a separate
`linux-image-<release>-dbg` package (760-860 MB). vmishell needs it twice:
Debian's i386 kernels carry neither BTF nor CONFIG_KALLSYMS_ALL, so their
profiles are built from it; and it is the ground truth every profile is held
against in the tests (addresses from System.map, layouts from pahole's view of
the DWARF), for whichever kernel version Debian serves.

For one kernel package and version, `debug_files` downloads the -dbg package
of that very version (private apt state, see `vmishell.lab.apt`), streams
vmlinux and System.map out of it, runs pahole, and keeps only the small
results under `<lab cache>/dbg/<debian arch>/<package>_<version>/`:

    System.map-<release>  the real one (the kernel package ships an 83-byte stub)
    layouts.json          pahole's DWARF layouts of the structures vmishell reads
    <release>.btf         pahole --btf_encode_detached (only when asked: i386 types)
    record.json           which -dbg .deb they came from (name, version, size, sha256)

About 10 MB per kernel; the .deb and the vmlinux are deleted unless kept.
Each step is skipped when its output exists and record.json is written last,
so an interrupted run redoes only what is missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmishell.errors import LabError, PackageError, ProfileError
from vmishell.lab import pahole
from vmishell.lab.apt import lab_apt, lock_name
from vmishell.lab.paths import cache_root
from vmishell.symbols import deb
from vmishell.symbols.profile import Profile
from vmishell.symbols.sysmap import load_system_map

Progress = Callable[[str], None]

_DBG_BOOT = "usr/lib/debug/boot/"


@dataclass(frozen=True)
class DebugFiles:
    """What vmishell keeps of one kernel's -dbg package."""

    kernel_package: str
    version: str
    debian_arch: str
    folder: Path
    record: dict[str, Any]

    @property
    def release(self) -> str:
        return kernel_release_of(self.kernel_package)

    @property
    def system_map(self) -> Path:
        return self.folder / f"System.map-{self.release}"

    @property
    def layouts_path(self) -> Path:
        return self.folder / "layouts.json"

    @property
    def btf(self) -> Path | None:
        path = self.folder / f"{self.release}.btf"
        return path if path.is_file() else None

    def layouts(self) -> dict[str, Any]:
        """{struct: {"size": n, "members": {name: [offset, bit or None, size]}}} (DWARF)."""
        return json.loads(self.layouts_path.read_text())


def kernel_release_of(kernel_package: str) -> str:
    """The release of a kernel package: linux-image-X, or Debian 14's linux-binary-X."""
    return kernel_package.removeprefix("linux-image-").removeprefix("linux-binary-")


def dbg_package_of(kernel_package: str) -> str:
    """The -dbg package of a kernel package: linux-image-<release>-dbg in every suite."""
    return f"linux-image-{kernel_release_of(kernel_package)}-dbg"


def dbg_layouts(release: str) -> list[tuple[str, tuple[str, str]]]:
    """Where -dbg packages keep (System.map, vmlinux): (folder, (names)), oldest layout first.

    Up to Debian 13 under usr/lib/debug/boot/ with the release in the names;
    Debian 14 under usr/lib/debug/lib/modules/<release>/ (boot/ holds symlinks).
    """
    return [
        (_DBG_BOOT, (f"System.map-{release}", f"vmlinux-{release}")),
        (f"usr/lib/debug/lib/modules/{release}/", ("System.map", "vmlinux")),
    ]


def dbg_folder(debian_arch: str, kernel_package: str, version: str, cache: Path) -> Path:
    return cache / "dbg" / debian_arch / f"{kernel_package}_{version.replace(':', '%3a')}"


def debug_files(
    debian_arch: str,
    kernel_package: str,
    version: str,
    *,
    btf: bool = False,
    cache: Path | None = None,
    keep_deb: bool = False,
    keep_vmlinux: bool = False,
    progress: Progress | None = None,
    suite: str = "",
) -> DebugFiles:
    """The -dbg files of `kernel_package` `version`, downloading and boiling down once.

    `btf` also makes <release>.btf (types for kernels without BTF of their own).
    `suite` is the Debian suite the kernel comes from ("": the host's sources).
    """
    say = progress or (lambda _msg: None)
    root = cache if cache is not None else cache_root()
    folder = dbg_folder(debian_arch, kernel_package, version, root)
    found = _complete(folder, kernel_package, version, debian_arch, btf)
    if found is not None:
        return found
    with _locked(root / "locks" / f"dbg-{folder.name}.lock"):
        found = _complete(folder, kernel_package, version, debian_arch, btf)
        if found is not None:
            return found
        folder.mkdir(parents=True, exist_ok=True)
        record = _make(folder, root, debian_arch, kernel_package, version, btf, say, suite)
        _keep_or_delete(folder, record, keep_deb, keep_vmlinux)
        _write_json(folder / "record.json", record)
    return DebugFiles(kernel_package, version, debian_arch, folder, record)


def _complete(
    folder: Path, kernel_package: str, version: str, debian_arch: str, btf: bool
) -> DebugFiles | None:
    try:
        record = json.loads((folder / "record.json").read_text())
    except (OSError, ValueError):
        return None
    files = DebugFiles(kernel_package, version, debian_arch, folder, record)
    ready = files.system_map.is_file() and files.layouts_path.is_file()
    return files if ready and (files.btf is not None or not btf) else None


def _make(
    folder: Path,
    root: Path,
    debian_arch: str,
    kernel_package: str,
    version: str,
    btf: bool,
    say: Progress,
    suite: str = "",
) -> dict[str, Any]:
    """Make whatever of System.map, layouts.json and the BTF is missing; the record."""
    release = kernel_release_of(kernel_package)
    dbg_package = dbg_package_of(kernel_package)
    vmlinux, smap = folder / f"vmlinux-{release}", folder / f"System.map-{release}"
    layouts, btf_path = folder / "layouts.json", folder / f"{release}.btf"
    record: dict[str, Any] = {"kernel_package": kernel_package, "version": version}
    with contextlib.suppress(OSError, ValueError):
        record.update(json.loads((folder / "record.json").read_text()))
    needs_vmlinux = not layouts.is_file() or (btf and not btf_path.is_file())
    if not smap.is_file() or (needs_vmlinux and not vmlinux.is_file()):
        dbg = _download(root, debian_arch, dbg_package, version, folder, say, suite)
        record.update(_describe_deb(dbg, dbg_package, version))
        say(
            f"{dbg_package}: extracting {smap.name}"
            + (f", {vmlinux.name}" if needs_vmlinux else "")
        )
        started = time.monotonic()
        for folder_in_deb, names in dbg_layouts(release):
            wanted = {folder_in_deb + names[0]: smap}
            if needs_vmlinux:
                wanted[folder_in_deb + names[1]] = vmlinux
            try:
                written = deb.extract_to(dbg, wanted, folder=folder_in_deb)
            except PackageError as exc:
                raise LabError(f"{dbg_package} {version}: {exc}") from exc
            missing = [name for name in wanted if name not in written]
            if not missing:
                break
        else:
            raise LabError(f"{dbg} has no {', '.join(missing)}")
        say(f"  done in {time.monotonic() - started:.1f} s")
    if not layouts.is_file():
        say(f"pahole: DWARF layouts of {len(pahole.LAYOUT_STRUCTS)} structures")
        started = time.monotonic()
        _write_json(layouts, pahole.dwarf_layouts(vmlinux))
        say(f"  done in {time.monotonic() - started:.1f} s")
    if btf and not btf_path.is_file():
        say(f"pahole: BTF of {release}")
        started = time.monotonic()
        pahole.encode_btf(vmlinux, btf_path)
        say(f"  done in {time.monotonic() - started:.1f} s, {btf_path.stat().st_size} bytes")
    record["made_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return record


def _download(
    root: Path,
    debian_arch: str,
    package: str,
    version: str,
    dest: Path,
    say: Progress,
    suite: str = "",
) -> Path:
    apt = lab_apt(root, debian_arch, suite, say)
    with _locked(root / "locks" / lock_name(apt)):
        apt.ensure_lists()
        try:
            return apt.download(package, version, dest)
        except LabError:
            if apt.updated:
                raise
            apt.update()  # stale lists can name a version the mirror dropped
            try:
                return apt.download(package, version, dest)
            except LabError as exc:
                raise LabError(
                    f"cannot download {package} {version} ({debian_arch}): Debian's archive "
                    "keeps only its current kernels. If the lab image is older, rebuild it "
                    f"with `vmishell lab build --force`.\n{exc}"
                ) from exc


def _describe_deb(path: Path, package: str, version: str) -> dict[str, Any]:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {
        "dbg_package": package,
        "dbg_version": version,
        "dbg_deb": path.name,
        "dbg_size": path.stat().st_size,
        "dbg_sha256": h.hexdigest(),
    }


def _keep_or_delete(
    folder: Path, record: dict[str, Any], keep_deb: bool, keep_vmlinux: bool
) -> None:
    if not keep_vmlinux:
        for vmlinux in folder.glob("vmlinux-*"):
            vmlinux.unlink()
    if not keep_deb and record.get("dbg_deb"):
        (folder / record["dbg_deb"]).unlink(missing_ok=True)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -- holding a profile against the -dbg package ------------------------------------------

_POINTER_SIZE = {"amd64": 8, "i386": 4, "arm64": 8}


def check_profile(profile: Profile, dbg: DebugFiles, limit: int = 20) -> list[str]:
    """What in `profile` disagrees with the -dbg package of its kernel (empty: nothing).

    Symbols: every one the System.map lists (absolute ones and the kallsyms
    tables aside) is in the profile, and each profile symbol has the address
    the System.map gives its name (a global definition over a local one).
    Types: every member of the structures in layouts.json has pahole's offset
    (bit-fields compared bit for bit) and every structure pahole's size.
    """
    problems: list[str] = []
    want_ptr = _POINTER_SIZE.get(dbg.debian_arch)
    if want_ptr is not None and profile.pointer_size != want_ptr:
        problems.append(f"pointer size {profile.pointer_size}, not {want_ptr}")
    banner = (profile.banner or b"").decode("ascii", "replace")
    if not banner.startswith(f"Linux version {dbg.release} "):
        problems.append(f"banner {banner[:60]!r} is not that of {dbg.release}")
    smap = load_system_map(dbg.system_map)
    names = set(profile.symbol_names())
    missing = sorted(
        {s.name for s in smap if s.type not in "aA" and not s.name.startswith("kallsyms_")} - names
    )
    if missing:
        problems.append(f"{len(missing)} System.map symbols missing, e.g. {missing[:5]}")
    wrong = [
        f"{n} at {profile.symbol_address(n):#x}, System.map {smap.get(n, 0):#x}"
        for n in sorted(names)
        if profile.symbol_address(n) != smap.get(n)
    ]
    if wrong:
        problems.append(f"{len(wrong)} symbols at other addresses than System.map's: {wrong[:5]}")
    for struct, layout in dbg.layouts().items():
        problems += _layout_problems(profile, struct, layout)
    return problems[:limit]


def _layout_problems(profile: Profile, struct: str, layout: dict[str, Any]) -> list[str]:
    try:
        size = profile.size_of(struct)
    except ProfileError as exc:
        return [f"{struct}: {exc}"]
    problems = [] if size == layout["size"] else [f"{struct} is {size} bytes, not {layout['size']}"]
    for name, (offset, bit, _size) in layout["members"].items():
        try:
            field = profile.field(struct, name)
        except ProfileError as exc:
            problems.append(f"{struct}.{name}: {exc}")
            continue
        got = field.offset * 8 + (field.type.bit_position or 0)
        if got != offset * 8 + (bit or 0):
            problems.append(f"{struct}.{name} at bit {got}, pahole says {offset * 8 + (bit or 0)}")
    return problems
