"""LiME images (the LiME kernel module's and AVML's format): RAM ranges with holes.

A LiME file is a sequence of ranges, each a 32-byte header followed by its
bytes: magic 0x4C694D45 ("EMiL" on disk), version 1, s_addr, e_addr
(inclusive), 8 reserved bytes, then e_addr - s_addr + 1 bytes of RAM.
Addresses between ranges are not RAM: reading them raises PhysicalReadError,
as everywhere in vmishell.

AVML's compressed output is version 2 (magic "AVML" on disk; the LiME magic
is accepted too): the header is followed by a snappy *framed* stream of the
range's bytes and an 8-byte little-endian count of the stream's bytes.
Compressed ranges are indexed frame by frame when opened and decompressed on
demand (with `cramjam`, `pip install 'vmishell[avml]'`), so a large image
costs no more memory than the frames in use. Uncompressed images are
memory-mapped and offer zero-copy segments to the page walkers.

Every header is checked before anything is read: bad magic, bad version,
truncated ranges, ranges out of order or overlapping and absurd addresses are
refused with the file offset of the culprit.
"""

from __future__ import annotations

import bisect
import os
import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmishell.errors import PhysicalReadError, SourceError
from vmishell.sources.base import PhysicalSource, PhysRange, Segment
from vmishell.sources.files import _map_file

LIME_MAGIC = 0x4C694D45
AVML_MAGIC = 0x4C4D5641
HEADER = struct.Struct("<IIQQQ")
#: x86 MAXPHYADDR is at most 52 bits: a range ending above that is not RAM.
MAX_PHYSICAL = 1 << 52
#: A LiME file with more ranges than this is corrupt (real ones have a few dozen).
MAX_RANGES = 1 << 16
#: Snappy's framed format caps a frame's uncompressed data at 64 KiB.
MAX_FRAME = 1 << 16
_CACHED_FRAMES = 256
_STREAM_ID = b"sNaPpY"
_TRAILER = struct.Struct("<Q")
AVML_HINT = "pip install 'vmishell[avml]'"


@dataclass(frozen=True, slots=True)
class LimeRange:
    """One range of a LiME file: physical [start, end) and where its bytes are.

    `frames` is empty for an uncompressed range (bytes at `offset`); for a
    compressed one it lists (uncompressed offset, file offset, stored length,
    compressed?) per snappy frame, in order.
    """

    start: int
    end: int
    offset: int
    version: int
    frames: tuple[tuple[int, int, int, bool], ...] = field(default=())

    @property
    def compressed(self) -> bool:
        return self.version == 2


def _varint(data: bytes | memoryview, pos: int, end: int) -> int:
    """Snappy's uncompressed-length preamble (a little-endian base-128 varint)."""
    value, shift = 0, 0
    while pos < end and shift < 35:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value
        pos, shift = pos + 1, shift + 7
    raise ValueError("bad snappy length preamble")


def _index_frames(
    view: memoryview, path: Path, pos: int, length: int
) -> tuple[tuple[tuple[int, int, int, bool], ...], int]:
    """Index the snappy frames of one compressed range; returns (frames, end offset)."""
    frames: list[tuple[int, int, int, bool]] = []
    done = 0
    size = len(view)
    while done < length:
        if pos + 4 > size:
            raise SourceError(f"{path}: compressed range truncated at offset {pos:#x}")
        kind = view[pos]
        flen = int.from_bytes(view[pos + 1 : pos + 4], "little")
        body = pos + 4
        if body + flen > size:
            raise SourceError(f"{path}: snappy frame at offset {pos:#x} runs past the end of file")
        if kind == 0xFF:
            if bytes(view[body : body + flen]) != _STREAM_ID:
                raise SourceError(f"{path}: bad snappy stream identifier at offset {pos:#x}")
        elif kind in (0x00, 0x01):
            if flen < 4:
                raise SourceError(f"{path}: snappy frame at offset {pos:#x} is too short")
            data_at, data_len = body + 4, flen - 4  # after the CRC
            if kind == 0x01:
                ulen = data_len
            else:
                try:
                    ulen = _varint(view, data_at, data_at + data_len)
                except ValueError:
                    raise SourceError(f"{path}: corrupt snappy frame at offset {pos:#x}") from None
            if ulen > MAX_FRAME or ulen == 0 or done + ulen > length:
                raise SourceError(
                    f"{path}: snappy frame at offset {pos:#x} holds {ulen} bytes, "
                    f"which does not fit its range"
                )
            frames.append((done, data_at, data_len, kind == 0x00))
            done += ulen
        elif 0x02 <= kind <= 0x7F:
            raise SourceError(f"{path}: unknown snappy frame type {kind:#x} at offset {pos:#x}")
        pos = body + flen
    if pos + _TRAILER.size > size:
        raise SourceError(f"{path}: compressed range lacks its size trailer at offset {pos:#x}")
    return tuple(frames), pos + _TRAILER.size


def parse_lime(view: memoryview, path: Path) -> list[LimeRange]:
    """Every range of a LiME/AVML file, checked; raises SourceError naming the bad offset."""
    ranges: list[LimeRange] = []
    pos, size = 0, len(view)
    while pos < size:
        if size - pos < HEADER.size:
            raise SourceError(
                f"{path}: truncated LiME header at offset {pos:#x} ({size - pos} bytes left)"
            )
        magic, version, s_addr, e_addr, _ = HEADER.unpack_from(view, pos)
        if magic not in (LIME_MAGIC, AVML_MAGIC):
            raise SourceError(
                f"{path}: bad LiME magic {magic:#010x} at offset {pos:#x} "
                f"(expected {LIME_MAGIC:#010x}, 'EMiL')"
            )
        if version not in (1, 2):
            raise SourceError(
                f"{path}: LiME version {version} at offset {pos:#x} is not supported "
                "(1 = raw, 2 = AVML snappy)"
            )
        if e_addr < s_addr:
            raise SourceError(
                f"{path}: range at offset {pos:#x} ends ({e_addr:#x}) before it starts "
                f"({s_addr:#x})"
            )
        if e_addr >= MAX_PHYSICAL:
            raise SourceError(
                f"{path}: range {s_addr:#x}-{e_addr:#x} at offset {pos:#x} lies beyond any "
                "physical address (corrupt header?)"
            )
        if ranges and s_addr < ranges[-1].end:
            prev = ranges[-1]
            how = "overlaps" if s_addr >= prev.start else "comes before"
            raise SourceError(
                f"{path}: range {s_addr:#x}-{e_addr:#x} at offset {pos:#x} {how} the range "
                f"{prev.start:#x}-{prev.end - 1:#x} before it (ranges must be sorted, disjoint)"
            )
        if len(ranges) >= MAX_RANGES:
            raise SourceError(f"{path}: more than {MAX_RANGES} ranges (corrupt file?)")
        length = e_addr - s_addr + 1
        data = pos + HEADER.size
        if version == 1:
            if data + length > size:
                raise SourceError(
                    f"{path}: range {s_addr:#x}-{e_addr:#x} at offset {pos:#x} is truncated: "
                    f"{length:#x} bytes declared, {max(0, size - data):#x} present"
                )
            ranges.append(LimeRange(s_addr, e_addr + 1, data, 1))
            pos = data + length
        else:
            frames, pos = _index_frames(view, path, data, length)
            ranges.append(LimeRange(s_addr, e_addr + 1, data, 2, frames))
    if not ranges:
        raise SourceError(f"{path} is empty")
    return ranges


def _snappy() -> Any:
    try:
        import cramjam
    except ImportError:
        raise SourceError(
            f"compressed (AVML version 2) LiME images need cramjam: {AVML_HINT}"
        ) from None
    return cramjam.snappy


class LimeSource(PhysicalSource):
    """A LiME or AVML memory image: its ranges as RAM, holes between them unreadable."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = Path(path)
        self._mmap, _ = _map_file(self.path, writable=False)
        self._view = memoryview(self._mmap)
        try:
            self.lime_ranges = parse_lime(self._view, self.path)
            self._snappy: Any = _snappy() if any(r.compressed for r in self.lime_ranges) else None
        except BaseException:
            self.close()
            raise
        self._ranges = [PhysRange(r.start, r.end) for r in self.lime_ranges]
        self._range_starts = [r.start for r in self.lime_ranges]
        self._segments: list[Segment] | None = None
        if self._snappy is None:
            self._segments = [
                Segment(r.start, self._view[r.offset : r.offset + (r.end - r.start)])
                for r in self.lime_ranges
            ]
        self._frame_cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        compressed = " (AVML, compressed)" if self._snappy is not None else ""
        self.description = f"LiME image {self.path}{compressed}"

    def ranges(self) -> Sequence[PhysRange]:
        return self._ranges

    def segments(self) -> Sequence[Segment] | None:
        return self._segments

    def _read(self, paddr: int, size: int) -> bytes:
        i = bisect.bisect_right(self._range_starts, paddr) - 1
        if i < 0 or paddr + size > self.lime_ranges[i].end:
            raise PhysicalReadError(paddr, size)
        r = self.lime_ranges[i]
        off = paddr - r.start
        if not r.compressed:
            return bytes(self._view[r.offset + off : r.offset + off + size])
        return self._read_compressed(i, off, size)

    def _read_compressed(self, index: int, off: int, size: int) -> bytes:
        frames = self.lime_ranges[index].frames
        j = bisect.bisect_right(_FrameStarts(frames), off) - 1
        parts = []
        end = off + size
        while off < end:
            ustart = frames[j][0]
            data = self._frame(index, j)
            chunk = data[off - ustart : end - ustart]
            parts.append(chunk)
            off += len(chunk)
            j += 1
        return b"".join(parts)

    def _frame(self, index: int, j: int) -> bytes:
        key = (index, j)
        data = self._frame_cache.get(key)
        if data is not None:
            self._frame_cache.move_to_end(key)
            return data
        _, at, length, compressed = self.lime_ranges[index].frames[j]
        raw = self._view[at : at + length]
        if compressed:
            try:
                data = bytes(self._snappy.decompress_raw(bytes(raw)))
            except Exception as exc:  # cramjam raises its own DecompressionError
                raise SourceError(
                    f"{self.path}: corrupt snappy frame at offset {at - 8:#x}: {exc}"
                ) from None
        else:
            data = bytes(raw)
        self._frame_cache[key] = data
        if len(self._frame_cache) > _CACHED_FRAMES:
            self._frame_cache.popitem(last=False)
        return data

    def close(self) -> None:
        self._segments = None
        self._ranges = []
        try:
            self._view.release()
            self._mmap.close()
        except (BufferError, AttributeError):
            pass


class _FrameStarts(Sequence[int]):
    """The uncompressed start of each frame, as a sequence bisect can search in place."""

    def __init__(self, frames: tuple[tuple[int, int, int, bool], ...]) -> None:
        self._frames = frames

    def __len__(self) -> int:
        return len(self._frames)

    def __getitem__(self, i: int) -> int:  # type: ignore[override]
        return self._frames[i][0]


def write_lime(
    source: PhysicalSource,
    path: str | os.PathLike[str],
    ranges: Iterable[PhysRange] | None = None,
    *,
    compress: bool = False,
    chunk: int = 16 << 20,
) -> Path:
    """Write `source`'s RAM (or the given `ranges` of it) as a LiME file.

    `compress=True` writes AVML's snappy-compressed version 2 instead. Ranges
    must be sorted, disjoint and inside the source's RAM; empty ones are
    skipped. Useful for tests (RAM with holes) and for handing images to
    tools that read LiME.
    """
    out = Path(path)
    todo = [r for r in (source.ranges() if ranges is None else ranges) if r.size > 0]
    snappy = _snappy() if compress else None
    with out.open("wb") as f:
        for r in todo:
            if compress:
                assert snappy is not None
                f.write(HEADER.pack(AVML_MAGIC, 2, r.start, r.end - 1, 0))
                # One framed stream per chunk: repeated stream identifiers are valid snappy.
                stream = b"".join(
                    bytes(snappy.compress(source.read(pos, min(chunk, r.end - pos))))
                    for pos in range(r.start, r.end, chunk)
                )
                f.write(stream)
                f.write(_TRAILER.pack(len(stream)))
            else:
                f.write(HEADER.pack(LIME_MAGIC, 1, r.start, r.end - 1, 0))
                for pos in range(r.start, r.end, chunk):
                    f.write(source.read(pos, min(chunk, r.end - pos)))
    return out


__all__ = ["AVML_MAGIC", "LIME_MAGIC", "LimeRange", "LimeSource", "parse_lime", "write_lime"]
