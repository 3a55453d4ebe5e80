"""A kernel profile: symbol addresses and structure layouts from an ISF.

Lookups are plain method calls on names (`offset_of("task_struct", "mm")`),
never Volatility "table!name" strings. Everything is decoded lazily from the
compact sections `vmishell.symbols.isf` produces, so opening a cached profile
of a distribution kernel takes milliseconds and a struct costs its decode
only on first use. Anonymous struct/union members are flattened exactly as
Volatility3 does: their fields are reachable by their own names.
"""

from __future__ import annotations

import bisect
import hashlib
import marshal
import re
from array import array
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from vmishell.errors import ProfileError, SymbolNotFound
from vmishell.symbols.isf import (
    Desc,
    LazyTypes,
    PackedTable,
    ProfileCache,
    check_isf,
    compile_isf,
    decompress,
    parse_isf,
)
from vmishell.symbols.locations import ORIGINS, origin_of

_AGGREGATE_KINDS = ("struct", "union", "class")
_PATH_PART = re.compile(r"^(?P<name>[^.\[\]]+)(?P<index>(?:\[\d+\])*)$")


@dataclass(frozen=True, slots=True)
class TypeRef:
    """A type as a field or symbol uses it.

    kind is one of "base", "pointer", "array", "struct", "union", "class",
    "enum", "function", "bitfield". `name` names base/struct/union/enum types
    (and a bit-field's storage type); `subtype` is the pointee, the array
    element or the bit-field's storage type.
    """

    kind: str
    name: str | None = None
    subtype: TypeRef | None = None
    count: int | None = None
    bit_position: int | None = None
    bit_length: int | None = None

    def __str__(self) -> str:
        if self.kind == "pointer":
            return f"{self.subtype} *"
        if self.kind == "array":
            return f"{self.subtype} [{self.count}]"
        if self.kind == "bitfield":
            return f"{self.subtype} :{self.bit_length}@{self.bit_position}"
        if self.kind in ("struct", "union", "class", "enum"):
            return f"{self.kind} {self.name}"
        if self.kind == "function":
            return "function"
        return str(self.name)


@dataclass(frozen=True, slots=True)
class Field:
    """A member of a struct/union: `offset` in bytes from the start of the outer type."""

    name: str
    offset: int
    type: TypeRef


class _Aggregate:
    __slots__ = ("by_name", "fields", "kind", "size")

    def __init__(self, kind: str, size: int, fields: tuple[Field, ...]) -> None:
        self.kind = kind
        self.size = size
        self.fields = fields
        self.by_name = {f.name: f for f in fields}


class Profile:
    """Answers symbol and layout questions about one kernel build."""

    def __init__(
        self,
        sections: Mapping[str, bytes | memoryview],
        *,
        name: str | None = None,
        path: Path | None = None,
    ) -> None:
        self._sections = sections
        #: The ISF file this profile was read from (None when built in memory).
        self.path = path
        try:
            header = marshal.loads(sections["header"])
            self.name: str = name or header["name"]
            self.format: str = header["format"]
            self.pointer_size: int = header["pointer_size"]
            self.endian: str = header["endian"]
            #: linux_banner's constant data without its trailing NUL(s), if the ISF has it.
            self.banner: bytes | None = header["banner"]
            #: What made the ISF (its metadata.producer): name, version, kernel package, ...
            self.producer: dict[str, str] = dict(header.get("producer") or {})
        except (KeyError, ValueError, EOFError, TypeError, AttributeError) as exc:
            raise ProfileError(f"profile {name or '?'}: header is unreadable") from exc
        self._aggregates: dict[str, _Aggregate] = {}
        self._refs: dict[Desc, TypeRef] = {}

    @classmethod
    def from_isf(
        cls, isf: Mapping[str, Any], name: str = "profile", *, lazy_types: bool = False
    ) -> Profile:
        """A profile straight from an ISF dict (e.g. fresh from `build_isf`), no cache.

        `lazy_types` compiles each type when first used (see `LazyTypes`): for an
        ISF this process just built, when the first answer matters more than
        checking every type up front.
        """
        check_isf(isf, name)
        return cls(compile_isf(isf, name, lazy_types=lazy_types), name=name)

    def __repr__(self) -> str:
        return (
            f"<Profile {self.name} ({self.pointer_size * 8}-bit {self.endian}, ISF {self.format})>"
        )

    # -- where it came from ----------------------------------------------------

    @property
    def origin(self) -> str:
        """Where the profile came from: a key of `locations.ORIGINS` ("shipped", "built", ...)."""
        return origin_of(self.path)

    @property
    def made_from(self) -> str | None:
        """The kernel package (or file) the ISF was built from, when its producer says."""
        return self.producer.get("kernel")

    @property
    def provenance(self) -> str:
        """One line for users: which profile, where it came from, what it was made from.

        e.g. "shipped profile linux-6.1.0-57-amd64-6.1.192-3 (made from
        linux-image-6.1.0-57-amd64 6.1.192-3)" or "profile built from package
        linux-image-6.1.0-58-686 6.1.193-1 (~/.cache/vmishell/built-profiles/...)".
        """
        origin, made = self.origin, self.made_from
        where = f" ({self.path})" if self.path is not None else ""
        if origin == "shipped":
            return f"shipped profile {self.name}" + (f" (made from {made})" if made else "")
        if origin == "built" and made:
            return f"profile built from package {made}{where}"
        tool = " ".join(v for k, v in self.producer.items() if k in ("name", "version"))
        how = f"made from {made}" if made else f"made by {tool}" if tool else ""
        return f"profile {self.name} {ORIGINS[origin]}{where}" + (f", {how}" if how else "")

    # -- lazily decoded sections --------------------------------------------

    def _load(self, section: str) -> Any:
        try:
            return marshal.loads(self._sections[section])
        except (KeyError, ValueError, EOFError, TypeError) as exc:
            raise ProfileError(f"profile {self.name}: section {section} is unreadable") from exc

    @cached_property
    def _types(self) -> PackedTable:
        return self._table("types")

    @cached_property
    def _enums(self) -> PackedTable:
        return self._table("enums")

    @cached_property
    def _symbols(self) -> PackedTable:
        return self._table("symbols")

    @cached_property
    def _base_types(self) -> dict[str, tuple[int, bool, str, str]]:
        return self._load("base_types")

    @cached_property
    def _addresses(self) -> array:
        return self._array("Q", "symbol_addresses", len(self._symbols))

    @cached_property
    def _order(self) -> array:
        return self._array("I", "symbol_order", len(self._symbols))

    @cached_property
    def _sorted_addresses(self) -> array:
        return self._array("Q", "symbol_sorted_addresses", len(self._symbols))

    @cached_property
    def _enum_cache(self) -> dict[str, tuple[int, str, dict[str, int], dict[int, str]]]:
        return {}

    def _table(self, section: str) -> PackedTable:
        try:
            packed = self._sections[section]
            if isinstance(packed, LazyTypes):
                return packed  # type: ignore[return-value]  # same lookups, compiled on demand
            return PackedTable(packed)
        except (KeyError, ValueError, EOFError, TypeError) as exc:
            raise ProfileError(f"profile {self.name}: section {section} is unreadable") from exc

    def _array(self, code: str, section: str, length: int) -> array:
        values = array(code)
        try:
            values.frombytes(self._sections[section])
        except (KeyError, ValueError) as exc:
            raise ProfileError(f"profile {self.name}: section {section} is unreadable") from exc
        if len(values) != length:
            raise ProfileError(f"profile {self.name}: section {section} has the wrong length")
        return values

    # -- symbols ------------------------------------------------------------

    def _symbol_index(self, name: str) -> int:
        i = self._symbols.index(name)
        if i < 0:
            raise SymbolNotFound(f"no symbol {name!r} in profile {self.name}")
        return i

    def symbol_address(self, name: str) -> int:
        """Link-time address of `name`; SymbolNotFound if absent."""
        return self._addresses[self._symbol_index(name)]

    def has_symbol(self, name: str) -> bool:
        return name in self._symbols

    def symbol_type(self, name: str) -> TypeRef | None:
        """The symbol's type, or None when the ISF gives none."""
        blob = self._symbols.value(self._symbol_index(name))
        return self._ref(marshal.loads(blob)) if blob else None

    def symbol_names(self) -> list[str]:
        """Every symbol, in address order."""
        key = self._symbols.key
        return [key(i) for i in self._order]

    def symbol_at(self, address: int) -> tuple[str, int] | None:
        """(name, offset) of the nearest symbol at or below `address`, for "name+0x10".

        Among aliases at one address, a name not starting with "_" wins.
        """
        addresses = self._sorted_addresses
        i = bisect.bisect_right(addresses, address)
        if i == 0:
            return None
        start = addresses[i - 1]
        first = bisect.bisect_left(addresses, start, 0, i)
        key, order = self._symbols.key, self._order
        names = [key(order[j]) for j in range(first, i)]
        best = next((n for n in names if not n.startswith("_")), names[0])
        return best, address - start

    # -- types --------------------------------------------------------------

    def has_type(self, name: str) -> bool:
        """True for a struct/union, base type (incl. "pointer") or enum of that name."""
        name = _strip_tag(name)
        return name in self._types or name in self._base_types or name in self._enums

    def type_ref(self, name: str) -> TypeRef:
        """A TypeRef for a named struct/union, enum or base type ("struct x" tags allowed)."""
        tag, _, bare = name.partition(" ") if " " in name else ("", "", name)
        if tag not in ("struct", "union", "class", "enum"):
            tag, bare = "", name  # a base type such as "unsigned int"
        if tag != "enum" and bare in self._types:
            return TypeRef(self._aggregate(bare).kind, bare)
        if tag in ("", "enum") and bare in self._enums:
            return TypeRef("enum", bare)
        if not tag and bare in self._base_types:
            return TypeRef("base", bare)
        raise SymbolNotFound(f"no type {name!r} in profile {self.name}")

    def base_type(self, name: str) -> tuple[int, bool, str]:
        """(size, signed, kind) of a base type; kind is "int", "char", "bool", "float" or "void"."""
        try:
            size, signed, kind, _endian = self._base_types[name]
        except KeyError:
            raise SymbolNotFound(f"no base type {name!r} in profile {self.name}") from None
        return size, signed, kind

    def type_names(self) -> list[str]:
        """Sorted names of every struct/union, base type and enum."""
        return sorted({*self._types.keys(), *self._base_types, *self._enums.keys()})

    def size_of(self, type_name: str | TypeRef) -> int:
        """Size in bytes of a struct/union/base type/enum/"pointer" (or of a TypeRef)."""
        if isinstance(type_name, TypeRef):
            return self._size_of_ref(type_name)
        tag, _, bare = type_name.partition(" ") if " " in type_name else ("", "", type_name)
        if tag not in ("", "struct", "union", "class", "enum"):
            tag, bare = "", type_name  # a base type such as "unsigned int"
        if tag != "enum" and bare in self._types:
            return self._aggregate(bare).size
        if not tag and bare == "pointer":
            return self.pointer_size
        if not tag and bare in self._base_types:
            return self._base_types[bare][0]
        if tag in ("", "enum") and bare in self._enums:
            return self._enum(bare)[0]
        raise SymbolNotFound(f"no type {type_name!r} in profile {self.name}")

    def fields(self, struct: str) -> tuple[Field, ...]:
        """The members of a struct/union by offset, anonymous members flattened."""
        return self._aggregate(_strip_tag(struct)).fields

    def has_field(self, struct: str, name: str) -> bool:
        try:
            self.field(struct, name)
        except SymbolNotFound:
            return False
        return True

    def field(self, struct: str, name: str) -> Field:
        """A member; `name` may be a path through embedded members ("se.vruntime", "a[2].b").

        The returned Field carries the path as its name and the offset from
        the start of `struct`.
        """
        struct = _strip_tag(struct)
        agg = self._aggregate(struct)
        direct = agg.by_name.get(name)
        if direct is not None:
            return direct
        if "." not in name and "[" not in name:
            raise SymbolNotFound(f"{struct} has no field {name!r} in profile {self.name}")
        return self._walk(struct, agg, name)

    def offset_of(self, struct: str, field: str) -> int:
        """Byte offset of `field` (a member name or a path, see `field`) in `struct`."""
        return self.field(struct, field).offset

    def _walk(self, struct: str, agg: _Aggregate, path: str) -> Field:
        offset = 0
        current: TypeRef | None = None
        walked = ""  # the path so far, for messages
        where = struct  # the aggregate being searched
        for part in path.split("."):
            m = _PATH_PART.match(part)
            if m is None:
                raise SymbolNotFound(f"{struct} has no field {path!r} in profile {self.name}")
            if current is not None:
                if current.kind not in _AGGREGATE_KINDS or current.name is None:
                    raise SymbolNotFound(
                        f"{struct}.{path}: {walked} is a {current}, not an embedded "
                        f"struct/union, in profile {self.name}"
                    )
                agg = self._aggregate(current.name)
                where = current.name
            member = agg.by_name.get(m["name"])
            if member is None:
                raise SymbolNotFound(
                    f"{where} has no field {m['name']!r} in profile {self.name}"
                    + (f" (walking {struct}.{path})" if walked else "")
                )
            offset += member.offset
            current = member.type
            walked = f"{walked}.{m['name']}" if walked else m["name"]
            for index in re.findall(r"\d+", m["index"]):
                if current.kind != "array" or current.subtype is None:
                    raise SymbolNotFound(
                        f"{struct}.{path}: {walked} is a {current}, not an array, "
                        f"in profile {self.name}"
                    )
                offset += int(index) * self._size_of_ref(current.subtype)
                current = current.subtype
                walked += f"[{index}]"
        if current is None:  # pragma: no cover - split() yields at least one part
            raise SymbolNotFound(f"{struct} has no field {path!r} in profile {self.name}")
        return Field(path, offset, current)

    # -- enums --------------------------------------------------------------

    def enum_value(self, enum: str, constant: str) -> int:
        values = self._enum(_strip_tag(enum))[2]
        try:
            return values[constant]
        except KeyError:
            raise SymbolNotFound(
                f"enum {enum} has no constant {constant!r} in profile {self.name}"
            ) from None

    def enum_name(self, enum: str, value: int) -> str | None:
        """The (first) constant with `value`, or None."""
        return self._enum(_strip_tag(enum))[3].get(value)

    def enum_constants(self, enum: str) -> dict[str, int]:
        return dict(self._enum(_strip_tag(enum))[2])

    # -- internals ----------------------------------------------------------

    def _aggregate(self, name: str) -> _Aggregate:
        agg = self._aggregates.get(name)
        if agg is not None:
            return agg
        blob = self._types.get(name)
        if blob is None:
            raise SymbolNotFound(f"no struct or union {name!r} in profile {self.name}")
        try:
            kind, size, raw_fields = marshal.loads(blob)
        except (ValueError, EOFError, TypeError) as exc:
            raise ProfileError(f"profile {self.name}: type {name} is unreadable") from exc
        ref = self._ref
        fields = tuple(Field(fname, off, ref(desc)) for fname, off, desc in raw_fields)
        agg = _Aggregate(kind, size, fields)
        self._aggregates[name] = agg
        return agg

    def _enum(self, name: str) -> tuple[int, str, dict[str, int], dict[int, str]]:
        cached = self._enum_cache.get(name)
        if cached is not None:
            return cached
        blob = self._enums.get(name)
        if blob is None:
            raise SymbolNotFound(f"no enum {name!r} in profile {self.name}")
        try:
            size, base, constants = marshal.loads(blob)
        except (ValueError, EOFError, TypeError) as exc:
            raise ProfileError(f"profile {self.name}: enum {name} is unreadable") from exc
        by_value: dict[int, str] = {}
        for cname, value in constants:
            by_value.setdefault(value, cname)
        decoded = (size, base, dict(constants), by_value)
        self._enum_cache[name] = decoded
        return decoded

    def _ref(self, desc: Desc) -> TypeRef:
        ref = self._refs.get(desc)
        if ref is not None:
            return ref
        kind = desc[0]
        if kind == "pointer":
            ref = TypeRef("pointer", subtype=self._ref(desc[1]))
        elif kind == "array":
            ref = TypeRef("array", subtype=self._ref(desc[2]), count=desc[1])
        elif kind == "bitfield":
            sub = self._ref(desc[3])
            ref = TypeRef("bitfield", sub.name, sub, bit_position=desc[1], bit_length=desc[2])
        elif kind == "function":
            ref = TypeRef("function")
        else:
            ref = TypeRef(kind, desc[1])
        self._refs[desc] = ref
        return ref

    def _size_of_ref(self, ref: TypeRef) -> int:
        kind = ref.kind
        if kind == "pointer":
            return self.pointer_size
        if kind == "array":
            assert ref.subtype is not None and ref.count is not None
            return ref.count * self._size_of_ref(ref.subtype)
        if kind == "bitfield":
            assert ref.subtype is not None
            return self._size_of_ref(ref.subtype)
        if kind in _AGGREGATE_KINDS and ref.name is not None:
            return self._aggregate(ref.name).size
        if kind == "enum" and ref.name is not None:
            return self._enum(ref.name)[0]
        if kind == "base" and ref.name in self._base_types:
            return self._base_types[ref.name][0]
        raise SymbolNotFound(f"size of {ref} is unknown in profile {self.name}")


def _strip_tag(name: str) -> str:
    """ "struct task_struct" -> "task_struct" (plain names pass through)."""
    for tag in ("struct ", "union ", "class ", "enum "):
        if name.startswith(tag):
            return name[len(tag) :]
    return name


def profile_name(path: Path) -> str:
    """The profile name for a file: its name without .json/.xz/.gz/.bz2."""
    name = path.name
    for suffix in (".xz", ".gz", ".bz2", ".json"):
        name = name.removesuffix(suffix)
    return name or path.name


def load_profile(path: str | Path, *, cache_dir: Path | None = None) -> Profile:
    """Open an ISF (.json, .json.xz, .json.gz), through the compiled-profile cache.

    The cache key is the sha256 of the file's bytes; a (device, inode, size,
    mtime, ctime) fingerprint avoids re-hashing an unchanged file. A corrupt
    cache entry is discarded and rebuilt.
    """
    path = Path(path)
    name = profile_name(path)
    cache = ProfileCache(cache_dir)
    try:
        digest = cache.digest_of(path)
    except OSError as exc:
        raise ProfileError(f"cannot read ISF {path}: {exc.strerror or exc}") from exc
    sections = cache.get(digest)
    if sections is not None:
        return Profile(sections, name=name, path=path)
    try:
        before = path.stat()
        raw = path.read_bytes()
        after = path.stat()
    except OSError as exc:
        raise ProfileError(f"cannot read ISF {path}: {exc.strerror or exc}") from exc
    digest = hashlib.sha256(raw).hexdigest()
    isf = parse_isf(decompress(raw, path), path)
    del raw
    sections = compile_isf(isf, name)
    del isf
    cache.put(digest, sections)
    cache.remember(path, before, after, digest)
    return Profile(sections, name=name, path=path)
