"""LZO, in pure Python: the lzop file format and the LZO1X block format inside it.

The kernel's `lzo` payload compression writes an lzop file. No LZO codec is
in the standard library or in the project's dependencies, and the format is
small, so it is decoded here; every length and distance is checked against
the input and the output so far, and damage ends in a KernelImageError.
"""

from __future__ import annotations

import zlib

from vmishell.errors import KernelImageError

LZOP_MAGIC = b"\x89LZO\x00\r\n\x1a\n"

# lzop header flags
_F_ADLER32_D, _F_ADLER32_C, _F_H_EXTRA_FIELD = 0x1, 0x2, 0x40
_F_CRC32_D, _F_CRC32_C, _F_H_FILTER = 0x100, 0x200, 0x800


def lzop_decompress(data: bytes) -> tuple[bytes, bytes, bool]:
    """Decompress an lzop file (what the kernel's `lzo` compression writes).

    Returns (output, bytes after the end-of-file marker, whether the marker was met).
    """
    if not data.startswith(LZOP_MAGIC):
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
