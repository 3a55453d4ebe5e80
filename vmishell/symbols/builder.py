"""Build a kernel profile (Volatility3 ISF) from what the kernel package ships.

Types come from BTF (the image's .BTF section, or a detached BTF file made
with pahole from a -dbg vmlinux); symbol addresses from, in order: a
System.map the caller gives, the package's real System.map, the kernel's own
kallsyms tables. No debug package is needed when the kernel has BTF and
CONFIG_KALLSYMS_ALL, as Debian 12's amd64 kernel does (its arm64 kernel has BTF
but no KALLSYMS_ALL, its i386 kernels neither: they need the -dbg System.map).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

from vmishell.errors import KernelImageError, ProfileError
from vmishell.symbols.containers import (
    AR_MAGIC,
    BTF_MAGIC_BE,
    BTF_MAGIC_LE,
    ELF_MAGIC,
    describe_bytes,
)
from vmishell.symbols.kimage import (
    NO_BTF_HINT,
    KernelImage,
    deb_system_map,
    image_from_bytes,
    open_kernel,
)
from vmishell.symbols.locations import built_dir
from vmishell.symbols.sysmap import (
    ESSENTIAL_DATA_SYMBOLS,
    SymbolTable,
    load_system_map,
    parse_system_map,
)

Progress = Callable[[str, float], None]

PROFILE_SUFFIX = ".json.xz"


def default_output_dir() -> Path:
    """Where built profiles go by default: a folder the profile finder searches."""
    return built_dir()


def build_profile(
    source: Path | str,
    out: Path | str | None = None,
    *,
    system_map: Path | str | None = None,
    btf: Path | str | None = None,
    progress: Progress | None = None,
) -> Path:
    """Write the profile of the kernel in `source` and return its path.

    `out` may be a file, a folder (the name is derived from the banner, e.g.
    linux-6.1.0-57-amd64-6.1.192-3.json.xz) or None (the built-profiles cache).
    """
    from vmishell.symbols.isf_build import build_isf, write_isf

    report = progress or (lambda _stage, _fraction: None)
    image = open_kernel(source, report)
    btf_bytes, types_from = _types(image, btf)
    symbols = choose_symbols(image, system_map, report)
    banner = exact_banner(image, symbols)
    path = output_path(out, profile_filename(image, banner))
    producer = {
        "kernel": image.describe(),
        **image.target(),
        "types_from": types_from,
        "symbols_from": _recorded(symbols.source),
    }
    isf = build_isf(
        btf_bytes,
        symbols.addresses,
        banner=banner,
        pointer_size=image.pointer_size,
        endian=image.endian,
        producer=producer,
        progress=report,
    )
    del btf_bytes, image
    report("writing profile", 0.0)
    written = write_isf(isf, path)
    report("writing profile", 1.0)
    return written


def _recorded(source: str) -> str:
    """How a symbol source is named in the ISF: by file name, never by a local path."""
    return f"System.map file {Path(source).name}" if Path(source).is_absolute() else source


def _types(image: KernelImage, btf: Path | str | None) -> tuple[bytes, str]:
    if btf is None:
        return image.require_btf(), "BTF in the kernel image"
    return load_btf_file(Path(btf)), f"BTF file {Path(btf).name}"


def load_btf_file(path: Path) -> bytes:
    """Raw BTF (pahole --btf_encode_detached) or an ELF vmlinux with a .BTF section."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ProfileError(f"cannot read BTF file {path}: {exc.strerror}") from exc
    if data.startswith((BTF_MAGIC_LE[:2], BTF_MAGIC_BE[:2])):
        return data
    if data.startswith(ELF_MAGIC):
        try:
            image = image_from_bytes(data, str(path))
        except KernelImageError as exc:
            raise ProfileError(f"--btf {path}: {exc}") from exc
        return image.require_btf()
    raise ProfileError(f"{path} is not a BTF file: found {describe_bytes(data)}; {NO_BTF_HINT}")


def choose_symbols(
    image: KernelImage, system_map: Path | str | None = None, progress: Progress | None = None
) -> SymbolTable:
    """The best symbol source available, checked against the image."""
    report = progress or (lambda _stage, _fraction: None)
    if system_map is not None:
        table = _load_map(Path(system_map), report)
        _check_matches(image, table)
        return table
    if image.system_map is not None:
        table = parse_system_map(image.system_map, f"{image.describe()} System.map")
        _check_matches(image, table)
        return table
    report("reading kallsyms", 0.0)
    table = image.kallsyms()
    report("reading kallsyms", 1.0)
    missing = table.missing(ESSENTIAL_DATA_SYMBOLS)
    if missing:
        setting = image.config_option("KALLSYMS_ALL")
        why = (
            "the kernel is built without CONFIG_KALLSYMS_ALL"
            if setting is None and image.config
            else "the kernel was probably built without CONFIG_KALLSYMS_ALL"
        )
        release = image.version or "<version>"
        raise ProfileError(
            f"kallsyms of {image.describe()} has {len(table)} symbols but lacks "
            f"{', '.join(missing)}: {why}, so kallsyms lists functions only. "
            f"Pass the real System.map with --system-map (/usr/lib/debug/boot/System.map-"
            f"{release} in the linux-image-{release}-dbg package)"
        )
    return table


def _load_map(path: Path, report: Progress) -> SymbolTable:
    """A System.map file, or the one inside a kernel -dbg package."""
    try:
        with path.open("rb") as f:
            is_deb = f.read(len(AR_MAGIC)) == AR_MAGIC
    except OSError as exc:
        raise ProfileError(f"cannot read System.map {path}: {exc.strerror}") from exc
    if not is_deb:
        return load_system_map(path)
    text, what = deb_system_map(path, report)
    return parse_system_map(text, f"{what} System.map")


def _check_matches(image: KernelImage, table: SymbolTable) -> None:
    """Refuse a System.map from another build: its linux_banner must point at a banner."""
    address = table.get("linux_banner")
    if address is None:
        return
    text = image.read_cstring(address, _text_base(table))
    if text is None:
        return  # cannot tell (raw image without _text)
    if not text.startswith(b"Linux version "):
        raise ProfileError(
            f"{table.source} does not match {image.describe()}: its linux_banner "
            f"({address:#x}) does not point at the kernel's banner"
        )


def _text_base(symbols: SymbolTable) -> int | None:
    """Link address of a raw image's first byte: `_text`, else what kallsyms learned."""
    return symbols.get("_text") or getattr(symbols, "image_base", None)


def exact_banner(image: KernelImage, symbols: SymbolTable) -> bytes | None:
    """linux_banner's text, read at its symbol when possible (6.1 images hold two)."""
    address = symbols.get("linux_banner")
    if address is not None:
        text = image.read_cstring(address, _text_base(symbols))
        if text and text.startswith(b"Linux version "):
            return text
    return image.banner


def profile_filename(image: KernelImage, banner: bytes | None = None) -> str:
    """e.g. linux-6.1.0-57-amd64-6.1.192-3.json.xz: release, then the distribution version."""
    banner = banner or image.banner
    text = banner.decode("ascii", "replace") if banner else ""
    m = re.match(r"Linux version (\S+)", text)
    release = m.group(1) if m else (image.version or "unknown")
    # The distribution's version is the last "Debian X" (the first is the compiler's).
    found = re.findall(r"\bDebian (\d\S*)", text)
    build = found[-1] if found else image.package_version
    if not build and banner:
        build = hashlib.sha256(banner).hexdigest()[:12]
    name = f"linux-{release}" + (f"-{build}" if build and build not in release else "")
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name) + PROFILE_SUFFIX


def output_path(out: Path | str | None, filename: str) -> Path:
    if out is None:
        return default_output_dir() / filename
    out = Path(out)
    if out.is_dir() or str(out).endswith("/"):
        return out / filename
    return out
