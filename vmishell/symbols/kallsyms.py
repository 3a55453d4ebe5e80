"""Recover the kernel's symbol table from its kallsyms tables, without any symbol file.

Every kernel built with CONFIG_KALLSYMS carries, in .rodata, the tables that
/proc/kallsyms is printed from (scripts/kallsyms.c writes them). They are found
by their structure alone, as vmlinux-to-elf does:

* `kallsyms_token_table`: 256 NUL-terminated strings, where the entries for
  '0'..'9' are those digits themselves, so "0\\01\\0...9\\0" pins it down;
* `kallsyms_token_index`: 256 u16 offsets of those strings, right after it;
* `kallsyms_markers`: the offset in `kallsyms_names` of every 256th name;
* `kallsyms_names`: per symbol a length (1 byte, 2 if > 127) and token codes;
  the first character of the expanded name is the type letter;
* `kallsyms_num_syms`, and `kallsyms_offsets` + `kallsyms_relative_base`
  (CONFIG_KALLSYMS_BASE_RELATIVE) or `kallsyms_addresses`.

Up to 6.1 the order is offsets, relative_base, num_syms, names, markers,
token_table, token_index; 6.2 adds `kallsyms_seqs_of_names` after the markers
and later kernels move offsets and relative_base after token_index. Both are
handled. Addresses are link-time (before KASLR), like System.map's.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import pairwise

from vmishell.errors import ProfileError
from vmishell.symbols.sysmap import Symbol, SymbolTable

_DIGITS = b"".join(bytes([c, 0]) for c in b"0123456789")
_MAX_NAME = 1024  # longest compressed name (KSYM_NAME_LEN is 512 since 6.1)
_TYPE_LETTERS = frozenset(b"aAbBcCdDgGiINnpPrRsStTuUvVwW?")


@dataclass
class KallsymsLayout:
    """File offsets of the tables found (for diagnostics and tests)."""

    token_table: int
    token_index: int
    markers: int
    names: int
    num_syms: int
    offsets: int
    relative_base: int | None
    base_relative: bool
    absolute_percpu: bool
    seqs_of_names: int | None
    #: Link address of file offset 0, when learned from an arm64 relocation entry.
    image_base: int | None = None


class Kallsyms(SymbolTable):
    """Symbols decoded from kallsyms, in the kernel's table order (by address)."""

    def __init__(self, symbols: Iterable[Symbol], layout: KallsymsLayout) -> None:
        super().__init__(symbols, "kallsyms")
        self.layout = layout

    @property
    def image_base(self) -> int | None:
        return self.layout.image_base


def find_kallsyms(
    data: bytes | bytearray | memoryview,
    *,
    pointer_size: int = 8,
    endian: str = "little",
) -> Kallsyms:
    """Locate and decode the kallsyms tables in a vmlinux (ELF or raw image)."""
    if not isinstance(data, bytes):
        data = bytes(data)
    finder = _Finder(data, pointer_size, endian)
    return finder.run()


class _Finder:
    def __init__(self, data: bytes, pointer_size: int, endian: str) -> None:
        if pointer_size not in (4, 8) or endian not in ("little", "big"):
            raise ProfileError(f"kallsyms: unsupported pointer size {pointer_size}/{endian}")
        self.data = data
        self.ptr = pointer_size
        self.bo = "<" if endian == "little" else ">"
        self.endian = endian

    # -- small readers --------------------------------------------------------------
    def u32(self, pos: int) -> int:
        return struct.unpack_from(self.bo + "I", self.data, pos)[0]

    def uptr(self, pos: int) -> int:
        return struct.unpack_from(self.bo + ("Q" if self.ptr == 8 else "I"), self.data, pos)[0]

    def uint(self, pos: int, width: int) -> int:
        return self.u32(pos) if width == 4 else self.uptr(pos)

    def align(self, pos: int, a: int | None = None) -> int:
        a = a or self.ptr
        return (pos + a - 1) & ~(a - 1)

    # -- the search -----------------------------------------------------------------
    def run(self) -> Kallsyms:
        errors: list[str] = []
        pos = self.data.find(_DIGITS)
        while pos >= 0:
            try:
                return self._from_token_table(pos)
            except _NotHere as exc:
                errors.append(f"{pos:#x}: {exc}")
            pos = self.data.find(_DIGITS, pos + 1)
        detail = f" (candidates rejected: {'; '.join(errors[:3])})" if errors else ""
        raise ProfileError(
            "no kallsyms tables found in the kernel image: built without CONFIG_KALLSYMS, "
            f"or a layout vmishell does not know{detail}; pass a System.map instead"
        )

    def _from_token_table(self, digits: int) -> Kallsyms:
        table, index, tokens = self._token_table(digits)
        names, num_syms, n, markers_at, markers, seqs = self._names_and_markers(table, tokens)
        symbols_raw = self._decode_names(names, n, tokens, markers)
        offsets_at, rel_at, addresses, base_rel, percpu = self._addresses(num_syms, index, n)
        image_base = None
        if rel_at is not None and self.uptr(rel_at) == 0 and not percpu:
            image_base, base = self._relocated_base(rel_at)
            addresses = [a + base for a in addresses]
        layout = KallsymsLayout(
            token_table=table, token_index=index, markers=markers_at, names=names,
            num_syms=num_syms, offsets=offsets_at, relative_base=rel_at,
            base_relative=base_rel, absolute_percpu=percpu, seqs_of_names=seqs,
            image_base=image_base,
        )  # fmt: skip
        text = b"\n".join(symbols_raw).decode("latin-1").split("\n")
        symbols = [Symbol(s[1:], s[0], a) for s, a in zip(text, addresses, strict=True)]
        return Kallsyms(drop_local_labels(symbols), layout)

    def _token_table(self, digits: int) -> tuple[int, int, list[bytes]]:
        """Walk from the digit tokens to tokens 1..255, then let token_index fix token 0."""
        data = self.data
        starts = [0] * 256
        starts[ord("0")] = digits
        for i in range(ord("0") - 1, 0, -1):  # tokens 47..1: each starts after a NUL
            nul = data.rfind(b"\0", max(0, starts[i + 1] - _MAX_NAME), starts[i + 1] - 1)
            if nul < 0:
                raise _NotHere("token table runs off the start")
            starts[i] = nul + 1
        pos = digits
        for i in range(ord("0"), 256):  # tokens 48..255
            starts[i] = pos
            nul = data.find(b"\0", pos, pos + _MAX_NAME)
            if nul < 0:
                raise _NotHere("token table runs off the end")
            pos = nul + 1
        end = pos
        rel = [s - starts[1] for s in starts[1:]]
        for a in (2, 4, 8):
            index = self.align(end, a)
            if index + 512 > len(data):
                break
            values = struct.unpack_from(self.bo + "256H", data, index)
            first = values[1]
            if values[0] != 0 or first == 0 or first > starts[1]:
                continue
            if all(v - first == r for v, r in zip(values[1:], rel, strict=True)):
                table = starts[1] - first
                if b"\0" in data[table : starts[1] - 1]:
                    continue
                starts[0] = table
                tokens = [data[s : data.index(b"\0", s)] for s in starts]
                return table, index, tokens
        raise _NotHere("no kallsyms_token_index consistent with the token table")

    def _markers_back_from(self, end: int, width: int, limit: int) -> list[tuple[int, list[int]]]:
        """Marker runs ending at `end` or one padding word before it: ascending, first is 0.

        6.1 ends the markers right at the token table; later kernels (u32
        markers, 8-aligned token table) may leave a zero padding word between,
        which on its own reads as a one-marker run: both are candidates.
        """
        runs = []
        for pad in (0, width) if width < self.ptr else (0,):
            vals: list[int] = []
            q = end - pad - width
            while q >= limit:
                v = self.uint(q, width)
                if vals and v >= vals[-1]:
                    break
                vals.append(v)
                if v == 0:
                    runs.append((q, vals[::-1]))
                    break
                q -= width
        return runs

    def _names_and_markers(
        self, table: int, tokens: list[bytes]
    ) -> tuple[int, int, int, int, list[int], int | None]:
        """Find (names, num_syms offset, count, markers offset, markers, seqs_of_names offset)."""
        widths = sorted({self.ptr, 4}, reverse=True)
        # Up to 6.1: the markers end right before the token table.
        for width in widths:
            for markers_at, markers in self._markers_back_from(
                table, width, max(0, table - (1 << 22))
            ):
                hit = self._num_syms_before(markers_at, markers, tokens)
                if hit:
                    return hit[0], hit[1], hit[2], markers_at, markers, None
        # 6.2+: kallsyms_seqs_of_names (3 bytes per symbol) sits between markers and tokens.
        for p in self._count_positions(table):
            n = self.u32(p)
            m = (n + 255) // 256
            seqs = table - self.align(3 * n)
            for width in widths:
                for markers_at in {seqs - self.align(width * m), seqs - width * m}:
                    if markers_at <= p or self.uint(markers_at, width) != 0:
                        continue
                    markers = [self.uint(markers_at + width * k, width) for k in range(m)]
                    if any(b <= a for a, b in pairwise(markers)):
                        continue
                    for names in self._names_after(p):
                        if names + markers[-1] >= markers_at:
                            continue
                        if self._names_fit(names, n, tokens, markers, markers_at):
                            return names, p, n, markers_at, markers, seqs
        raise _NotHere("no kallsyms_markers/kallsyms_names/kallsyms_num_syms before the tokens")

    def _count_positions(self, table: int) -> Iterable[int]:
        """Word positions below `table`, nearest first, that may hold `kallsyms_num_syms`:
        a count n >= 256 whose names (at least 8 bytes each) fit before the table."""
        lo = max(0, table - (1 << 25))
        for p in range(table - 4 - (table % 4), lo, -4):
            n = self.u32(p)
            if n >= 256 and 8 * n <= table - p:
                yield p

    def _num_syms_before(
        self, markers_at: int, markers: list[int], tokens: list[bytes]
    ) -> tuple[int, int, int] | None:
        """Scan back from the markers for a count whose names end at the markers."""
        m = len(markers)
        lo_n, hi_n = (m - 1) * 256 + 1, m * 256
        last = markers_at - markers[-1]  # names start at or before this
        for p in range(self.align(last) - self.ptr, max(0, last - 256 * _MAX_NAME), -4):
            n = self.u32(p)
            if not lo_n <= n <= hi_n:
                continue
            for names in self._names_after(p):
                if self._names_fit(names, n, tokens, markers, markers_at):
                    return names, p, n
        return None

    def _names_after(self, num_syms: int) -> tuple[int, ...]:
        """Where kallsyms_names may start: pointer-aligned (up to 6.x) or right after the count.

        Newer scripts/kallsyms.c no longer aligns the names after `.long num_syms`.
        """
        packed = num_syms + 4
        aligned = self.align(packed)
        return (aligned, packed) if aligned != packed else (packed,)

    def _names_fit(
        self, names: int, n: int, tokens: list[bytes], markers: list[int], markers_at: int
    ) -> bool:
        """Whether n names from `names` hit every marker and end where the markers begin."""
        data = self.data
        for k, mark in enumerate(markers):
            pos = names + mark
            if pos >= markers_at:
                return False
            code = data[pos + 1 + (data[pos] >> 7)]
            if tokens[code][:1] and tokens[code][0] not in _TYPE_LETTERS:
                return False
            if k == 0 and mark != 0:
                return False
        # Walk the last (up to 256) names to the end.
        pos = names + markers[-1]
        for _ in range(n - 256 * (len(markers) - 1)):
            length = data[pos]
            if length & 0x80:
                length = (length & 0x7F) | (data[pos + 1] << 7)
                pos += 1
            pos += 1 + length
            if pos > markers_at:
                return False
        return markers_at - self.ptr < pos <= markers_at

    def _decode_names(
        self, names: int, n: int, tokens: list[bytes], markers: list[int]
    ) -> list[bytes]:
        data = self.data
        out: list[bytes] = []
        append, join = out.append, b"".join
        tok = tokens.__getitem__
        pos = names
        for i in range(n):
            if not i & 0xFF and pos - names != markers[i >> 8]:
                raise _NotHere(f"kallsyms_markers[{i >> 8}] does not match the names")
            length = data[pos]
            if length & 0x80:
                length = (length & 0x7F) | (data[pos + 1] << 7)
                pos += 1
            pos += 1
            append(join(map(tok, data[pos : pos + length])))
            pos += length
        return out

    def _addresses(
        self, num_syms: int, index: int, n: int
    ) -> tuple[int, int | None, list[int], bool, bool]:
        """Offsets or addresses: before num_syms (up to 6.3) or after token_index."""
        ptr = self.ptr
        # (offsets start, relative_base position) candidates for base-relative tables.
        before_rb = num_syms - ptr
        after = self.align(index + 512)
        candidates = [
            (before_rb - self.align(4 * n), before_rb),
            (after, self.align(after + 4 * n)),
        ]
        for start, rb_at in candidates:
            if start < 0 or rb_at + ptr > len(self.data):
                continue
            decoded = self._relative(start, rb_at, n)
            if decoded is not None:
                return start, rb_at, decoded[0], True, decoded[1]
        place_relative = self._place_relative(after, n)
        if place_relative is not None:
            return after, None, place_relative, True, False
        for start in (num_syms - n * ptr, after):
            if start < 0 or start + n * ptr > len(self.data):
                continue
            arr = array("Q" if ptr == 8 else "I", self.data[start : start + n * ptr])
            if self.endian != _native():
                arr.byteswap()
            if _sorted(arr) and arr[-1] > arr[0]:
                return start, None, list(arr), False, False
        raise _NotHere("no kallsyms_offsets/kallsyms_addresses giving sorted addresses")

    def _place_relative(self, start: int, n: int) -> list[int] | None:
        """kallsyms_offsets as `.long sym - .` (no kallsyms_relative_base; newest kernels).

        Each entry is the symbol's distance from the entry itself, so its link
        address needs the entry's own: taken from the ELF program headers.
        """
        to_vaddr = elf_vaddr_of(self.data)
        if to_vaddr is None or start + 4 * n > len(self.data):
            return None
        base = to_vaddr(start)
        if base is None:
            return None
        offsets = array("i", self.data[start : start + 4 * n])
        if self.endian != _native():
            offsets.byteswap()
        mask = (1 << (8 * self.ptr)) - 1
        addrs = [(base + 4 * i + o) & mask for i, o in enumerate(offsets)]
        if not _sorted(addrs) or addrs[-1] == addrs[0]:
            return None
        return addrs

    def _relocated_base(self, slot: int) -> tuple[int, int]:
        """(image base, relative_base) from the R_AARCH64_RELATIVE entry for `slot`.

        arm64 kernels link with --no-apply-dynamic-relocs: pointers in the Image
        are 0 and the boot code adds the RELA addends. The entry for the slot has
        r_offset = base + slot; the right base is the most aligned one (KIMAGE_VADDR)
        whose addend (the lowest symbol) lies in the image's first 2 MiB.
        """
        if self.ptr != 8:
            raise ProfileError("kallsyms_relative_base is 0 and the image has no RELA table")
        pattern = struct.pack(self.bo + "Q", 1027)  # r_info of R_AARCH64_RELATIVE
        best: tuple[int, int, int] | None = None  # (alignment, base, addend)
        mask = (1 << 64) - 1
        pos = self.data.find(pattern, 8)
        while pos >= 0:
            if pos % 8 == 0 and pos + 16 <= len(self.data):
                base = (self.uptr(pos - 8) - slot) & mask
                addend = self.uptr(pos + 8)
                if base >> 63 and not base & 0xFFFF and 0 <= addend - base < 1 << 21:
                    alignment = (base & -base).bit_length()
                    if best is None or alignment > best[0]:
                        best = (alignment, base, addend)
            pos = self.data.find(pattern, pos + 8)
        if best is None:
            raise ProfileError(
                "kallsyms_relative_base is 0 in the file (the kernel relocates it at boot) "
                "and no relocation entry gives it: pass a System.map"
            )
        return best[1], best[2]

    def _relative(self, start: int, rb_at: int, n: int) -> tuple[list[int], bool] | None:
        base = self.uptr(rb_at)
        offsets = array("i", self.data[start : start + 4 * n])
        if self.endian != _native():
            offsets.byteswap()
        mask = (1 << (8 * self.ptr)) - 1
        percpu = min(offsets) < 0
        if percpu:
            # CONFIG_KALLSYMS_ABSOLUTE_PERCPU: offsets >= 0 are absolute (per-CPU) values,
            # negative ones are relative_base - 1 - offset (kallsyms_sym_address()).
            base1 = base - 1
            addrs = [o if o >= 0 else (base1 - o) & mask for o in offsets]
        else:
            addrs = [(base + (o & 0xFFFFFFFF)) & mask for o in offsets]
        if not _sorted(addrs) or addrs[-1] == addrs[0]:
            return None
        return addrs, percpu


def drop_local_labels(symbols: list[Symbol]) -> list[Symbol]:
    """Without the assembler's local labels (".LC0", ".L__unnamed_1").

    Older scripts/kallsyms.c (5.10) kept some of them in the tables; they name
    no object, and System.map (scripts/mksysmap) has always left them out.
    """
    return [s for s in symbols if not s.name.startswith(".L")]


def elf_vaddr_of(data: bytes) -> Callable[[int], int | None] | None:
    """File offset -> link address through an ELF64's PT_LOAD headers (None: not ELF64)."""
    if data[:4] != b"\x7fELF" or len(data) < 64 or data[4] != 2:
        return None
    bo = "<" if data[5] == 1 else ">"
    (phoff,) = struct.unpack_from(bo + "Q", data, 32)
    phentsize, phnum = struct.unpack_from(bo + "HH", data, 54)
    loads = []
    for i in range(min(phnum, 64)):
        at = phoff + i * phentsize
        if at + 56 > len(data):
            break
        kind, _flags, offset, vaddr, _paddr, filesz = struct.unpack_from(bo + "IIQQQQ", data, at)
        if kind == 1:
            loads.append((offset, offset + filesz, vaddr))

    def to_vaddr(offset: int) -> int | None:
        for lo, hi, vaddr in loads:
            if lo <= offset < hi:
                return vaddr + offset - lo
        return None

    return to_vaddr


class _NotHere(Exception):
    """This candidate position is not the kallsyms tables."""


def _native() -> str:
    import sys

    return sys.byteorder


def _sorted(values) -> bool:
    return all(a <= b for a, b in pairwise(values))
