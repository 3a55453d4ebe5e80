"""Decode a typed guest structure from memory, bounded, without IPython.

`decode(profile, reader, "task_struct", address)` reads the structure's bytes
once (page by page, so an unmapped page spoils only the members on it) and
turns them into `vmishell.symbols.values` objects: nested structs, arrays,
pointers as (address, pointed type) so they can be followed, enums by name,
char arrays as strings. `layout(profile, "task_struct")` gives the members
without reading memory.

The layout comes from the profile, the values from a possibly hostile guest.
Pointers are never followed here, and everything is capped: the nesting
depth, the elements decoded per array, the bytes read and the values
produced. A member that cannot be decoded keeps its row with an error.
"""

from __future__ import annotations

import struct as _struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from vmishell.errors import GuestDataError, VmiError
from vmishell.symbols.profile import Profile, TypeRef
from vmishell.symbols.values import Array, EnumValue, FieldValue, Pointer, Struct

PAGE = 0x1000
_AGGREGATES = ("struct", "union", "class")


class Reader(Protocol):
    """Anything that reads guest virtual memory (a Process, an AddressSpace)."""

    def read(self, vaddr: int, size: int) -> bytes: ...


#: (address) -> "symbol+0x10" or None; lets pointers into the kernel image show a name.
Symbolizer = Callable[[int], str | None]


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """Caps for one decode; the defaults keep a `task_struct` whole and a notebook quick."""

    max_depth: int = 8  # nested structs expanded, whatever depth the caller asks for
    max_elements: int = 64  # elements decoded per array
    max_string: int = 4096  # bytes of a char array shown as text
    max_bytes: int = 1 << 20  # bytes read for one structure
    max_values: int = 20_000  # decoded values in total


@dataclass(frozen=True, slots=True)
class LayoutRow:
    """One member of a type's layout (offsets from the start of the outer type)."""

    offset: int
    name: str
    type: str
    size: int | None
    bit_position: int | None
    bit_length: int | None
    depth: int


def resolve_type(profile: Profile, type_name: str) -> TypeRef:
    """A type by name; `struct x`, `union x`, `enum x` and base types (`unsigned int`)."""
    return profile.type_ref(type_name.strip())


def layout(
    profile: Profile, type_name: str, depth: int = 0, *, max_rows: int = 20_000
) -> list[LayoutRow]:
    """The members of `type_name`; `depth` > 0 also lists embedded structs' members."""
    ref = resolve_type(profile, type_name)
    if ref.kind not in _AGGREGATES or ref.name is None:
        size = _size(profile, ref)
        return [LayoutRow(0, ref.name or str(ref), str(ref), size, None, None, 0)]
    rows: list[LayoutRow] = []
    _layout(profile, ref.name, 0, "", depth, rows, max_rows)
    return rows


def _layout(
    profile: Profile, name: str, base: int, prefix: str, depth: int, rows: list[LayoutRow], cap: int
) -> None:
    for f in profile.fields(name):
        if len(rows) >= cap:
            return
        t = f.type
        rows.append(
            LayoutRow(
                base + f.offset,
                prefix + f.name,
                str(t),
                _size(profile, t),
                t.bit_position,
                t.bit_length,
                prefix.count("."),
            )
        )
        if depth > 0 and t.kind in _AGGREGATES and t.name is not None:
            _layout(profile, t.name, base + f.offset, f"{prefix}{f.name}.", depth - 1, rows, cap)


def _size(profile: Profile, ref: TypeRef) -> int | None:
    try:
        return profile.size_of(ref)
    except VmiError:
        return None


class _Bytes:
    """The structure's bytes, read page by page; unreadable pages are remembered."""

    def __init__(self, reader: Reader, address: int, size: int) -> None:
        self.address = address
        self.data = bytearray(size)
        self.bad: list[tuple[int, int, str]] = []
        pos = 0
        while pos < size:
            chunk = min(size - pos, PAGE - ((address + pos) & (PAGE - 1)))
            try:
                got = reader.read(address + pos, chunk)
                if len(got) != chunk:
                    raise GuestDataError(f"short read at {address + pos:#x}")
                self.data[pos : pos + chunk] = got
            except VmiError as exc:
                self.bad.append((pos, pos + chunk, str(exc)))
            pos += chunk

    def check(self, offset: int, size: int) -> None:
        for start, end, why in self.bad:
            if offset < end and start < offset + max(size, 1):
                raise GuestDataError(f"unreadable: {why}")
        if offset + size > len(self.data):
            raise GuestDataError("beyond the bytes read (decode limit)")

    def get(self, offset: int, size: int) -> bytes:
        self.check(offset, size)
        return bytes(self.data[offset : offset + size])


class _Decoder:
    def __init__(
        self, profile: Profile, limits: DecodeLimits, symbolize: Symbolizer | None
    ) -> None:
        self.profile = profile
        self.limits = limits
        self.symbolize = symbolize
        self.values = 0
        self.ptr_size = profile.pointer_size
        self.cut = False

    def count(self) -> None:
        self.values += 1
        if self.values > self.limits.max_values:
            self.cut = True
            raise GuestDataError(f"stopped after {self.limits.max_values} values (decode limit)")

    def value(self, buf: _Bytes, off: int, ref: TypeRef, depth: int) -> Any:
        self.count()
        kind = ref.kind
        if kind == "base":
            return self.base(buf, off, ref.name or "")
        if kind == "pointer":
            raw = int.from_bytes(buf.get(off, self.ptr_size), "little")
            target = ref.subtype or TypeRef("base", "void")
            symbol = self.symbolize(raw) if self.symbolize and raw else None
            return Pointer(raw, target, symbol)
        if kind == "enum":
            return self.enum(buf, off, ref)
        if kind == "bitfield":
            return self.bitfield(buf, off, ref)
        if kind == "array":
            return self.array(buf, off, ref, depth)
        if kind in _AGGREGATES:
            return self.aggregate(buf, off, ref, depth)
        if kind == "function":
            return None
        raise GuestDataError(f"cannot decode a {kind} value")

    def base(self, buf: _Bytes, off: int, name: str) -> Any:
        size, signed, kind = self.profile.base_type(name)
        if kind == "void" or size == 0:
            return None
        raw = buf.get(off, size)
        if kind == "float" and size in (4, 8):
            return _struct.unpack("<f" if size == 4 else "<d", raw)[0]
        value = int.from_bytes(raw, "little", signed=signed)
        return bool(value) if kind == "bool" else value

    def enum(self, buf: _Bytes, off: int, ref: TypeRef) -> EnumValue:
        name = ref.name or "?"
        size = self.profile.size_of(ref)
        value = int.from_bytes(buf.get(off, size), "little")
        return EnumValue(name, value, self.profile.enum_name(name, value))

    def bitfield(self, buf: _Bytes, off: int, ref: TypeRef) -> Any:
        storage = ref.subtype
        pos, length = ref.bit_position or 0, ref.bit_length or 0
        if storage is None or not 0 < length <= 128:
            raise GuestDataError(f"malformed bit-field {ref}")
        size = self.profile.size_of(storage)
        raw = int.from_bytes(buf.get(off, size), "little")
        value = (raw >> pos) & ((1 << length) - 1)
        if storage.kind == "enum" and storage.name:
            return EnumValue(storage.name, value, self.profile.enum_name(storage.name, value))
        if storage.kind == "base" and storage.name:
            _, signed, kind = self.profile.base_type(storage.name)
            if kind == "bool":
                return bool(value)
            if signed and value >> (length - 1):
                value -= 1 << length
        return value

    def array(self, buf: _Bytes, off: int, ref: TypeRef, depth: int) -> Any:
        element = ref.subtype
        count = ref.count or 0
        if element is None:
            raise GuestDataError(f"malformed array {ref}")
        if element.kind == "base" and element.name:
            size, _signed, kind = self.profile.base_type(element.name)
            if kind == "char" and size == 1:
                shown = min(count, self.limits.max_string)
                raw = buf.get(off, shown)
                if element.name == "unsigned char":
                    return raw
                return raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")
        esize = self.profile.size_of(element)
        items = []
        for i in range(min(count, self.limits.max_elements)):
            try:
                items.append(self.value(buf, off + i * esize, element, depth))
            except VmiError as exc:
                if self.cut:
                    break
                items.append(f"<error: {exc}>")
        return Array(element, buf.address + off, count, tuple(items))

    def aggregate(self, buf: _Bytes, off: int, ref: TypeRef, depth: int) -> Struct:
        name = ref.name or "?"
        size = self.profile.size_of(ref)
        address = buf.address + off
        if depth <= 0:
            return Struct(name, ref.kind, address, size, expanded=False)
        fields = []
        notes = []
        for f in self.profile.fields(name):
            fsize = _size(self.profile, f.type)
            where = off + f.offset
            try:
                value = self.value(buf, where, f.type, depth - 1)
                fields.append(
                    FieldValue(f.name, f.offset, f.type, buf.address + where, fsize, value)
                )
            except VmiError as exc:
                fields.append(
                    FieldValue(f.name, f.offset, f.type, buf.address + where, fsize, None, str(exc))
                )
                if self.cut:
                    notes.append(f"stopped after {self.limits.max_values} values (decode limit)")
                    break
        if off + size > len(buf.data):
            notes.append(f"only the first {len(buf.data)} bytes were read (decode limit)")
        return Struct(name, ref.kind, address, size, tuple(fields), True, tuple(notes))


def decode(
    profile: Profile,
    reader: Reader,
    type_name: str | TypeRef,
    address: int,
    depth: int = 1,
    *,
    limits: DecodeLimits | None = None,
    symbolize: Symbolizer | None = None,
) -> Any:
    """The value of type `type_name` at `address`: a Struct for structs and unions.

    `depth` counts struct levels expanded (1: the members of the outer struct,
    embedded structs named but not expanded). Raises a VmiError when none of
    the bytes can be read; members on unreadable pages carry an error instead.
    """
    limits = limits or DecodeLimits()
    ref = type_name if isinstance(type_name, TypeRef) else resolve_type(profile, type_name)
    size = profile.size_of(ref)
    if size <= 0:
        raise GuestDataError(f"{ref} has no size to decode")
    depth = max(0, min(depth, limits.max_depth))
    read = min(size, limits.max_bytes)
    buf = _Bytes(reader, address, read)
    if len(buf.bad) and sum(end - start for start, end, _ in buf.bad) >= read:
        raise GuestDataError(f"cannot read {ref} at {address:#x}: {buf.bad[0][2]}")
    decoder = _Decoder(profile, limits, symbolize)
    if ref.kind in _AGGREGATES:
        return decoder.aggregate(buf, 0, ref, max(depth, 1))
    return decoder.value(buf, 0, ref, depth)


__all__ = ["DecodeLimits", "LayoutRow", "Reader", "decode", "layout", "resolve_type"]
