"""The dom0 root filesystem: busybox, the Xen toolstack from .deb files, modules, /init.

Everything is written into one initramfs in pure Python (see
`vmishell.lab.initramfs`). Package paths are merged into /usr as Debian
bookworm systems see them (`/lib` -> `usr/lib`), symlinks inside packages
(library sonames) are kept, and every parent directory is created before
its files, which the kernel's unpacker needs. Kernel modules come from the
very kernel package dom0 boots, loaded in dependency order (read from each
module's own `.modinfo`), because busybox's `insmod` does not resolve them.

/init and what depends on the host a Xen instance runs on (where its Python
and the code under test live) are not in this image: `boot_archive` makes a
small second archive per instance, which the kernel unpacks over the first.
"""

from __future__ import annotations

import io
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from vmishell.errors import LabError
from vmishell.lab.initramfs import Cpio, compress
from vmishell.lab.xen.packages import TOOLSTACK_BIN, XEN_VERSION
from vmishell.symbols import deb

#: Modules dom0 loads: the Xen device drivers the toolstack opens, 9p over
#: virtio for the host's root, and virtio-serial for the command channel.
DOM0_MODULES = (
    "xen-privcmd", "xenfs", "xen-evtchn", "xen-gntdev", "xen-gntalloc",
    "virtio_pci", "virtio_console", "9pnet_virtio", "9p",
)  # fmt: skip
#: Directories of the dom0 root that come from the image itself; every other
#: top-level directory of the host is bound to the host's read-only copy.
OWN_DIRS = (
    "bin", "dev", "etc", "host", "lib", "lib64", "proc", "run", "sbin", "sys", "tmp",
    "usr", "var", "vmi",
)  # fmt: skip


def dom0_path(path: str | Path) -> str:
    """Where dom0 sees a host path: the same path, or under /host for dom0's own dirs.

    dom0 binds the host's top-level directories at their own paths, except
    those it has itself (`OWN_DIRS`: /tmp, /usr, /run, ...): a checkout, a
    HOME or a Python there is seen through /host.
    """
    text = str(Path(path).absolute())
    top = text.split("/")[1] if text.count("/") else ""
    return f"/host{text}" if top in OWN_DIRS else text


_MERGED = {"lib": "usr/lib", "lib64": "usr/lib64", "sbin": "usr/sbin"}
#: Unversioned names of libraries that programs open with dlopen by that name
#: (LibVMI's Xen driver asks for libxenstore.so), as the -dev packages would link them.
DEV_LINKS = ("libxenstore.so", "libxenctrl.so")
_LIBDIR = "usr/lib/x86_64-linux-gnu"
_PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")


@dataclass(frozen=True, slots=True)
class Member:
    """A regular file (`data`) or a symlink (`target`) taken from a package."""

    path: str
    mode: int
    data: bytes | None = None
    target: str | None = None


def merged_path(path: str) -> str:
    """A package path as it lies in a merged-/usr root (`lib/x` -> `usr/lib/x`)."""
    head, sep, rest = path.partition("/")
    if head in _MERGED and sep:
        return f"{_MERGED[head]}/{rest}"
    return path


def package_members(path: Path, wanted: Callable[[str], bool]) -> list[Member]:
    """The regular files and symlinks of a .deb that `wanted` accepts (merged paths)."""
    out = []
    with deb.data_entries(path) as members:
        for name, info, tar in members:
            if not wanted(name):
                continue
            mode = stat.S_IMODE(info.mode)
            if info.issym():
                out.append(Member(merged_path(name), mode, target=info.linkname))
            elif info.isfile():
                f = tar.extractfile(info)
                out.append(Member(merged_path(name), mode, data=f.read() if f else b""))
    return out


def module_name(file_name: str) -> str:
    """The kernel's name of a module file (`xen-privcmd.ko` -> `xen_privcmd`)."""
    return file_name.removesuffix(".ko").replace("-", "_")


def modinfo_depends(ko: bytes) -> list[str]:
    """The modules a .ko needs first, from its `.modinfo` section's `depends=`."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        section = ELFFile(io.BytesIO(ko)).get_section_by_name(".modinfo")
    except ELFError as exc:
        raise LabError(f"not a kernel module: {exc}") from exc
    if section is None:
        return []
    for item in section.data().split(b"\0"):
        if item.startswith(b"depends="):
            names = item[len(b"depends=") :].decode("ascii", "replace")
            return [module_name(n) for n in names.split(",") if n]
    return []


def load_order(modules: Mapping[str, bytes], wanted: Iterable[str]) -> list[str]:
    """Module names in an order where each comes after what it depends on.

    `modules` maps module names to .ko contents; a dependency missing from it
    is an error naming the module that needs it.
    """
    order: list[str] = []
    placed: set[str] = set()

    def place(name: str, chain: tuple[str, ...]) -> None:
        if name in placed:
            return
        if name in chain:
            raise LabError(f"kernel modules depend on each other in a cycle: {' -> '.join(chain)}")
        if name not in modules:
            why = f" (needed by {chain[-1]})" if chain else ""
            raise LabError(f"kernel module {name} is not in the kernel package{why}")
        for dep in modinfo_depends(modules[name]):
            place(dep, (*chain, name))
        placed.add(name)
        order.append(name)

    for name in wanted:
        place(module_name(name), ())
    return order


def kernel_modules(kernel_deb: Path, release: str, wanted: Iterable[str]) -> dict[str, bytes]:
    """{module name: .ko} of `wanted` and their dependencies, from the kernel package."""
    prefix = f"lib/modules/{release}/kernel/"
    found: dict[str, bytes] = {}

    def want(name: str) -> bool:
        return name.startswith(prefix) and name.endswith(".ko")

    # One pass over the package keeps every module (a few MiB of the ones we
    # name plus their dependencies are then picked); the tar is streamed once.
    everything = deb.extract(kernel_deb, want)
    by_name = {module_name(p.rsplit("/", 1)[-1]): data for p, data in everything.items()}
    for name in load_order(by_name, wanted):
        found[name] = by_name[name]
    return found


def render_init(modules: Iterable[str]) -> str:
    """dom0's /init from the readable template dom0-init.sh."""
    text = resources.files("vmishell.lab.xen").joinpath("dom0-init.sh").read_text("utf-8")
    values = {
        "MODULES": " ".join(modules),
        "TOOLSTACK_BIN": TOOLSTACK_BIN,
        "XEN_VERSION": XEN_VERSION,
        "OWN_DIRS": " ".join(OWN_DIRS),
    }

    def fill(m: re.Match[str]) -> str:
        try:
            return values[m.group(1)]
        except KeyError:
            raise ValueError(f"dom0-init.sh uses unknown placeholder {m.group(0)}") from None

    return _PLACEHOLDER.sub(fill, text)


def _parents(path: str) -> list[str]:
    parts = path.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def dom0_archive(
    *, busybox: bytes, members: Iterable[Member], modules: Mapping[str, bytes]
) -> bytes:
    """The dom0 initramfs (gzip-compressed newc), /init aside (see `boot_archive`)."""
    files: dict[str, Member] = {}
    for m in members:
        files.setdefault(m.path, m)  # the first package to ship a path wins
    for name, ko in modules.items():
        files[f"usr/lib/modules/{name}.ko"] = Member(f"usr/lib/modules/{name}.ko", 0o644, ko)
    dirs = {
        "bin", "dev", "dev/pts", "etc", "host", "proc", "run", "sys", "tmp", "usr",
        "usr/bin", "usr/lib", "usr/lib64", "usr/sbin", "var", "var/lib", "var/log", "vmi",
    }  # fmt: skip
    for path in files:
        dirs.update(_parents(path))
    cpio = Cpio()
    for d in sorted(dirs):
        cpio.add_dir(d)
    cpio.add_chardev("dev/console", 5, 1)
    for link, target in (("lib", "usr/lib"), ("lib64", "usr/lib64"), ("sbin", "usr/sbin")):
        cpio.add_symlink(link, target)
    cpio.add_symlink("var/run", "/run")
    cpio.add_file("bin/busybox", busybox, 0o755)
    cpio.add_symlink("bin/sh", "busybox")
    for link in DEV_LINKS:
        versions = sorted(p for p in files if p.startswith(f"{_LIBDIR}/{link}."))
        if versions and f"{_LIBDIR}/{link}" not in files:
            target = versions[0].rsplit("/", 1)[1]
            files[f"{_LIBDIR}/{link}"] = Member(f"{_LIBDIR}/{link}", 0o777, target=target)
    for path in sorted(files):
        m = files[path]
        if m.target is not None:
            cpio.add_symlink(path, m.target)
        else:
            cpio.add_file(path, m.data or b"", m.mode or 0o644)
    cpio.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.add_file("etc/group", b"root:x:0:\n")
    return compress(bytes(cpio))


def boot_archive(init: str, values: Mapping[str, str]) -> bytes:
    """The second archive of an instance: /init and /vmi/dom0.conf (shell assignments).

    Kept apart from the cached image so that changing /init or the host's
    paths never repacks the toolstack.
    """
    cpio = Cpio()
    cpio.add_file("init", init.encode(), 0o755)
    lines = []
    for key, value in values.items():
        if not re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
            raise LabError(f"invalid dom0 setting name {key!r}")
        lines.append(f"{key}={_shell_quote(value)}\n")
    cpio.add_file("vmi/dom0.conf", "".join(lines).encode())
    return compress(bytes(cpio))


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"
