"""The compressions a kernel payload comes in, recognised by magic and undone.

Linux can compress its image with gzip, xz, lzma, bzip2, lz4 (the legacy
frame `lz4 -l` writes), zstd or lzo; the lz4 frame format is read too. The
standard library and the lz4 and zstandard packages do the work, lzo is in
`vmishell.symbols.lzo`. The kernel's `size_append` puts the uncompressed
size, 4 bytes little endian, after the stream: when present it is checked,
so truncation is caught.
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from collections.abc import Callable

from vmishell.errors import KernelImageError
from vmishell.symbols.lzo import LZOP_MAGIC, lzop_decompress

Progress = Callable[[str, float], None]

#: Payload magics, most specific first (the kernel's `size_append` adds 4 bytes after each).
COMPRESSION_MAGICS: tuple[tuple[str, bytes], ...] = (
    ("gzip", b"\x1f\x8b"),
    ("xz", b"\xfd7zXZ\x00"),
    ("lzma", b"\x5d\x00\x00"),
    ("bzip2", b"BZh"),
    ("lz4", b"\x02\x21\x4c\x18"),  # legacy frame, what `lz4 -l` writes
    ("lz4-frame", b"\x04\x22\x4d\x18"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("lzo", LZOP_MAGIC),  # lzop file format
)

_CHUNK = 1 << 20


def compression_of(data: bytes) -> str | None:
    """The name of the compression `data` starts with, or None."""
    for kind, magic in COMPRESSION_MAGICS:
        if data.startswith(magic):
            return kind
    return None


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
