"""The containers a vmlinux comes in, and what can be found in one without symbols.

An x86 bzImage holds a compressed vmlinux behind its boot protocol header; an
arm64 EFI zboot image holds a compressed `Image`; an arm64 `Image` is the raw
kernel with a 64-byte header; a vmlinux is an ELF file. These functions find
the payload of each, read an ELF's header, segments and sections, and search
raw bytes for the banner and the BTF blob. `describe_bytes` names what a
file is when it is none of these.
"""

from __future__ import annotations

import io
import re
import struct
from typing import NamedTuple

from vmishell.errors import KernelImageError
from vmishell.symbols.compression import COMPRESSION_MAGICS, compression_of

ELF_MAGIC = b"\x7fELF"
AR_MAGIC = b"!<arch>\n"
BTF_MAGIC_LE = b"\x9f\xeb\x01\x00\x18\x00\x00\x00"  # magic, version 1, flags 0, hdr_len 24
BTF_MAGIC_BE = b"\xeb\x9f\x01\x00\x00\x00\x00\x18"
_BANNER_RE = re.compile(rb"Linux version [0-9][\x20-\x7e]{8,1000}\n\x00")
_ELF_MACHINES = {3: "i386", 62: "x86_64", 183: "aarch64"}


# -- x86 bzImage, arm64 zboot and Image -----------------------------------------------


def is_bzimage(data: bytes) -> bool:
    return len(data) > 0x210 and data[0x202:0x206] == b"HdrS"


def is_arm64_image(data: bytes) -> bool:
    return len(data) > 0x40 and data[0x38:0x3C] == b"ARM\x64"


def is_zboot(data: bytes) -> bool:
    return data[:2] == b"MZ" and data[4:8] == b"zimg"


def bzimage_payload(data: bytes, name: str = "bzImage") -> tuple[str, bytes]:
    """The compressed vmlinux of an x86 bzImage, located by the boot protocol header."""
    setup_sects = data[0x1F1] or 4
    version = struct.unpack_from("<H", data, 0x206)[0]
    pm_start = (setup_sects + 1) * 512
    if version >= 0x208:
        offset, length = struct.unpack_from("<II", data, 0x248)
        start, end = pm_start + offset, pm_start + offset + length
        if end > len(data) or length == 0:
            raise KernelImageError(
                f"{name}: truncated bzImage: payload at {start:#x}+{length:#x} "
                f"but the file has {len(data):#x} bytes"
            )
        payload = data[start:end]
        kind = compression_of(payload)
        if kind is None:
            raise KernelImageError(
                f"{name}: unknown bzImage payload compression (magic bytes "
                f"{payload[:8].hex(' ')} at offset {start:#x})"
            )
        return kind, payload
    # Protocol < 2.08 has no payload fields: look for a known magic after the setup code.
    for kind, magic in COMPRESSION_MAGICS:
        pos = data.find(magic, pm_start)
        if pos >= 0:
            return kind, data[pos:]
    raise KernelImageError(
        f"{name}: bzImage with boot protocol {version >> 8}.{version & 0xFF} and no "
        "recognisable compressed payload"
    )


def zboot_payload(data: bytes, name: str = "zboot") -> tuple[str, bytes]:
    """The payload of an EFI zboot image ('MZ' .. 'zimg', offset, size, method name)."""
    offset, size = struct.unpack_from("<II", data, 8)
    if offset + size > len(data):
        raise KernelImageError(f"{name}: truncated EFI zboot image: payload ends past the file")
    payload = data[offset : offset + size]
    kind = compression_of(payload)
    if kind is None:
        method = data[0x18:0x38].split(b"\0")[0].decode("ascii", "replace")
        raise KernelImageError(
            f"{name}: unknown zboot payload compression {method!r} "
            f"(magic bytes {payload[:8].hex(' ')})"
        )
    return kind, payload


def arm64_endian(data: bytes) -> str:
    """Byte order of an arm64 Image, from its header flags."""
    flags = struct.unpack_from("<Q", data, 0x18)[0]
    return "big" if flags & 1 else "little"


#: arm64 Image header flags bits 1-2 -> the kernel's page size (0: unspecified).
_ARM64_PAGE_SIZES = {1: 4096, 2: 16384, 3: 65536}


def arm64_page_size(data: bytes) -> int | None:
    """The page size an arm64 Image was built for, from its header flags (None: unsaid)."""
    flags = struct.unpack_from("<Q", data, 0x18)[0]
    return _ARM64_PAGE_SIZES.get(flags >> 1 & 3)


# -- ELF vmlinux ------------------------------------------------------------------------


class ElfHeader(NamedTuple):
    arch: str
    pointer_size: int
    endian: str


def elf_header(data: bytes, name: str) -> ElfHeader:
    """Machine, word size and byte order of an ELF vmlinux; refuses other ELF files."""
    if len(data) < 0x40:
        raise KernelImageError(f"{name}: truncated ELF header")
    ei_class, ei_data = data[4], data[5]
    if ei_class not in (1, 2) or ei_data not in (1, 2):
        raise KernelImageError(f"{name}: malformed ELF identification bytes")
    endian = "little" if ei_data == 1 else "big"
    e_type, e_machine = struct.unpack_from("<HH" if ei_data == 1 else ">HH", data, 16)
    if e_type != 2:
        what = {
            1: "a relocatable object (a kernel module?)",
            3: "a shared object",
            4: "a core dump",
        }
        raise KernelImageError(
            f"{name} is not a kernel image: found an ELF {what.get(e_type, f'of type {e_type}')}"
        )
    arch = _ELF_MACHINES.get(e_machine)
    if arch is None:
        raise KernelImageError(f"{name}: ELF vmlinux for unsupported machine {e_machine}")
    return ElfHeader(arch, 8 if ei_class == 2 else 4, endian)


def elf_btf(data: bytes) -> bytes | None:
    """The .BTF section of an ELF vmlinux, if it has a valid one."""
    btf = elf_section(data, ".BTF")
    return btf if btf is not None and valid_btf_header(btf, 0) else None


def load_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(vaddr, file offset, file size) of each PT_LOAD segment of an ELF."""
    bo = "<" if data[5] == 1 else ">"
    if data[4] == 2:
        (phoff,) = struct.unpack_from(bo + "Q", data, 0x20)
        phentsize, phnum = struct.unpack_from(bo + "HH", data, 0x36)
        fmt, fields = bo + "IIQQQQ", (0, 2, 3, 5)  # type, flags, offset, vaddr, paddr, filesz
    else:
        (phoff,) = struct.unpack_from(bo + "I", data, 0x1C)
        phentsize, phnum = struct.unpack_from(bo + "HH", data, 0x2A)
        fmt, fields = bo + "IIIIII", (0, 1, 2, 4)  # type, offset, vaddr, paddr, filesz
    segments = []
    for i in range(phnum):
        pos = phoff + i * phentsize
        if pos + struct.calcsize(fmt) > len(data):
            break
        values = struct.unpack_from(fmt, data, pos)
        p_type, p_offset, p_vaddr, p_filesz = (values[k] for k in fields)
        if p_type == 1:  # PT_LOAD
            segments.append((p_vaddr, p_offset, p_filesz))
    return segments


def elf_section(data: bytes, wanted: str) -> bytes | None:
    """Bytes of one section, read through pyelftools without copying the file."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        elf = ELFFile(io.BytesIO(data))
        section = elf.get_section_by_name(wanted)
        if section is None or section["sh_type"] == "SHT_NOBITS":
            return None
        off, size = section["sh_offset"], section["sh_size"]
    except (ELFError, struct.error, ValueError) as exc:
        raise KernelImageError(f"malformed ELF vmlinux: {exc}") from exc
    if off + size > len(data):
        raise KernelImageError(f"truncated ELF vmlinux: section {wanted} ends past the file")
    return data[off : off + size]


# -- searching raw bytes ----------------------------------------------------------------


def find_banner(data: bytes) -> bytes | None:
    """The `linux_banner` text ("Linux version ...\\n", without its NUL), best guess.

    Since 6.1 the image also holds an unnamed early copy (init/version.c's weak
    banner, with an empty build number); the real one is linked last, so the
    last candidate wins. With symbols at hand, `KernelImage.read_cstring` at
    `linux_banner` is exact.
    """
    found = None
    pos = data.find(b"Linux version ")
    while pos >= 0:
        m = _BANNER_RE.match(data, pos)
        if m:
            found = m.group(0)[:-1]
        pos = data.find(b"Linux version ", pos + 1)
    return found


def find_btf(data: bytes, endian: str = "little") -> bytes | None:
    """BTF blob in a raw image: the magic, then a header whose sections fit and make sense."""
    magic = BTF_MAGIC_LE if endian == "little" else BTF_MAGIC_BE
    pos = data.find(magic)
    while pos >= 0:
        size = valid_btf_header(data, pos)
        if size:
            return data[pos : pos + size]
        pos = data.find(magic, pos + 1)
    return None


def valid_btf_header(data: bytes, pos: int) -> int:
    """Total size of the BTF blob at `pos`, or 0 when the header does not check out."""
    if len(data) < pos + 24:
        return 0
    fmt = "<" if data[pos] == 0x9F else ">"
    magic, _version, _flags, hdr_len = struct.unpack_from(fmt + "HBBI", data, pos)
    if magic != 0xEB9F or hdr_len < 24:
        return 0
    type_off, type_len, str_off, str_len = struct.unpack_from(fmt + "IIII", data, pos + 8)
    size = hdr_len + max(type_off + type_len, str_off + str_len)
    if type_len == 0 or str_len == 0 or pos + size > len(data):
        return 0
    if data[pos + hdr_len + str_off] != 0:  # string section starts with the empty name
        return 0
    return size


# -- describing what a file is ------------------------------------------------------------

_FILE_MAGICS = (
    (b"PK\x03\x04", "a zip archive"),
    (b"%PDF", "a PDF document"),
    (b"\x89PNG", "a PNG image"),
    (AR_MAGIC, "an ar archive"),
    (b"MZ", "a PE/EFI executable without a Linux boot header"),
    (b"#!", "a script"),
    (b"{", "JSON or text"),
    (b"\x9f\xeb", "a BTF file (types only, no kernel)"),
)


def describe_bytes(data: bytes) -> str:
    """A short guess at what `data` is, for 'not a kernel' messages."""
    if not data:
        return "an empty file"
    if len(data) > 262 and data[257:262] == b"ustar":
        return "a tar archive"
    for magic, what in _FILE_MAGICS:
        if data.startswith(magic):
            return what
    kind = compression_of(data)
    if kind:
        return f"{kind}-compressed data"
    head = data[:512]
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        first = head.split(b"\n", 1)[0][:40].decode("ascii")
        return f"a text file starting with {first!r}"
    return f"unrecognised data (first bytes {data[:8].hex(' ')})"
