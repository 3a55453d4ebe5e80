"""Parser for raw BTF (a kernel's .BTF section or /sys/kernel/btf/vmlinux).

BTF is the kernel's compact type description; a profile can be built from it
when no DWARF is at hand. The parser reads the type section as one array of
32-bit words (fast, ~0.3 s for a distribution kernel) and checks what later
stages rely on: every offset within the data, every type id in range, no
cycle through typedefs, modifiers, pointers or arrays. Anything else is a
ProfileError that names what is wrong and the byte offset where it is.
"""

from __future__ import annotations

import enum
import gc
import struct
import sys
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

from vmishell.errors import ProfileError

BTF_MAGIC = 0xEB9F
_HEADER = struct.Struct("HBBIIIII")  # magic, version, flags, hdr_len, type/str off+len
_MIN_HDR_LEN = _HEADER.size  # 24


class BtfKind(enum.IntEnum):
    """BTF_KIND_* values from include/uapi/linux/btf.h."""

    UNKN = 0
    INT = 1
    PTR = 2
    ARRAY = 3
    STRUCT = 4
    UNION = 5
    ENUM = 6
    FWD = 7
    TYPEDEF = 8
    VOLATILE = 9
    CONST = 10
    RESTRICT = 11
    FUNC = 12
    FUNC_PROTO = 13
    VAR = 14
    DATASEC = 15
    FLOAT = 16
    DECL_TAG = 17
    TYPE_TAG = 18
    ENUM64 = 19


# BTF_INT_* encoding bits.
INT_SIGNED = 1
INT_CHAR = 2
INT_BOOL = 4

# Kinds whose third header word is a size; the others hold a type id there.
_SIZED = frozenset(
    {
        BtfKind.INT,
        BtfKind.STRUCT,
        BtfKind.UNION,
        BtfKind.ENUM,
        BtfKind.ENUM64,
        BtfKind.DATASEC,
        BtfKind.FLOAT,
    }
)
#: Kinds that only qualify or rename another type (skipped by `Btf.resolve`).
TRANSPARENT = frozenset(
    {BtfKind.TYPEDEF, BtfKind.VOLATILE, BtfKind.CONST, BtfKind.RESTRICT, BtfKind.TYPE_TAG}
)


class BtfMember(NamedTuple):
    """A struct/union member; `bitfield_size` is 0 for ordinary members."""

    name: str
    type: int
    bit_offset: int
    bitfield_size: int


class BtfArray(NamedTuple):
    type: int
    index_type: int
    nelems: int


class BtfParam(NamedTuple):
    name: str
    type: int


class BtfVarSecinfo(NamedTuple):
    type: int
    offset: int
    size: int


class BtfType(NamedTuple):
    """One BTF type record, decoded.

    `size` is set for sized kinds (INT, STRUCT, UNION, ENUM, ENUM64, DATASEC,
    FLOAT), `ref` for kinds pointing to another type (PTR, TYPEDEF, modifiers,
    FUNC, FUNC_PROTO's return type, VAR, DECL_TAG, TYPE_TAG; ARRAY's element).
    `extra` depends on the kind:

    - INT: (encoding, bit offset, nr_bits)
    - ARRAY: BtfArray
    - STRUCT/UNION: tuple of BtfMember
    - ENUM/ENUM64: tuple of (name, value), values signed when kind_flag is set
    - FUNC_PROTO: tuple of BtfParam
    - VAR, FUNC: (linkage,)
    - DATASEC: tuple of BtfVarSecinfo
    - DECL_TAG: (component_idx,)
    - others: ()
    """

    id: int
    kind: int
    name: str
    size: int
    ref: int
    kind_flag: bool
    vlen: int
    extra: Any  # a tuple whose shape depends on the kind (see above)
    offset: int  # byte offset of the record in the BTF data, for messages


_VOID = BtfType(0, BtfKind.UNKN, "void", 0, 0, False, 0, (), 0)


class Btf:
    """Decoded BTF: `types[id]` for id in 0..len-1 (id 0 is void)."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        data = bytes(data)
        self.data_size = len(data)
        hdr = _parse_header(data)
        self.endian: str = hdr[0]
        self.version: int = hdr[1]
        self.flags: int = hdr[2]
        self.hdr_len: int = hdr[3]
        self.type_off, self.type_len, self.str_off, self.str_len = hdr[4:]
        str_start = self.hdr_len + self.str_off
        self._strings = data[str_start : str_start + self.str_len]
        self._str_base = str_start
        self._names: dict[int, str] = {0: ""}
        self.types: list[BtfType] = [_VOID]
        top = self._parse_types(data)
        if top >= len(self.types):  # some reference points past the last type: say which
            self._check_references()
        self._check_cycles()
        self._by_name: dict[str, list[int]] | None = None

    # -- parsing -----------------------------------------------------------

    def _index_strings(self) -> None:
        """Decode every string once: names are looked up ~250k times."""
        names = self._names
        off = 0
        for raw in self._strings.split(b"\0"):
            names[off] = raw.decode("utf-8", "replace")
            off += len(raw) + 1

    def _name(self, off: int, where: int) -> str:
        """A name at a string offset, including offsets into the middle of a string."""
        name = self._names.get(off)
        if name is not None:
            return name
        strings = self._strings
        if off >= len(strings):
            raise ProfileError(
                f"BTF type at offset {where:#x} names string offset {off:#x}, "
                f"beyond the string section ({len(strings)} bytes)"
            )
        end = strings.find(b"\0", off)  # the section ends with NUL (checked)
        name = strings[off:end].decode("utf-8", "replace")
        self._names[off] = name
        return name

    def _parse_types(self, data: bytes) -> int:
        """Decode every type record; returns the highest type id any record refers to."""
        base = self.hdr_len + self.type_off
        words = array("I")
        if words.itemsize != 4:  # pragma: no cover - every CPython platform has 4-byte I
            raise ProfileError("platform lacks a 32-bit array type")
        words.frombytes(data[base : base + self.type_len])
        if self.endian != sys.byteorder:
            words.byteswap()
        self._index_strings()
        names = self._names
        get_name = names.get
        slow_name = self._name
        n = len(words)
        append = self.types.append
        new = tuple.__new__
        i = 0
        tid = 0
        top = 0  # the highest type id referred to, checked against the count at the end
        while i < n:
            tid += 1
            where = base + 4 * i
            if i + 3 > n:
                raise ProfileError(f"BTF type #{tid} at offset {where:#x} is truncated")
            name_off, info, size_or_type = words[i], words[i + 1], words[i + 2]
            i += 3
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            kflag = info >= 0x80000000
            nm = get_name(name_off)
            if nm is None:
                nm = slow_name(name_off, where)
            if kind > _MAX_KIND or kind == _UNKN:
                raise ProfileError(f"BTF type #{tid} at offset {where:#x} has unknown kind {kind}")
            count = _PER_VLEN[kind] * vlen + _FIXED[kind]
            if i + count > n:
                raise ProfileError(
                    f"BTF type #{tid} ({_kind_name(kind)}) at offset {where:#x} is truncated: "
                    f"needs {4 * count} bytes of data past its header"
                )
            size = ref = 0
            extra: tuple = ()
            if kind in _SIZED_INTS:
                size = size_or_type
            else:
                ref = size_or_type
                if ref > top:
                    top = ref
            if kind in (_STRUCT, _UNION):
                members = []
                for j in range(i, i + 3 * vlen, 3):
                    if words[j + 1] > top:
                        top = words[j + 1]
                    moff = words[j + 2]
                    mname = get_name(words[j])
                    if mname is None:
                        mname = slow_name(words[j], where)
                    if kflag:
                        members.append(
                            new(BtfMember, (mname, words[j + 1], moff & 0xFFFFFF, moff >> 24))
                        )
                    else:
                        members.append(new(BtfMember, (mname, words[j + 1], moff, 0)))
                extra = tuple(members)
            elif kind == _FUNC:
                extra = (vlen,)
            elif kind == _FUNC_PROTO:
                params = []
                for j in range(i, i + 2 * vlen, 2):
                    if words[j + 1] > top:
                        top = words[j + 1]
                    pname = get_name(words[j])
                    if pname is None:
                        pname = slow_name(words[j], where)
                    params.append(new(BtfParam, (pname, words[j + 1])))
                extra = tuple(params)
            elif kind == _INT:
                w = words[i]
                extra = ((w >> 24) & 0x0F, (w >> 16) & 0xFF, w & 0xFF)
            elif kind == _ARRAY:
                extra = BtfArray(words[i], words[i + 1], words[i + 2])
                ref = words[i]
                top = max(top, ref, words[i + 1])
            elif kind == _ENUM:
                extra = tuple(
                    (slow_name(words[j], where), _s32(words[j + 1]) if kflag else words[j + 1])
                    for j in range(i, i + 2 * vlen, 2)
                )
            elif kind == _ENUM64:
                extra = tuple(
                    (slow_name(words[j], where), _enum64(words[j + 1], words[j + 2], kflag))
                    for j in range(i, i + 3 * vlen, 3)
                )
            elif kind == _DATASEC:
                extra = tuple(
                    BtfVarSecinfo(words[j], words[j + 1], words[j + 2])
                    for j in range(i, i + 3 * vlen, 3)
                )
                top = max((top, *(v.type for v in extra)))
            elif kind == _VAR:
                extra = (words[i],)
            elif kind == _DECL_TAG:
                extra = (_s32(words[i]),)
            append(new(BtfType, (tid, kind, nm, size, ref, kflag, vlen, extra, where)))
            i += count
        return top

    def _check_references(self) -> None:
        limit = len(self.types)
        K = BtfKind

        def bad(t: BtfType, what: str, target: int) -> ProfileError:
            return ProfileError(
                f"BTF type #{t.id} ({_kind_name(t.kind)} {t.name!r}) at offset {t.offset:#x}: "
                f"{what} refers to type id {target}, beyond the last type id {limit - 1}"
            )

        for t in self.types:
            if t.ref >= limit:
                raise bad(t, "its type", t.ref)
            kind = t.kind
            if kind == K.STRUCT or kind == K.UNION:
                for m in t.extra:
                    if m.type >= limit:
                        raise bad(t, f"member {m.name!r}", m.type)
            elif kind == K.ARRAY:
                if t.extra.index_type >= limit:
                    raise bad(t, "its index type", t.extra.index_type)
            elif kind == K.FUNC_PROTO:
                for p in t.extra:
                    if p.type >= limit:
                        raise bad(t, f"parameter {p.name!r}", p.type)
            elif kind == K.DATASEC:
                for v in t.extra:
                    if v.type >= limit:
                        raise bad(t, "a section variable", v.type)

    def _check_cycles(self) -> None:
        """Reject loops that no struct breaks (typedef/modifier/pointer/array chains)."""
        types = self.types
        chain_kinds = TRANSPARENT | {BtfKind.PTR, BtfKind.ARRAY}
        state = bytearray(len(types))  # 0 new, 1 on current path, 2 done
        for start in range(1, len(types)):
            if state[start]:
                continue
            path: list[int] = []
            tid = start
            while True:
                if state[tid] == 2:
                    break
                if state[tid] == 1:
                    t = types[tid]
                    raise ProfileError(
                        f"BTF type #{tid} ({_kind_name(t.kind)} {t.name!r}) at offset "
                        f"{t.offset:#x} is part of a reference cycle: "
                        + " -> ".join(f"#{p}" for p in [*path[path.index(tid) :], tid])
                    )
                t = types[tid]
                if t.kind not in chain_kinds or tid == 0:
                    state[tid] = 2
                    break
                state[tid] = 1
                path.append(tid)
                tid = t.ref
            for p in path:
                state[p] = 2

    # -- queries -------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.types)

    def __iter__(self) -> Iterator[BtfType]:
        return iter(self.types)

    def __getitem__(self, tid: int) -> BtfType:
        if not 0 <= tid < len(self.types):
            raise ProfileError(f"BTF type id {tid} out of range (0..{len(self.types) - 1})")
        return self.types[tid]

    def find(self, name: str, kind: int | None = None) -> list[BtfType]:
        """Every type called `name` (of `kind` if given), in id order."""
        if self._by_name is None:
            index: dict[str, list[int]] = {}
            for t in self.types:
                if t.name:
                    index.setdefault(t.name, []).append(t.id)
            self._by_name = index
        found = [self.types[i] for i in self._by_name.get(name, ())]
        if kind is not None:
            found = [t for t in found if t.kind == kind]
        return found

    def resolve(self, tid: int) -> BtfType:
        """The type behind typedefs and qualifiers (cycles were rejected at parse)."""
        t = self[tid]
        while t.kind in TRANSPARENT:
            t = self.types[t.ref]
        return t

    def size_of(self, tid: int, pointer_size: int = 8) -> int:
        """Byte size of a value of type `tid` (0 for void, functions and forwards)."""
        t = self.resolve(tid)
        if t.kind in _SIZED:
            return t.size
        if t.kind == BtfKind.PTR:
            return pointer_size
        if t.kind == BtfKind.ARRAY:
            return t.extra.nelems * self.size_of(t.extra.type, pointer_size)
        return 0


def parse_btf(data: bytes | bytearray | memoryview) -> Btf:
    """Parse raw BTF bytes (either endianness); ProfileError if malformed."""
    with paused_gc():
        return Btf(data)


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic GC: building ~10^5 small tuples otherwise doubles the time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _parse_header(data: bytes) -> tuple:
    if len(data) < _MIN_HDR_LEN:
        raise ProfileError(f"BTF data is {len(data)} bytes, shorter than its 24-byte header")
    magic_le = int.from_bytes(data[:2], "little")
    if magic_le == BTF_MAGIC:
        endian, prefix = "little", "<"
    elif magic_le == 0x9FEB:
        endian, prefix = "big", ">"
    else:
        raise ProfileError(
            f"not BTF: magic at offset 0x0 is {data[:2].hex()} (expected 9feb or eb9f)"
        )
    _, version, flags, hdr_len, t_off, t_len, s_off, s_len = struct.unpack_from(
        prefix + _HEADER.format, data
    )
    if version != 1:
        raise ProfileError(f"BTF version {version} at offset 0x2 is not supported (only 1)")
    if hdr_len < _MIN_HDR_LEN or hdr_len > len(data):
        raise ProfileError(f"BTF header length {hdr_len} at offset 0x4 is invalid")
    body = len(data) - hdr_len
    if t_off % 4:
        raise ProfileError(f"BTF type section offset {t_off:#x} (header offset 0x8) is unaligned")
    if t_off + t_len > body:
        raise ProfileError(
            f"BTF type section [{hdr_len + t_off:#x}, {hdr_len + t_off + t_len:#x}) runs past "
            f"the end of the data ({len(data):#x} bytes): truncated?"
        )
    if t_len % 4:
        raise ProfileError(
            f"BTF type section length {t_len} (header offset 0xc) is not a multiple of 4"
        )
    if s_off + s_len > body:
        raise ProfileError(
            f"BTF string section [{hdr_len + s_off:#x}, {hdr_len + s_off + s_len:#x}) runs past "
            f"the end of the data ({len(data):#x} bytes): truncated?"
        )
    if s_len == 0 or data[hdr_len + s_off] != 0:
        raise ProfileError(
            f"BTF string section at offset {hdr_len + s_off:#x} does not start with an empty string"
        )
    if data[hdr_len + s_off + s_len - 1] != 0:
        raise ProfileError(
            f"BTF string section ends at offset {hdr_len + s_off + s_len - 1:#x} without a NUL byte"
        )
    return endian, version, flags, hdr_len, t_off, t_len, s_off, s_len


def _s32(v: int) -> int:
    return v - (1 << 32) if v & 0x80000000 else v


def _enum64(lo: int, hi: int, signed: bool) -> int:
    v = (hi << 32) | lo
    if signed and v & (1 << 63):
        v -= 1 << 64
    return v


def _kind_name(kind: int) -> str:
    try:
        return BtfKind(kind).name
    except ValueError:
        return f"kind {kind}"


_UNKN, _INT, _ARRAY, _STRUCT, _UNION, _ENUM = 0, 1, 3, 4, 5, 6
_FUNC, _FUNC_PROTO, _VAR, _DATASEC, _DECL_TAG, _ENUM64 = 12, 13, 14, 15, 17, 19
_MAX_KIND = max(BtfKind)
_SIZED_INTS = frozenset(int(k) for k in _SIZED)

# Data words after each 12-byte type header: per-vlen words and fixed words by kind.
_LAYOUT = {
    BtfKind.UNKN: (0, 0),
    BtfKind.INT: (0, 1),
    BtfKind.PTR: (0, 0),
    BtfKind.ARRAY: (0, 3),
    BtfKind.STRUCT: (3, 0),
    BtfKind.UNION: (3, 0),
    BtfKind.ENUM: (2, 0),
    BtfKind.FWD: (0, 0),
    BtfKind.TYPEDEF: (0, 0),
    BtfKind.VOLATILE: (0, 0),
    BtfKind.CONST: (0, 0),
    BtfKind.RESTRICT: (0, 0),
    BtfKind.FUNC: (0, 0),
    BtfKind.FUNC_PROTO: (2, 0),
    BtfKind.VAR: (0, 1),
    BtfKind.DATASEC: (3, 0),
    BtfKind.FLOAT: (0, 0),
    BtfKind.DECL_TAG: (0, 1),
    BtfKind.TYPE_TAG: (0, 0),
    BtfKind.ENUM64: (3, 0),
}
_PER_VLEN = [_LAYOUT[BtfKind(k)][0] for k in range(_MAX_KIND + 1)]
_FIXED = [_LAYOUT[BtfKind(k)][1] for k in range(_MAX_KIND + 1)]
