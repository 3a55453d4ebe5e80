"""Open what a distribution ships as a kernel and get the vmlinux inside.

A profile can be built without any debug package: Debian's kernel package
carries a compressed kernel whose vmlinux holds BTF (types) and kallsyms
(symbol addresses). `open_kernel` accepts the `.deb` itself, an x86 bzImage
(any of the kernel's payload compressions), an arm64 `Image` (raw, gzipped or
EFI zboot) or an ELF vmlinux, and returns a `KernelImage`.
"""

from __future__ import annotations

import bz2
import io
import lzma
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vmishell.errors import KernelImageError, PackageError, ProfileError
from vmishell.symbols import deb
from vmishell.symbols.sysmap import is_stub

if TYPE_CHECKING:
    from vmishell.symbols.kallsyms import Kallsyms

Progress = Callable[[str, float], None]

ELF_MAGIC = b"\x7fELF"
AR_MAGIC = b"!<arch>\n"
BTF_MAGIC_LE = b"\x9f\xeb\x01\x00\x18\x00\x00\x00"  # magic, version 1, flags 0, hdr_len 24
BTF_MAGIC_BE = b"\xeb\x9f\x01\x00\x00\x00\x00\x18"
_BANNER_RE = re.compile(rb"Linux version [0-9][\x20-\x7e]{8,1000}\n\x00")

NO_BTF_HINT = (
    "build a detached BTF file from the -dbg package's vmlinux "
    "(/usr/lib/debug/boot/vmlinux-*) with `pahole --btf_encode_detached=FILE VMLINUX` "
    "and pass it with --btf FILE"
)

#: Payload magics, most specific first (the kernel's `size_append` adds 4 bytes after each).
COMPRESSION_MAGICS: tuple[tuple[str, bytes], ...] = (
    ("gzip", b"\x1f\x8b"),
    ("xz", b"\xfd7zXZ\x00"),
    ("lzma", b"\x5d\x00\x00"),
    ("bzip2", b"BZh"),
    ("lz4", b"\x02\x21\x4c\x18"),  # legacy frame, what `lz4 -l` writes
    ("lz4-frame", b"\x04\x22\x4d\x18"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("lzo", b"\x89LZO\x00\r\n\x1a\n"),  # lzop file format
)

_ELF_MACHINES = {3: "i386", 62: "x86_64", 183: "aarch64"}
_CHUNK = 1 << 20


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
        for seg_vaddr, seg_offset, seg_size in _load_segments(self.vmlinux):
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
        if len(data) > 0x210 and data[0x202:0x206] == b"HdrS":
            layers.append("bzImage")
            kind, payload = bzimage_payload(data, name)
            layers.append(kind)
            data = decompress(kind, payload, name, report)
            continue
        if len(data) > 0x40 and data[0x38:0x3C] == b"ARM\x64":
            layers.append("Image")
            report("scanning image", 0.0)
            image = _from_arm64_image(data, name)
            break
        if data[:2] == b"MZ" and data[4:8] == b"zimg":
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


# -- formats --------------------------------------------------------------------------


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


def compression_of(data: bytes) -> str | None:
    for kind, magic in COMPRESSION_MAGICS:
        if data.startswith(magic):
            return kind
    return None


def _from_elf(data: bytes, name: str) -> KernelImage:
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
    btf = _elf_section(data, ".BTF")
    if btf is not None and not _valid_btf_header(btf, 0):
        btf = None
    return KernelImage(
        vmlinux=data,
        arch=arch,
        pointer_size=8 if ei_class == 2 else 4,
        endian=endian,
        is_elf=True,
        btf=btf,
        banner=find_banner(data),
    )


def _load_segments(data: bytes) -> list[tuple[int, int, int]]:
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


def _elf_section(data: bytes, wanted: str) -> bytes | None:
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


def _from_arm64_image(data: bytes, name: str) -> KernelImage:
    flags = struct.unpack_from("<Q", data, 0x18)[0]
    endian = "big" if flags & 1 else "little"
    return KernelImage(
        vmlinux=data,
        arch="aarch64",
        pointer_size=8,
        endian=endian,
        is_elf=False,
        btf=find_btf(data, endian),
        banner=find_banner(data),
    )


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
        size = _valid_btf_header(data, pos)
        if size:
            return data[pos : pos + size]
        pos = data.find(magic, pos + 1)
    return None


def _valid_btf_header(data: bytes, pos: int) -> int:
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


# -- decompression --------------------------------------------------------------------


def decompress(
    kind: str, payload: bytes, name: str = "image", progress: Progress | None = None
) -> bytes:
    """Decompress a kernel payload; the last 4 bytes, when the stream leaves them, are its size."""
    report = progress or (lambda _stage, _fraction: None)
    stage = f"decompressing {kind}"
    report(stage, 0.0)
    try:
        if kind in _STREAMING:
            out, rest, complete = _stream(_STREAMING[kind](), payload, lambda f: report(stage, f))
        elif kind == "lz4":
            out, rest, complete = _lz4_legacy(payload)
        elif kind == "lz4-frame":
            import lz4.frame

            out, rest, complete = lz4.frame.decompress(payload), b"", True
        elif kind == "lzo":
            out, rest, complete = lzop_decompress(payload)
        else:
            raise KernelImageError(f"{name}: unknown compression {kind!r}")
    except KernelImageError:
        raise
    except Exception as exc:  # each codec has its own error type; all mean corrupt data
        raise KernelImageError(f"{name}: corrupt {kind} payload: {exc}") from exc
    if not complete:
        raise KernelImageError(
            f"{name}: truncated {kind} payload: the stream ends early "
            f"({len(payload)} compressed bytes gave {len(out)} bytes)"
        )
    if len(rest) >= 4:
        expected = int.from_bytes(rest[:4], "little")
        if expected != len(out) and len(rest) == 4:
            raise KernelImageError(
                f"{name}: {kind} payload decompressed to {len(out)} bytes, "
                f"the kernel expects {expected}: truncated or corrupt"
            )
    report(stage, 1.0)
    return out


def _zstd_decompressor():
    import zstandard

    return zstandard.ZstdDecompressor(max_window_size=1 << 31).decompressobj()


_STREAMING: dict[str, Callable[[], object]] = {
    "gzip": lambda: zlib.decompressobj(wbits=31),
    "xz": lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ),
    "lzma": lambda: lzma.LZMADecompressor(lzma.FORMAT_ALONE),
    "bzip2": bz2.BZ2Decompressor,
    "zstd": _zstd_decompressor,
}


def _stream(dec, payload: bytes, report: Callable[[float], None]) -> tuple[bytes, bytes, bool]:
    """Feed `payload` in chunks (for progress); returns (output, bytes after the stream, eof)."""
    chunks: list[bytes] = []
    view = memoryview(payload)
    total = len(payload)
    fed = 0
    while fed < total and not dec.eof:
        chunks.append(dec.decompress(view[fed : fed + _CHUNK]))
        fed = min(fed + _CHUNK, total)
        report(fed / total)
    if hasattr(dec, "flush") and not dec.eof:
        chunks.append(dec.flush())
    rest = bytes(dec.unused_data) + payload[fed:]
    out = b"".join(chunks)
    del chunks
    return out, rest, bool(dec.eof)


def _lz4_legacy(payload: bytes) -> tuple[bytes, bytes, bool]:
    """The kernel's lz4 format (`lz4 -l`): magic 0x184C2102, then <u32 size><block> pairs.

    Each block decompresses to at most 8 MiB; the kernel appends its own size after.
    """
    import lz4.block

    chunks: list[bytes] = []
    pos, end = 4, len(payload)
    while pos + 4 <= end:
        size = int.from_bytes(payload[pos : pos + 4], "little")
        if size == 0x184C2102:  # concatenated streams repeat the magic
            pos += 4
            continue
        if pos + 4 + size > end:
            if pos + 4 == end and chunks:  # the kernel's appended size
                return b"".join(chunks), payload[pos:], True
            return b"".join(chunks), b"", False
        chunks.append(
            lz4.block.decompress(payload[pos + 4 : pos + 4 + size], uncompressed_size=8 << 20)
        )
        pos += 4 + size
    return b"".join(chunks), payload[pos:], bool(chunks)


# lzop header flags
_F_ADLER32_D, _F_ADLER32_C, _F_H_EXTRA_FIELD = 0x1, 0x2, 0x40
_F_CRC32_D, _F_CRC32_C, _F_H_FILTER = 0x100, 0x200, 0x800


def lzop_decompress(data: bytes) -> tuple[bytes, bytes, bool]:
    """Decompress an lzop file (what the kernel's `lzo` compression writes).

    Returns (output, bytes after the end-of-file marker, whether the marker was met).
    """
    if not data.startswith(b"\x89LZO\x00\r\n\x1a\n"):
        raise KernelImageError("not an lzop stream")
    r = _Reader(data, 9)
    version = r.u16()
    r.u16()  # library version
    if version >= 0x0940:
        r.u16()  # version needed to extract
    method = r.u8()
    if method not in (1, 2, 3):  # LZO1X-1, LZO1X-1(15), LZO1X-999
        raise KernelImageError(f"lzop method {method} is not LZO1X")
    if version >= 0x0940:
        r.u8()  # level
    flags = r.u32()
    if flags & _F_H_FILTER:
        r.u32()
    r.skip(8 if version < 0x0940 else 12)  # mode, mtime (low, high)
    r.skip(r.u8() + 4)  # name, header checksum
    if flags & _F_H_EXTRA_FIELD:
        r.skip(r.u32() + 4)
    out = bytearray()
    while r.remaining() >= 4:
        dst_len = r.u32()
        if dst_len == 0:
            return bytes(out), data[r.pos :], True
        if r.remaining() < 4:
            break
        src_len = r.u32()
        d_adler = r.u32() if flags & _F_ADLER32_D else None
        if flags & _F_CRC32_D:
            r.u32()
        if src_len < dst_len:
            r.skip(4 * bool(flags & _F_ADLER32_C) + 4 * bool(flags & _F_CRC32_C))
        if r.remaining() < src_len:
            break
        block = data[r.pos : r.pos + src_len]
        r.pos += src_len
        plain = block if src_len == dst_len else lzo1x_decompress(block, dst_len)
        if len(plain) != dst_len:
            raise KernelImageError(f"lzop block decompressed to {len(plain)} bytes, not {dst_len}")
        if d_adler is not None and zlib.adler32(plain) != d_adler:
            raise KernelImageError("lzop block checksum mismatch: corrupt data")
        out += plain
    return bytes(out), b"", False


class _Reader:
    """Big-endian cursor for the lzop header."""

    def __init__(self, data: bytes, pos: int) -> None:
        self.data, self.pos = data, pos

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def skip(self, n: int) -> None:
        if self.pos + n > len(self.data):
            raise KernelImageError("truncated lzop header")
        self.pos += n

    def _take(self, n: int) -> int:
        self.skip(n)
        return int.from_bytes(self.data[self.pos - n : self.pos], "big")

    def u8(self) -> int:
        return self._take(1)

    def u16(self) -> int:
        return self._take(2)

    def u32(self) -> int:
        return self._take(4)


def lzo1x_decompress(src: bytes, dst_len: int | None = None) -> bytes:
    """Pure-Python LZO1X decompressor (the format of lzo1x_decompress_safe).

    `state` is what the previous instruction left: 0 after a match with no
    trailing literals, 1-3 after that many trailing literals, 4 after a literal
    run; it decides what a small opcode (< 16) means.
    """
    out = bytearray()
    ip, state = 0, 0
    try:
        if src[0] > 17:
            t = src[0] - 17
            ip = 1
            out += src[ip : ip + t]
            ip += t
            state = t if t < 4 else 4
        while True:
            t = src[ip]
            ip += 1
            if t < 16:
                if state == 0:  # literal run of 3+ bytes
                    if t == 0:
                        while src[ip] == 0:
                            t += 255
                            ip += 1
                        t += 15 + src[ip]
                        ip += 1
                    t += 3
                    if ip + t > len(src):
                        raise IndexError
                    out += src[ip : ip + t]
                    ip += t
                    state = 4
                    continue
                if state == 4:  # 3-byte match, 2..3 KiB back
                    dist, length = 0x801 + (t >> 2) + (src[ip] << 2), 3
                else:  # 2-byte match, up to 1 KiB back
                    dist, length = 1 + (t >> 2) + (src[ip] << 2), 2
                ip += 1
                nxt = t & 3
            elif t >= 64:  # M2: 3-8 bytes, up to 2 KiB back
                dist = 1 + ((t >> 2) & 7) + (src[ip] << 3)
                length = (t >> 5) + 1
                ip += 1
                nxt = t & 3
            else:
                if t >= 32:  # M3: up to 16 KiB back
                    length, extra, base = t & 31, 31, 1
                else:  # M4: 16-48 KiB back, or the end marker
                    length, extra, base = t & 7, 7, ((t & 8) << 11)
                if length == 0:
                    while src[ip] == 0:
                        length += 255
                        ip += 1
                    length += extra + src[ip]
                    ip += 1
                length += 2
                v = src[ip] | (src[ip + 1] << 8)
                ip += 2
                dist = base + (v >> 2)
                nxt = v & 3
                if t < 32:
                    if dist == 0:
                        break
                    dist += 0x4000
            start = len(out) - dist
            if start < 0:
                raise KernelImageError("corrupt LZO data: match reaches before the output")
            if dist >= length:
                out += out[start : start + length]
            else:
                pattern = out[start:]
                out += (pattern * (length // dist + 1))[:length]
            if nxt:
                if ip + nxt > len(src):
                    raise IndexError
                out += src[ip : ip + nxt]
                ip += nxt
            state = nxt
    except IndexError:
        raise KernelImageError("truncated LZO data: input ends before the end marker") from None
    if dst_len is not None and len(out) != dst_len:
        raise KernelImageError(f"LZO block decompressed to {len(out)} bytes, not {dst_len}")
    return bytes(out)


# -- Debian packages ------------------------------------------------------------------


_BOOT_FILES = {
    "kernel": re.compile(r"^boot/(vmlinuz|vmlinux|Image|zImage|bzImage)(-.+)?$"),
    "system_map": re.compile(r"^boot/System\.map(-.+)?$"),
    "config": re.compile(r"^boot/config(-.+)?$"),
}
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
