"""Find the kernel's BTF in guest-physical memory by its header alone.

The kernel keeps its BTF blob (`__start_BTF` .. `__stop_BTF`) in its
read-only data, contiguous in the image and never copied (the kernel and
/sys/kernel/btf/vmlinux use it in place). A candidate is a position holding
the magic 0xEB9F, version 1 and a header whose type and string sections sit
back to back, the string section starting and ending with NUL, the first
type record's kind known and its name inside the strings. The guest can
plant such a header anywhere, so the caller prefers the blob at the address
kallsyms gives for `__start_BTF`; every scan here is capped.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmishell.errors import ProfileError, VmiError
from vmishell.sources.base import PhysicalSource

HEADER_LEN = 24
#: The largest vmlinux BTF accepted (Debian's amd64 6.1 kernel has 4.4 MB, arm64 4.8 MB).
MAX_BTF = 64 << 20
#: Header candidates examined in one scan (a guest can fill RAM with the magic).
MAX_CANDIDATES = 256
#: BTF kinds known to vmishell's parser (BTF_KIND_INT .. BTF_KIND_ENUM64).
_MAX_KIND = 19
_MAGIC = {"little": b"\x9f\xeb\x01", "big": b"\xeb\x9f\x01"}


@dataclass(frozen=True, slots=True)
class BtfHeader:
    """A plausible BTF header: where it is and how long its blob is."""

    paddr: int
    endian: str
    hdr_len: int
    type_len: int
    str_off: int
    str_len: int

    @property
    def size(self) -> int:
        return self.hdr_len + self.str_off + self.str_len


def parse_header(data: bytes, paddr: int = 0) -> BtfHeader:
    """The header at the start of `data`; ProfileError says which check failed and where."""
    if len(data) < HEADER_LEN:
        raise ProfileError(f"BTF header at physical {paddr:#x}: only {len(data)} bytes")
    if data[:3] == _MAGIC["little"]:
        endian, bo = "little", "<"
    elif data[:3] == _MAGIC["big"]:
        endian, bo = "big", ">"
    else:
        raise ProfileError(f"no BTF magic (eb9f, version 1) at physical {paddr:#x}")
    hdr_len, t_off, t_len, s_off, s_len = struct.unpack_from(bo + "5I", data, 4)
    where = f"BTF header at physical {paddr:#x}"
    if data[3] != 0:
        raise ProfileError(f"{where}: flags {data[3]:#x} are not 0")
    if hdr_len != HEADER_LEN:
        raise ProfileError(f"{where}: header length {hdr_len} is not {HEADER_LEN}")
    if t_off != 0 or t_len == 0 or t_len % 4:
        raise ProfileError(f"{where}: type section at {t_off:#x}+{t_len:#x} is not at 0 and whole")
    if s_off != t_len:
        raise ProfileError(f"{where}: strings at {s_off:#x} do not follow the types ({t_len:#x})")
    if s_len == 0 or hdr_len + s_off + s_len > MAX_BTF:
        raise ProfileError(f"{where}: total size {hdr_len + s_off + s_len:#x} is implausible")
    return BtfHeader(paddr, endian, hdr_len, t_len, s_off, s_len)


def check_blob(header: BtfHeader, blob: bytes) -> None:
    """Cheap consistency of a whole blob: strings delimited by NUL, first type sane."""
    where = f"BTF at physical {header.paddr:#x}"
    if len(blob) != header.size:
        raise ProfileError(f"{where}: read {len(blob)} of {header.size} bytes")
    strings = header.hdr_len + header.str_off
    if blob[strings] != 0 or blob[-1] != 0:
        raise ProfileError(f"{where}: the string section is not delimited by NUL bytes")
    bo = "<" if header.endian == "little" else ">"
    name_off, info = struct.unpack_from(bo + "2I", blob, header.hdr_len)
    kind = (info >> 24) & 0x1F
    if not 1 <= kind <= _MAX_KIND or name_off >= header.str_len:
        raise ProfileError(f"{where}: the first type record (kind {kind}) is not BTF")


def read_btf(source: PhysicalSource, paddr: int) -> tuple[BtfHeader, bytes]:
    """The BTF blob at `paddr`, its header and consistency checked."""
    try:
        header = parse_header(source.read(paddr, HEADER_LEN), paddr)
        blob = source.read(paddr, header.size)
    except VmiError as exc:
        if isinstance(exc, ProfileError):
            raise
        raise ProfileError(f"BTF at physical {paddr:#x} cannot be read: {exc}") from exc
    check_blob(header, blob)
    return header, blob


def btf_candidates(
    source: PhysicalSource, start: int, end: int, cap: int = MAX_CANDIDATES
) -> list[BtfHeader]:
    """Plausible BTF headers in physical [start, end), at most `cap` positions examined."""
    found: list[BtfHeader] = []
    examined = 0
    for magic in _MAGIC.values():
        for paddr in source.find(magic, start, end):
            examined += 1
            if examined > cap:
                return found
            try:
                found.append(parse_header(source.read(paddr, HEADER_LEN), paddr))
            except VmiError:
                continue
    return found
