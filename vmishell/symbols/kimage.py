"""Open what a distribution ships as a kernel and get the vmlinux inside.

A profile can be built without any debug package: Debian's kernel package
carries a compressed kernel whose vmlinux holds BTF (types) and kallsyms
(symbol addresses). `open_kernel` accepts the `.deb` itself, an x86 bzImage
(any of the kernel's payload compressions), an arm64 `Image` (raw, gzipped or
EFI zboot) or an ELF vmlinux, and returns a `KernelImage`. The containers are
read by `containers`, the compressions undone by `compression` (and `lzo`),
packages opened by `deb`; this module peels the layers in order.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vmishell.errors import KernelImageError, PackageError, ProfileError
from vmishell.symbols import deb
from vmishell.symbols.compression import COMPRESSION_MAGICS, compression_of, decompress
from vmishell.symbols.containers import (
    AR_MAGIC,
    BTF_MAGIC_BE,
    BTF_MAGIC_LE,
    ELF_MAGIC,
    arm64_endian,
    arm64_page_size,
    bzimage_payload,
    describe_bytes,
    elf_btf,
    elf_header,
    find_banner,
    find_btf,
    is_arm64_image,
    is_bzimage,
    is_zboot,
    load_segments,
    zboot_payload,
)
from vmishell.symbols.lzo import lzo1x_decompress, lzop_decompress
from vmishell.symbols.sysmap import is_stub

if TYPE_CHECKING:
    from vmishell.symbols.kallsyms import Kallsyms

#: Names other modules and tests import from here (they live in the modules above).
__all__ = [
    "AR_MAGIC",
    "BTF_MAGIC_BE",
    "BTF_MAGIC_LE",
    "COMPRESSION_MAGICS",
    "ELF_MAGIC",
    "NO_BTF_HINT",
    "KernelImage",
    "bzimage_payload",
    "compression_of",
    "deb_system_map",
    "decompress",
    "describe_bytes",
    "find_banner",
    "find_btf",
    "image_from_bytes",
    "lzo1x_decompress",
    "lzop_decompress",
    "open_kernel",
    "zboot_payload",
]

Progress = Callable[[str, float], None]

NO_BTF_HINT = (
    "build a detached BTF file from the -dbg package's vmlinux "
    "(/usr/lib/debug/boot/vmlinux-*) with `pahole --btf_encode_detached=FILE VMLINUX` "
    "and pass it with --btf FILE"
)


@dataclass
class KernelImage:
    """A decompressed kernel and what came with it.

    `vmlinux` is the ELF file, or the raw image when the kernel ships without
    ELF headers (arm64 `Image`); kallsyms and BTF are found in either.
    """

    vmlinux: bytes
    arch: str
    pointer_size: int
    endian: str
    is_elf: bool
    btf: bytes | None = None
    banner: bytes | None = None
    system_map: str | None = None
    config: str | None = None
    package: str | None = None
    package_version: str | None = None
    source: Path | None = None
    #: How the vmlinux was wrapped, outermost first, e.g. ["deb", "bzImage", "xz"].
    layers: list[str] = field(default_factory=list)
    #: PAGE_SIZE when the image says it (arm64 Image header); x86 is always 4096.
    page_size: int | None = None

    @property
    def version(self) -> str | None:
        """The kernel release (`uname -r`), from the banner."""
        if not self.banner:
            return None
        m = re.match(rb"Linux version (\S+)", self.banner)
        return m.group(1).decode("ascii", "replace") if m else None

    @property
    def banner_text(self) -> str | None:
        return self.banner.decode("ascii", "replace").rstrip("\n") if self.banner else None

    def require_btf(self) -> bytes:
        if self.btf is None:
            raise ProfileError(f"{self.describe()} has no BTF (.BTF section): {NO_BTF_HINT}")
        return self.btf

    def kallsyms(self) -> Kallsyms:
        """The kernel's own kallsyms tables, decoded (~0.3 s; arm64 Images ~0.7 s)."""
        from vmishell.symbols.kallsyms import find_kallsyms

        return find_kallsyms(self.vmlinux, pointer_size=self.pointer_size, endian=self.endian)

    def config_option(self, name: str) -> str | None:
        """Value of CONFIG_`name` in the packaged config ("y", "m", a string), else None."""
        if not self.config:
            return None
        key = name if name.startswith("CONFIG_") else f"CONFIG_{name}"
        m = re.search(rf"^{re.escape(key)}=(.*)$", self.config, re.M)
        return m.group(1).strip('"') if m else None

    def target(self) -> dict[str, str | int]:
        """What a walker must know of the machine: arch, page size, VA bits (when known).

        Recorded in the ISF's producer metadata, the only place Volatility's
        schema leaves open, so a session picks the walker before reading memory.
        """
        out: dict[str, str | int] = {"arch": self.arch}
        page_size = self.page_size or (4096 if self.arch in ("x86_64", "i386") else None)
        if page_size:
            out["page_size"] = page_size
        va_bits = self.config_option("ARM64_VA_BITS")
        if va_bits and va_bits.isdigit():
            out["va_bits"] = int(va_bits)  # the kernel's maximum; 52 may run as 48 (no LPA2)
        return out

    def describe(self) -> str:
        what = self.package and f"{self.package} {self.package_version}"
        return what or (str(self.source) if self.source else "kernel image")

    def offset_of(self, vaddr: int, text_base: int | None = None) -> int | None:
        """File offset of link-time address `vaddr` in `vmlinux`, or None if not in the file.

        An ELF maps through its PT_LOAD segments; a raw image starts at `_text`,
        which the caller passes as `text_base` (from the symbols).
        """
        if not self.is_elf:
            if text_base is None or not 0 <= vaddr - text_base < len(self.vmlinux):
                return None
            return vaddr - text_base
        for seg_vaddr, seg_offset, seg_size in load_segments(self.vmlinux):
            if seg_vaddr <= vaddr < seg_vaddr + seg_size:
                return seg_offset + (vaddr - seg_vaddr)
        return None

    def read_cstring(
        self, vaddr: int, text_base: int | None = None, limit: int = 4096
    ) -> bytes | None:
        """The NUL-terminated bytes at `vaddr` (without the NUL), or None."""
        off = self.offset_of(vaddr, text_base)
        if off is None:
            return None
        end = self.vmlinux.find(b"\0", off, off + limit)
        return self.vmlinux[off:end] if end >= 0 else None


# -- entry point ----------------------------------------------------------------------


def open_kernel(path: Path | str, progress: Progress | None = None) -> KernelImage:
    """Open a kernel package, compressed kernel or vmlinux (see module doc)."""
    path = Path(path)
    report = progress or (lambda _stage, _fraction: None)
    try:
        with path.open("rb") as f:
            head = f.read(len(AR_MAGIC))
    except OSError as exc:
        raise KernelImageError(f"cannot read {path}: {exc.strerror}") from exc
    if head == AR_MAGIC:
        image = _open_deb(path, report)
    else:
        data = path.read_bytes()
        image = image_from_bytes(data, str(path), report)
    image.source = path
    return image


def image_from_bytes(
    data: bytes, name: str = "image", progress: Progress | None = None
) -> KernelImage:
    """Detect the format of `data` and unwrap it down to the vmlinux."""
    report = progress or (lambda _stage, _fraction: None)
    layers: list[str] = []
    for _ in range(4):  # e.g. deb -> bzImage -> xz -> ELF; gzip -> Image
        if data[:4] == ELF_MAGIC:
            report("scanning image", 0.0)
            image = _from_elf(data, name)
            break
        if is_bzimage(data):
            layers.append("bzImage")
            kind, payload = bzimage_payload(data, name)
            layers.append(kind)
            data = decompress(kind, payload, name, report)
            continue
        if is_arm64_image(data):
            layers.append("Image")
            report("scanning image", 0.0)
            image = _from_arm64_image(data, name)
            break
        if is_zboot(data):
            layers.append("zboot")
            kind, payload = zboot_payload(data, name)
            layers.append(kind)
            data = decompress(kind, payload, name, report)
            continue
        packed = compression_of(data)
        if packed is None:
            what = describe_bytes(data)
            inside = f" inside {' > '.join(layers)}" if layers else ""
            raise KernelImageError(f"{name} is not a kernel image: found {what}{inside}")
        layers.append(packed)
        data = decompress(packed, data, name, report)
    else:
        raise KernelImageError(f"{name}: too many nested layers ({' > '.join(layers)})")
    image.layers = layers
    report("scanning image", 1.0)
    return image


def _from_elf(data: bytes, name: str) -> KernelImage:
    arch, pointer_size, endian = elf_header(data, name)
    return KernelImage(
        vmlinux=data,
        arch=arch,
        pointer_size=pointer_size,
        endian=endian,
        is_elf=True,
        btf=elf_btf(data),
        banner=find_banner(data),
    )


def _from_arm64_image(data: bytes, name: str) -> KernelImage:
    endian = arm64_endian(data)
    return KernelImage(
        vmlinux=data,
        arch="aarch64",
        pointer_size=8,
        endian=endian,
        is_elf=False,
        btf=find_btf(data, endian),
        banner=find_banner(data),
        page_size=arm64_page_size(data),
    )


# -- Debian packages ------------------------------------------------------------------


_BOOT_FILES = {
    "kernel": re.compile(r"^boot/(vmlinuz|vmlinux|Image|zImage|bzImage)(-.+)?$"),
    "system_map": re.compile(r"^boot/System\.map(-.+)?$"),
    "config": re.compile(r"^boot/config(-.+)?$"),
}
#: Debian 14 and later: linux-binary-VERSION holds only usr/lib/modules/VERSION/vmlinuz.
_MODULES_FILES = {"kernel": re.compile(r"^usr/lib/modules/[^/]+/vmlinuz$")}
_DBG_FILES = {"system_map": re.compile(r"^usr/lib/debug/boot/System\.map(-.+)?$")}


def _read_deb(
    path: Path, wanted: dict[str, re.Pattern[str]], folder: str, report: Progress
) -> tuple[dict[str, str], dict[str, bytes]]:
    """(control fields, {kind: content}) of a Debian package."""
    try:
        fields = deb.control_fields(path)
        files = deb.find_files(path, wanted, folder, lambda f: report("reading package", f))
    except PackageError as exc:
        raise KernelImageError(str(exc)) from exc
    report("reading package", 1.0)
    return fields, files


def _open_deb(path: Path, report: Progress) -> KernelImage:
    fields, files = _read_deb(path, _BOOT_FILES, "boot/", report)
    package = fields.get("Package", path.name)
    if "kernel" not in files:
        files.update(_read_deb(path, _MODULES_FILES, "usr/lib/modules/", report)[1])
    if "kernel" not in files:
        hint = " (a -dbg package? pass it with --system-map)" if "-dbg" in package else ""
        raise KernelImageError(
            f"{path} is not a kernel image: Debian package {package} has no boot/vmlinuz-*{hint}"
        )
    image = image_from_bytes(files.pop("kernel"), f"{path}:vmlinuz", report)
    image.layers.insert(0, "deb")
    image.package = package
    image.package_version = fields.get("Version")
    smap = files.get("system_map")
    if smap is not None and not is_stub(smap):
        image.system_map = smap.decode("utf-8", "replace")
    if "config" in files:
        image.config = files["config"].decode("utf-8", "replace")
    return image


def deb_system_map(path: Path | str, progress: Progress | None = None) -> tuple[str, str]:
    """(System.map text, "package version") from a kernel or -dbg package.

    The -dbg package keeps the real map at usr/lib/debug/boot/System.map-*, near
    the start of its 850 MB data tarball, so this reads only a few MB of it.
    """
    path = Path(path)
    report = progress or (lambda _stage, _fraction: None)
    fields, files = _read_deb(path, _DBG_FILES, "usr/lib/debug/boot/", report)
    if "system_map" not in files:
        fields, files = _read_deb(path, {"system_map": _BOOT_FILES["system_map"]}, "boot/", report)
    what = f"{fields.get('Package', path.name)} {fields.get('Version', '')}".strip()
    smap = files.get("system_map")
    if smap is None or is_stub(smap):
        raise ProfileError(
            f"{what} holds no real System.map: it is in the linux-image-<version>-dbg package"
        )
    return smap.decode("utf-8", "replace"), what
