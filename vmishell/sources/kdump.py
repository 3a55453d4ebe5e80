"""kdump-compressed dumps (makedumpfile's format): what `virsh dump --memory-only
--format kdump-*`, QEMU's `dump-guest-memory` and Debian's kdump-tools write.

Layout (all in blocks of `block_size`, usually the page size): a disk_dump_header,
a kdump_sub_header (phys_base, and where VMCOREINFO and the ELF notes lie), two
bitmaps over page frames (RAM that exists; pages that were dumped), then one
24-byte page descriptor per dumped page, in frame order, pointing at the
page's bytes, compressed with zlib, LZO, snappy or zstd, or stored raw.

QEMU and libvirt write the "flattened" variant (signature "makedumpfile"):
the same file cut into (offset, size, data) records so that it could go
through a pipe. It is read in place through an index of its records.

The file is untrusted: every offset, count and length is checked against the
file, decompression is bounded by the page size, and damage raises a
SourceError (at open) or a PhysicalReadError naming the page (at read).
"""

from __future__ import annotations

import bisect
import os
import re
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vmishell.errors import PhysicalReadError, SourceError
from vmishell.sources.base import PhysicalSource, PhysRange, Registers
from vmishell.sources.elfcore import _EM_386, _EM_X86_64, ElfNote, _parse_notes, _registers

KDUMP_SIGNATURES = (b"KDUMP   ", b"DISKDUMP")
FLAT_SIGNATURE = b"makedumpfile\0\0\0\0"
#: The flattened format's header block; records start after it.
FLAT_HEADER_SIZE = 4096

DUMP_DH_COMPRESSED_ZLIB = 0x1
DUMP_DH_COMPRESSED_LZO = 0x2
DUMP_DH_COMPRESSED_SNAPPY = 0x4
DUMP_DH_COMPRESSED_ZSTD = 0x20
_CODEC_FLAGS = (
    DUMP_DH_COMPRESSED_ZLIB
    | DUMP_DH_COMPRESSED_LZO
    | DUMP_DH_COMPRESSED_SNAPPY
    | DUMP_DH_COMPRESSED_ZSTD
)

#: Page descriptor: offset (off_t), size, flags, page_flags; the same on 32- and 64-bit.
_PAGE_DESC = struct.Struct("<qIIQ")
#: Runs of RAM kept as ranges; a dump fragmented past this is refused as implausible.
MAX_RANGES = 1 << 20
#: Decompressed pages kept (an image never changes, so a cache needs no generation).
CACHED_PAGES = 4096
#: Largest text or note area read from the sub-header.
MAX_NOTE_BYTES = 16 << 20
#: utsname.machine values of 64-bit kernels (their headers use 64-bit fields).
_MACHINES_64 = (b"x86_64", b"aarch64", b"ppc64", b"ppc64le", b"s390x", b"riscv64", b"mips64")


class _Plain:
    """A kdump file read as it is on disk."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path
        self.size = os.fstat(fd).st_size

    def pread(self, offset: int, size: int, what: str) -> bytes:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise SourceError(
                f"{self.path}: {what} at {offset:#x}+{size:#x} lies past the end of the "
                f"file ({self.size:#x} bytes): truncated?"
            )
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise SourceError(f"{self.path}: {what} at {offset:#x} was cut short (file shrank?)")
        return data


class _Flat:
    """A flattened kdump file: a logical file assembled from (offset, size, data) records."""

    _RECORD = struct.Struct(">qq")

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path
        file_size = os.fstat(fd).st_size
        starts: list[int] = []
        ends: list[int] = []
        places: list[int] = []
        pos = FLAT_HEADER_SIZE
        records = []
        while True:
            head = os.pread(fd, 16, pos)
            if len(head) != 16:
                raise SourceError(
                    f"{path}: flattened dump ends at {pos:#x} without its end record (truncated?)"
                )
            offset, size = self._RECORD.unpack(head)
            pos += 16
            if offset == -1 and size == -1:
                break
            if offset < 0 or size < 0 or pos + size > file_size:
                raise SourceError(
                    f"{path}: flattened record at {pos - 16:#x} ({offset:#x}+{size:#x}) is "
                    "damaged or runs past the end of the file"
                )
            records.append((offset, size, pos))
            pos += size
        records.sort()
        for offset, size, place in records:
            if size == 0:
                continue
            if ends and offset < ends[-1]:
                raise SourceError(
                    f"{path}: flattened records overlap at {offset:#x}; rearrange the dump "
                    "with `makedumpfile -R` first"
                )
            if ends and offset == ends[-1] and places[-1] + (ends[-1] - starts[-1]) == place:
                ends[-1] = offset + size  # contiguous in both: one piece
                continue
            starts.append(offset)
            ends.append(offset + size)
            places.append(place)
        self._starts, self._ends, self._places = starts, ends, places
        self.size = ends[-1] if ends else 0

    def pread(self, offset: int, size: int, what: str) -> bytes:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise SourceError(
                f"{self.path}: {what} at {offset:#x}+{size:#x} lies past the end of the "
                f"dump ({self.size:#x} bytes): truncated?"
            )
        parts = []
        pos, end = offset, offset + size
        starts, ends = self._starts, self._ends
        while pos < end:
            i = bisect.bisect_right(starts, pos) - 1
            if i >= 0 and pos < ends[i]:
                n = min(end, ends[i]) - pos
                data = os.pread(self.fd, n, self._places[i] + pos - starts[i])
                if len(data) != n:
                    raise SourceError(f"{self.path}: {what} at {offset:#x} was cut short")
                parts.append(data)
            else:  # a hole between records reads as zeros (the writer skipped it)
                n = min(end, starts[i + 1] if i + 1 < len(starts) else end) - pos
                parts.append(bytes(n))
            pos += n
        return b"".join(parts)


def _cstr(raw: bytes) -> bytes:
    return raw.split(b"\0", 1)[0]


def _plausible(block_size: int, sub_hdr_size: int, bitmap_blocks: int) -> bool:
    """Header fields a real dump can have: a power-of-two block, two equal bitmaps."""
    return (
        1024 <= block_size <= 1 << 16
        and not block_size & (block_size - 1)
        and 0 < sub_hdr_size < 1 << 20
        and bitmap_blocks > 0
        and not bitmap_blocks % 2
    )


class KdumpSource(PhysicalSource):
    """A kdump-compressed (makedumpfile) dump, plain or flattened."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = Path(path)
        self.description = f"kdump {self.path}"
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise SourceError(f"no such dump: {self.path}") from None
        except OSError as exc:
            raise SourceError(f"cannot open {self.path}: {exc.strerror}") from None
        try:
            self._open()
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise
        self._cache: dict[int, bytes] = {}

    # -- parsing ----------------------------------------------------------------------
    def _open(self) -> None:
        magic = os.pread(self._fd, 16, 0)
        self.flattened = magic == FLAT_SIGNATURE
        self._file: _Plain | _Flat = (
            _Flat(self._fd, self.path) if self.flattened else _Plain(self._fd, self.path)
        )
        head = self._file.pread(0, 464, "the disk_dump_header")
        if head[:8] not in KDUMP_SIGNATURES:
            raise SourceError(
                f"{self.path} is not a kdump-compressed dump (signature {head[:8]!r})"
            )
        (self.header_version,) = struct.unpack_from("<i", head, 8)
        uts = [_cstr(head[12 + 65 * i : 12 + 65 * (i + 1)]) for i in range(6)]
        self.release = uts[2].decode("ascii", "replace")
        self.machine_name = uts[4].decode("ascii", "replace")
        # After utsname: a timestamp, then unsigned ints (disk_dump_header). Its width
        # follows the writer, not the guest (QEMU writes 64-bit headers for i686
        # guests too), so the layout whose fields make sense is taken.
        layouts = [(424, True), (412, False)]
        if uts[4] not in _MACHINES_64:
            layouts.reverse()
        for fields_at, wide in layouts:
            fields = struct.unpack_from("<IiiII", head, fields_at)
            if _plausible(*fields[1:4]):
                self.is_64bit = wide
                break
        else:
            raise SourceError(
                f"{self.path}: damaged header (no plausible block size, sub-header and "
                "bitmap sizes)"
            )
        (_, block_size, sub_hdr_size, bitmap_blocks, max_mapnr32) = fields
        self.block_size = block_size
        sub = self._file.pread(block_size, 104 if self.is_64bit else 80, "the kdump_sub_header")
        if self.is_64bit:
            phys_base, _, split = struct.unpack_from("<QiI", sub, 0)
            off_vmci, size_vmci, off_note, size_note = struct.unpack_from("<qQqQ", sub, 32)
            max_mapnr64 = struct.unpack_from("<Q", sub, 96)[0]
        else:
            phys_base, _, split = struct.unpack_from("<IiI", sub, 0)
            off_vmci, size_vmci, off_note, size_note = struct.unpack_from("<qIqI", sub, 20)
            max_mapnr64 = struct.unpack_from("<Q", sub, 72)[0]
        if split:
            raise SourceError(f"{self.path} is one part of a split dump: join the parts first")
        self.phys_base = phys_base
        self.max_mapnr = max_mapnr64 if self.header_version >= 6 else max_mapnr32
        self._vmcoreinfo = self._area(off_vmci, size_vmci, "VMCOREINFO", 3)
        notes = self._area(off_note, size_note, "ELF notes", 4)
        self.notes: list[ElfNote] = _parse_notes(notes) if notes else []

        half = bitmap_blocks // 2 * block_size
        if self.max_mapnr > half * 8:
            raise SourceError(
                f"{self.path}: {self.max_mapnr} page frames do not fit the bitmaps "
                f"({half * 8} bits)"
            )
        bitmap_at = block_size * (1 + sub_hdr_size)
        nbytes = (self.max_mapnr + 7) // 8
        dumped = self._file.pread(bitmap_at + half, nbytes, "the bitmap of dumped pages")
        self._dumped = dumped
        self._groups = _prefix_counts(dumped)
        self._desc_at = block_size * (1 + sub_hdr_size + bitmap_blocks)
        self._ranges = _bit_runs(dumped, self.max_mapnr, block_size, self.path)
        if not self._ranges:
            raise SourceError(f"{self.path}: the dump holds no pages")
        total = self._groups[-1]
        if self._desc_at + total * _PAGE_DESC.size > self._file.size:
            raise SourceError(
                f"{self.path}: {total} page descriptors do not fit in the file (truncated?)"
            )

    def _area(self, offset: int, size: int, what: str, version: int) -> bytes | None:
        if self.header_version < version or size == 0:
            return None
        if size > MAX_NOTE_BYTES:
            raise SourceError(f"{self.path}: {what} of {size} bytes is implausibly large")
        return self._file.pread(offset, size, what)

    # -- what a source answers ---------------------------------------------------------
    def ranges(self) -> Sequence[PhysRange]:
        return self._ranges

    @property
    def vmcoreinfo(self) -> str | None:
        """The dumped kernel's VMCOREINFO text (KERNELOFFSET, phys_base, symbols)."""
        if self._vmcoreinfo is None:
            for note in self.notes:
                if note.name == "VMCOREINFO":
                    return note.desc.decode("ascii", "replace")
            return None
        return self._vmcoreinfo.rstrip(b"\0").decode("ascii", "replace")

    def registers(self) -> Registers:
        if self.machine_name not in ("x86_64", "i386", "i486", "i586", "i686"):
            return super().registers()
        machine = _EM_X86_64 if self.machine_name == "x86_64" else _EM_386
        regs = _registers(machine, self.notes)
        if regs is None:
            return super().registers()
        return regs

    def _read(self, paddr: int, size: int) -> bytes:
        if self._fd < 0:
            self.check()
        bs = self.block_size
        parts = []
        pos, end = paddr, paddr + size
        while pos < end:
            pfn, off = divmod(pos, bs)
            n = min(end - pos, bs - off)
            page = self._page(pfn)
            parts.append(page[off : off + n] if n != bs else page)
            pos += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _page(self, pfn: int) -> bytes:
        page = self._cache.get(pfn)
        if page is not None:
            return page
        if not self._is_dumped(pfn):
            raise PhysicalReadError(pfn * self.block_size, self.block_size, "page not in the dump")
        index = self._index(pfn)
        try:
            desc = self._file.pread(
                self._desc_at + index * _PAGE_DESC.size, 24, "a page descriptor"
            )
            offset, size, flags, _ = _PAGE_DESC.unpack(desc)
            if size <= 0 or size > self.block_size:
                raise SourceError(f"descriptor says {size} bytes")
            data = self._file.pread(offset, size, "page data")
            page = _decode(data, flags, self.block_size)
        except SourceError as exc:
            raise PhysicalReadError(
                pfn * self.block_size, self.block_size, f"{self.path}: page {pfn:#x}: {exc}"
            ) from None
        if len(self._cache) >= CACHED_PAGES:
            del self._cache[next(iter(self._cache))]
        self._cache[pfn] = page
        return page

    def _is_dumped(self, pfn: int) -> bool:
        return pfn < self.max_mapnr and bool(self._dumped[pfn >> 3] >> (pfn & 7) & 1)

    def _index(self, pfn: int) -> int:
        """The descriptor number of a dumped page: dumped pages before it."""
        group = pfn >> 9
        start = group << 6
        chunk = self._dumped[start : (pfn >> 3) + 1]
        bits = int.from_bytes(chunk, "little") & ((1 << (pfn - (start << 3))) - 1)
        return self._groups[group] + bits.bit_count()

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        self._cache = {}
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def _prefix_counts(bitmap: bytes) -> list[int]:
    """Set bits before each 512-bit group (and the total, last)."""
    counts = [0]
    total = 0
    for i in range(0, len(bitmap), 64):
        total += int.from_bytes(bitmap[i : i + 64], "little").bit_count()
        counts.append(total)
    return counts


_RUNS = re.compile(rb"\xff+|[^\x00\xff]")


def _bit_runs(bitmap: bytes, nbits: int, page: int, path: Path) -> list[PhysRange]:
    """Physical ranges of consecutive set bits (pages), capped at MAX_RANGES."""
    runs: list[list[int]] = []

    def add(first: int, last: int) -> None:  # pfns [first, last)
        last = min(last, nbits)
        if first >= last:
            return
        if runs and runs[-1][1] == first:
            runs[-1][1] = last
            return
        if len(runs) >= MAX_RANGES:
            raise SourceError(f"{path}: RAM in over {MAX_RANGES} pieces: implausible")
        runs.append([first, last])

    for m in _RUNS.finditer(bitmap):
        if m.group()[0] == 0xFF:
            add(m.start() * 8, m.end() * 8)
            continue
        byte, base = m.group()[0], m.start() * 8
        for bit in range(8):
            if byte >> bit & 1:
                add(base + bit, base + bit + 1)
    return [PhysRange(a * page, b * page) for a, b in runs]


def _decode(data: bytes, flags: int, page: int) -> bytes:
    """One page's bytes from its stored form; SourceError if it does not make a page."""
    codec = flags & _CODEC_FLAGS
    if codec == 0:
        out = data
    elif codec == DUMP_DH_COMPRESSED_ZLIB:
        try:
            d = zlib.decompressobj()
            out = d.decompress(data, page)
        except zlib.error as exc:
            raise SourceError(f"corrupt zlib data ({exc})") from None
    elif codec == DUMP_DH_COMPRESSED_LZO:
        out = _lzo(data, page)
    elif codec == DUMP_DH_COMPRESSED_SNAPPY:
        out = _snappy(data, page)
    elif codec == DUMP_DH_COMPRESSED_ZSTD:
        out = _zstd(data, page)
    else:
        raise SourceError(f"unknown compression flags {flags:#x}")
    if len(out) != page:
        raise SourceError(f"stored page makes {len(out)} bytes, not {page}")
    return bytes(out)


def _codec(module: str, package: str, fmt: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise SourceError(
            f"pages compressed with {fmt} need the {package} package (pip install {package})"
        ) from None


def _lzo(data: bytes, page: int) -> bytes:
    lzo = _codec("lzo", "python-lzo", "LZO")
    try:
        return bytes(lzo.decompress(data, False, page))
    except lzo.error as exc:
        raise SourceError(f"corrupt LZO data ({exc})") from None


def _snappy(data: bytes, page: int) -> bytes:
    cramjam = _codec("cramjam", "cramjam", "snappy")
    try:
        if cramjam.snappy.decompress_raw_len(data) != page:
            raise SourceError("snappy data does not make one page")
        return bytes(cramjam.snappy.decompress_raw(data))
    except cramjam.DecompressionError as exc:
        raise SourceError(f"corrupt snappy data ({exc})") from None


def _zstd(data: bytes, page: int) -> bytes:
    zstandard = _codec("zstandard", "zstandard", "zstd")
    try:
        return bytes(zstandard.ZstdDecompressor().decompress(data, max_output_size=page))
    except zstandard.ZstdError as exc:
        raise SourceError(f"corrupt zstd data ({exc})") from None


def is_kdump(magic: bytes) -> bool:
    """Whether a file's first 16 bytes are those of a kdump-compressed dump."""
    return magic[:8] in KDUMP_SIGNATURES or magic[:16] == FLAT_SIGNATURE


__all__ = ["KdumpSource", "is_kdump"]
