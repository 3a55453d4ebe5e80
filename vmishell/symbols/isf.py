"""Read Volatility3 ISF files and turn them into a compact, cacheable form.

An ISF is a JSON document (often .json.xz) of 10-40 MB; parsing it costs
about a second. `compile_isf` reduces it to a few marshal-encoded sections
(one blob per type, decoded only when asked) that a Profile loads in
milliseconds. `ProfileCache` keeps those sections on disk keyed by the ISF's
content hash; a stat fingerprint lets a warm load skip reading the ISF, and
is trusted only when it was recorded well after the file's last change (the
"racy clean" rule git uses), so an edit can never be served a stale profile.
"""

from __future__ import annotations

import base64
import binascii
import bz2
import contextlib
import gzip
import hashlib
import json
import lzma
import marshal
import os
import sys
import tempfile
import time
import zlib
from array import array
from collections.abc import Mapping
from itertools import accumulate
from pathlib import Path
from typing import Any

from vmishell.errors import ProfileError
from vmishell.symbols.btf import paused_gc

#: Bumped whenever the compiled layout changes; older cache entries are rebuilt.
COMPILED_VERSION = 5
_CACHE_MAGIC = b"VMIPROF\0"
MAX_ENTRIES = 16  # compiled profiles kept in the cache directory
_RACY_SECONDS = 2.0  # a fingerprint recorded sooner than this after a change is re-verified
# Entries hold native-endian arrays and marshal data: valid for this platform only.
_PLATFORM = (*sys.version_info[:2], sys.byteorder, array("I").itemsize, array("Q").itemsize)

SECTIONS = (
    "header",
    "base_types",
    "types",  # PackedTable: type name -> marshal((kind, size, flattened fields))
    "enums",  # PackedTable: enum name -> marshal((size, base, constants))
    "symbols",  # PackedTable: symbol name -> marshal(descriptor) or b"" when untyped
    "symbol_addresses",  # array("Q"), aligned with the symbols table's sorted names
    "symbol_order",  # array("I"): symbol indices sorted by (address, name)
    "symbol_sorted_addresses",  # array("Q"): addresses in that order, for bisection
    "constant_data",
)

# Descriptor tuples (compact TypeRef): first item is the kind.
#   ("base", name) ("pointer", sub) ("array", count, sub) ("struct"|"union"|"class", name)
#   ("enum", name) ("function",) ("bitfield", position, length, sub)
Desc = tuple


def read_isf_bytes(path: Path) -> bytes:
    """The JSON text of an ISF file, decompressed by content (xz, gzip, bzip2 or plain)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ProfileError(f"cannot read ISF {path}: {exc.strerror or exc}") from exc
    return decompress(raw, path)


def decompress(raw: bytes, path: Path) -> bytes:
    """Undo xz/gzip/bzip2 compression recognised by magic bytes."""
    try:
        if raw.startswith(b"\xfd7zXZ\x00"):
            return lzma.decompress(raw)
        if raw.startswith(b"\x1f\x8b"):
            return gzip.decompress(raw)
        if raw.startswith(b"BZh"):
            return bz2.decompress(raw)
    except (lzma.LZMAError, OSError, EOFError, ValueError) as exc:
        raise ProfileError(f"ISF {path} is corrupt or truncated: {exc}") from exc
    return raw


def parse_isf(text: bytes, path: Path) -> dict:
    """Parse and check an ISF document (schema 6.x only)."""
    try:
        with paused_gc():
            isf = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProfileError(f"ISF {path} is not valid JSON: {exc}") from exc
    except RecursionError:
        raise ProfileError(f"ISF {path} nests JSON too deeply to be an ISF") from None
    check_isf(isf, str(path))
    return isf


def read_isf(path: str | os.PathLike[str]) -> dict:
    """Read any Volatility3 ISF (.json, .json.xz, .json.gz) and check its version."""
    path = Path(path)
    return parse_isf(read_isf_bytes(path), path)


def check_isf(isf: Any, source: str) -> None:
    """Reject anything but a schema 6.x ISF, naming the version found and the file."""
    if not isinstance(isf, dict):
        raise ProfileError(f"ISF {source} is not a JSON object")
    metadata = isf.get("metadata")
    version = metadata.get("format") if isinstance(metadata, dict) else None
    if not isinstance(version, str):
        raise ProfileError(f"ISF {source} has no metadata.format version")
    major = version.split(".", 1)[0]
    if major != "6":
        raise ProfileError(
            f"ISF {source} has format version {version}; only 6.x is supported "
            "(regenerate it with a current dwarf2json or `vmishell profile build`)"
        )
    for key in ("base_types", "user_types", "enums", "symbols"):
        if not isinstance(isf.get(key), dict):
            raise ProfileError(f"ISF {source} (format {version}) lacks its {key!r} table")


# -- compiling ------------------------------------------------------------


class PackedTable:
    """Name -> bytes, stored as sorted UTF-8 keys and values in two blobs.

    Opening one costs a copy of its blobs, not one Python object per entry:
    lookups bisect the keys (~18 probes for 250k symbols), so a profile of a
    distribution kernel opens in milliseconds.
    """

    __slots__ = ("_key_offsets", "_keys", "_value_offsets", "_values")

    def __init__(self, packed: bytes) -> None:
        keys, key_offsets, values, value_offsets = marshal.loads(packed)
        self._keys: bytes = keys
        self._values: bytes = values
        self._key_offsets = _u32_array(key_offsets)
        self._value_offsets = _u32_array(value_offsets)
        n = len(self._key_offsets) - 1
        if n < 0 or len(self._value_offsets) != n + 1:
            raise ValueError("packed table offsets disagree")
        if self._key_offsets[n] != len(keys) or self._value_offsets[n] != len(values):
            raise ValueError("packed table offsets run past their blobs")

    @staticmethod
    def pack(items: Mapping[str, bytes] | list[tuple[bytes, bytes]]) -> bytes:
        """Pack a mapping (or a list of (UTF-8 key, value) already sorted by key)."""
        if isinstance(items, Mapping):
            items = sorted((k.encode(), v) for k, v in items.items())
        keys = [k for k, _ in items]
        values = [v for _, v in items]
        return marshal.dumps(
            (
                b"".join(keys),
                array("I", accumulate(map(len, keys), initial=0)).tobytes(),
                b"".join(values),
                array("I", accumulate(map(len, values), initial=0)).tobytes(),
            )
        )

    def __len__(self) -> int:
        return len(self._key_offsets) - 1

    def _key(self, i: int) -> bytes:
        return self._keys[self._key_offsets[i] : self._key_offsets[i + 1]]

    def index(self, key: str) -> int:
        """Position of `key` in sorted order, or -1."""
        target = key.encode()
        lo, hi = 0, len(self._key_offsets) - 1
        offsets, keys = self._key_offsets, self._keys
        while lo < hi:
            mid = (lo + hi) // 2
            if keys[offsets[mid] : offsets[mid + 1]] < target:
                lo = mid + 1
            else:
                hi = mid
        if lo < len(self._key_offsets) - 1 and self._key(lo) == target:
            return lo
        return -1

    def key(self, i: int) -> str:
        return self._key(i).decode()

    def value(self, i: int) -> bytes:
        return self._values[self._value_offsets[i] : self._value_offsets[i + 1]]

    def get(self, key: str) -> bytes | None:
        i = self.index(key)
        return None if i < 0 else self.value(i)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.index(key) >= 0

    def keys(self) -> list[str]:
        return [self.key(i) for i in range(len(self))]


def _u32_array(raw: bytes) -> array:
    a = array("I")
    a.frombytes(raw)
    return a


class _Interner:
    """Shares equal descriptor tuples so marshal writes each once."""

    def __init__(self) -> None:
        self._seen: dict[Desc, Desc] = {}

    def __call__(self, d: Desc) -> Desc:
        return self._seen.setdefault(d, d)


def _desc(obj: Any, intern: _Interner, where: str) -> Desc:
    """An ISF type descriptor dict as a compact tuple."""
    if not isinstance(obj, dict):
        raise ProfileError(f"{where}: type descriptor is not an object")
    kind = obj.get("kind")
    try:
        if kind == "base" or kind in ("struct", "union", "class", "enum"):
            d: Desc = (kind, str(obj["name"]))
        elif kind == "pointer":
            d = ("pointer", _desc(obj["subtype"], intern, where))
        elif kind == "array":
            d = ("array", int(obj["count"]), _desc(obj["subtype"], intern, where))
        elif kind == "function":
            d = ("function",)
        elif kind == "bitfield":
            d = (
                "bitfield",
                int(obj["bit_position"]),
                int(obj["bit_length"]),
                _desc(obj["type"], intern, where),
            )
        else:
            raise ProfileError(f"{where}: unknown type kind {kind!r}")
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ProfileError(f"{where}: malformed {kind} descriptor ({exc!r})") from exc
    return intern(d)


def _flatten(
    user_types: Mapping[str, Any],
    fields: Mapping[str, Any],
    base: int,
    out: dict[str, tuple[int, Desc]],
    intern: _Interner,
    where: str,
    depth: int = 0,
) -> None:
    """Bring anonymous members' fields up one level, as Volatility3's reader does."""
    if depth > 64:
        raise ProfileError(f"{where}: anonymous members nest deeper than 64 levels (a cycle?)")
    for name, field in fields.items():
        if not isinstance(field, dict) or "type" not in field:
            raise ProfileError(f"{where}: field {name!r} is malformed")
        offset = base + int(field.get("offset", 0))
        ftype = field["type"]
        if field.get("anonymous") and isinstance(ftype, dict):
            nested = user_types.get(str(ftype.get("name")))  # as Volatility3 flattens
            if isinstance(nested, dict) and isinstance(nested.get("fields"), dict):
                _flatten(user_types, nested["fields"], offset, out, intern, where, depth + 1)
                continue
        out[name] = (offset, _desc(ftype, intern, f"{where}.{name}"))


def _compile_type(user_types: Mapping[str, Any], tname: str, intern: _Interner, name: str) -> bytes:
    """One user type as a Profile reads it: kind, size and its flattened fields in order."""
    body = user_types[tname]
    where = f"{name}: type {tname}"
    if not isinstance(body, dict) or not isinstance(body.get("fields"), dict):
        raise ProfileError(f"{where} is malformed")
    flat: dict[str, tuple[int, Desc]] = {}
    try:
        _flatten(user_types, body["fields"], 0, flat, intern, where)
        size = int(body["size"])
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise ProfileError(f"{where} is malformed ({exc!r})") from exc
    ordered = sorted(
        ((fname, off, d) for fname, (off, d) in flat.items()),
        key=lambda f: (f[1], f[2][1] if f[2][0] == "bitfield" else 0),
    )
    return marshal.dumps((str(body.get("kind", "struct")), size, tuple(ordered)))


class LazyTypes:
    """The types section of an ISF compiled one type at a time, when first asked for.

    For a profile used straight after it was built in this process (a carved
    one): the attach needs a few dozen of its ten thousand types, and the full
    compile happens anyway when the ISF is cached on disk. Same lookups as the
    `PackedTable` it stands in for; a malformed type fails when it is asked for.
    """

    __slots__ = ("_compiled", "_intern", "_name", "_user_types")

    def __init__(self, user_types: Mapping[str, Any], name: str) -> None:
        self._user_types = user_types
        self._name = name
        self._intern = _Interner()
        self._compiled: dict[str, bytes] = {}

    def __len__(self) -> int:
        return len(self._user_types)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._user_types

    def get(self, key: str) -> bytes | None:
        blob = self._compiled.get(key)
        if blob is None and key in self._user_types:
            blob = _compile_type(self._user_types, key, self._intern, self._name)
            self._compiled[key] = blob
        return blob

    def keys(self) -> list[str]:
        return sorted(self._user_types)


def compile_isf(isf: Mapping[str, Any], name: str, *, lazy_types: bool = False) -> dict[str, Any]:
    """The compact sections a Profile reads: small ones eager, types and enums per item.

    With `lazy_types` the types section is a `LazyTypes` over the ISF itself
    (in memory only: such sections cannot be written to the profile cache).
    """
    intern = _Interner()
    dumps = marshal.dumps
    for table in ("user_types", "enums", "symbols"):
        _check_names(isf[table], f"{name}: {table}")
    with paused_gc():
        user_types = isf["user_types"]
        types: bytes | LazyTypes
        if lazy_types:
            types = LazyTypes(user_types, name)
        else:
            types = PackedTable.pack(
                {t: _compile_type(user_types, t, intern, name) for t in user_types}
            )

        enums: dict[str, bytes] = {}
        for ename, body in isf["enums"].items():
            try:
                constants = tuple((str(k), int(v)) for k, v in body["constants"].items())
                enums[ename] = dumps((int(body["size"]), str(body["base"]), constants))
            except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
                raise ProfileError(f"{name}: enum {ename} is malformed ({exc!r})") from exc

        base_types = {}
        for bname, body in isf["base_types"].items():
            try:
                base_types[bname] = (
                    int(body.get("size", 0)),
                    bool(body.get("signed", False)),
                    str(body.get("kind", "int")),
                    str(body.get("endian", "little")),
                )
            except (TypeError, ValueError, AttributeError, OverflowError) as exc:
                raise ProfileError(f"{name}: base type {bname} is malformed ({exc!r})") from exc

        table = isf["symbols"]
        # Code-point order is UTF-8 byte order (lone surrogates were refused above), so
        # names sorted as text are the packed table's keys in order.
        names = sorted(table)
        try:
            by_name, values, constant_data = _compile_symbols_fast(table, names, intern, name)
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError, ProfileError):
            # Something is off: the careful loop says which symbol and what.
            by_name, values, constant_data = _compile_symbols(table, names, intern, name)
        order = sorted(range(len(by_name)), key=by_name.__getitem__)  # stable: then by name
        symbol_table = PackedTable.pack(
            [(n.encode(), v) for n, v in zip(names, values, strict=True)]
        )

    pointer = base_types.get("pointer")
    endian = pointer[3] if pointer else next((b[3] for b in base_types.values()), "little")
    banner = constant_data.get("linux_banner")
    header = {
        "name": name,
        "format": str(isf["metadata"]["format"]),
        "pointer_size": pointer[0] if pointer else _guess_pointer_size(base_types),
        "endian": endian,
        "banner": banner.rstrip(b"\0") if banner is not None else None,
        "producer": _producer(isf["metadata"]),
    }
    sections = {
        "header": dumps(header),
        "base_types": dumps(base_types),
        "types": types,
        "enums": PackedTable.pack(enums),
        "symbols": symbol_table,
        "symbol_addresses": by_name.tobytes(),
        "symbol_order": array("I", order).tobytes(),
        "symbol_sorted_addresses": array("Q", map(by_name.__getitem__, order)).tobytes(),
        "constant_data": dumps(constant_data),
    }
    return sections


def _compile_symbols_fast(
    table: Mapping[str, Any], names: list[str], intern: _Interner, name: str
) -> tuple[array, list[bytes], dict[str, bytes]]:
    """Addresses, descriptors and constant data of the symbols, in `names` order.

    The common case (every body a dict with an int address) in a few passes;
    anything else raises, and `_compile_symbols` then names the culprit.
    """
    bodies = [table[n] for n in names]
    addresses = [body["address"] for body in bodies]
    if not all(type(a) is int for a in addresses):
        raise TypeError("an address is not an int")
    by_name = array("Q", addresses)  # OverflowError when negative or beyond 64 bits
    dumps = marshal.dumps
    values = [
        dumps(_desc(body["type"], intern, f"{name}: symbol {sname}")) if "type" in body else b""
        for sname, body in zip(names, bodies, strict=True)
    ]
    constant_data = {
        sname: _b64(body["constant_data"], f"{name}: symbol {sname}")
        for sname, body in zip(names, bodies, strict=True)
        if "constant_data" in body
    }
    return by_name, values, constant_data


def _compile_symbols(
    table: Mapping[str, Any], names: list[str], intern: _Interner, name: str
) -> tuple[array, list[bytes], dict[str, bytes]]:
    """`_compile_symbols_fast`, one symbol at a time: the first bad one raises ProfileError."""
    dumps = marshal.dumps
    by_name = array("Q")
    values: list[bytes] = []
    constant_data: dict[str, bytes] = {}
    for sname in names:
        body = table[sname]
        try:
            address = int(body["address"])
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ProfileError(f"{name}: symbol {sname} has no valid address") from exc
        if not 0 <= address < 1 << 64:
            raise ProfileError(f"{name}: symbol {sname} address {address:#x} is not 64-bit")
        by_name.append(address)
        values.append(
            dumps(_desc(body["type"], intern, f"{name}: symbol {sname}")) if "type" in body else b""
        )
        if "constant_data" in body:
            constant_data[sname] = _b64(body["constant_data"], f"{name}: symbol {sname}")
    return by_name, values, constant_data


def _producer(metadata: Mapping[str, Any]) -> dict[str, str]:
    """metadata.producer as short strings (what made the ISF, e.g. from which kernel package)."""
    producer = metadata.get("producer")
    if not isinstance(producer, dict):
        return {}
    return {
        str(k)[:40]: str(v)[:200]
        for k, v in list(producer.items())[:16]
        if isinstance(v, str | int | float)
    }


def _check_names(table: Mapping[str, Any], where: str) -> None:
    """Names are stored as UTF-8: a JSON lone surrogate cannot be, so say which one."""
    for key in table:
        try:
            key.encode()
        except UnicodeEncodeError:
            raise ProfileError(f"{where}: the name {key!r} is not valid Unicode") from None


def _guess_pointer_size(base_types: Mapping[str, tuple]) -> int:
    for name in ("long unsigned int", "unsigned long", "long int", "long"):
        if name in base_types:
            return base_types[name][0]
    return 8


def _b64(text: Any, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError) as exc:
        raise ProfileError(f"{where}: constant_data is not base64") from exc


# -- the cache --------------------------------------------------------------


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/vmishell/profiles, else ~/.cache/vmishell/profiles."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return root / "vmishell" / "profiles"


def _fingerprint(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class ProfileCache:
    """Compiled profiles on disk.

    `<sha256 of the ISF file>.vmiprof` holds the sections (checked by their
    CRC-32 before use: the entry is this user's own file, so the check is for
    torn or damaged writes, and a CRC costs a quarter of a sha256 on every
    attach); `stat-<hash of the path>` maps an unchanged file (device, inode,
    size, mtime, ctime) to its content hash.
    """

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    def digest_of(self, path: Path) -> str:
        """The content hash keying `path`: from a trusted fingerprint, else by reading it."""
        path = path.resolve()
        before = path.stat()
        digest = self._trusted_digest(path, before)
        if digest is None:
            digest = _sha256_file(path)
            self.remember(path, before, path.stat(), digest)
        return digest

    def get(self, digest: str) -> dict[str, memoryview] | None:
        """The sections stored under `digest`; a corrupt entry is deleted and None returned."""
        entry = self.directory / f"{digest}.vmiprof"
        try:
            blob = entry.read_bytes()
        except OSError:
            return None
        try:
            sections = _decode_entry(blob, digest)
        except (ValueError, EOFError, TypeError, KeyError):
            with contextlib.suppress(OSError):
                entry.unlink()
            return None
        with contextlib.suppress(OSError):
            os.utime(entry)  # mark as recently used for pruning
        return sections

    def put(self, digest: str, sections: Mapping[str, bytes]) -> None:
        """Store an entry; failures (read-only dir, full disk) only lose the speed-up."""
        # The payload: an index of (name, length), then the sections back to back, so
        # that opening an entry slices it instead of copying every section again.
        index = marshal.dumps([(name, len(sections[name])) for name in SECTIONS])
        payload = b"".join(
            (len(index).to_bytes(4, "little"), index, *(bytes(sections[n]) for n in SECTIONS))
        )
        head = marshal.dumps((COMPILED_VERSION, _PLATFORM, digest))
        blob = b"".join(
            (
                _CACHE_MAGIC,
                len(head).to_bytes(4, "little"),
                head,
                zlib.crc32(payload).to_bytes(4, "little"),
                payload,
            )
        )
        with contextlib.suppress(OSError):
            self.directory.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.directory / f"{digest}.vmiprof", blob)
            self._prune()

    def _prune(self) -> None:
        """Keep the MAX_ENTRIES most recently used entries (each is 5-25 MB)."""
        entries = sorted(
            self.directory.glob("*.vmiprof"), key=lambda p: p.stat().st_mtime, reverse=True
        )
        for old in entries[MAX_ENTRIES:]:
            old.unlink(missing_ok=True)

    def remember(
        self, path: Path, before: os.stat_result, after: os.stat_result, digest: str
    ) -> None:
        """Record `path`'s fingerprint, unless it changed while it was being hashed."""
        if _fingerprint(before) != _fingerprint(after):
            return
        with contextlib.suppress(OSError):
            self.directory.mkdir(parents=True, exist_ok=True)
            record = (str(path.resolve()), _fingerprint(after), digest, time.time())
            _atomic_write(self._stat_file(path.resolve()), marshal.dumps(record))

    def _stat_file(self, path: Path) -> Path:
        key = hashlib.sha256(os.fsencode(path)).hexdigest()[:32]
        return self.directory / f"stat-{key}"

    def _trusted_digest(self, path: Path, st: os.stat_result) -> str | None:
        try:
            recorded_path, fingerprint, digest, recorded_at = marshal.loads(
                self._stat_file(path).read_bytes()
            )
        except (OSError, ValueError, EOFError, TypeError):
            return None
        if recorded_path != str(path) or tuple(fingerprint) != _fingerprint(st):
            return None
        last_change = max(st.st_mtime_ns, st.st_ctime_ns) / 1e9
        if not isinstance(recorded_at, float) or recorded_at - last_change < _RACY_SECONDS:
            return None  # recorded too soon after a change: an edit could hide; re-hash
        return digest if isinstance(digest, str) and len(digest) == 64 else None


def _decode_entry(blob: bytes, digest: str) -> dict[str, memoryview]:
    """Check a cache entry and slice out its sections; ValueError (...) if corrupt.

    The sections are views of `blob`: opening a profile copies nothing more
    than the tables it then unpacks.
    """
    if not blob.startswith(_CACHE_MAGIC):
        raise ValueError("bad magic")
    pos = len(_CACHE_MAGIC)
    head_len = int.from_bytes(blob[pos : pos + 4], "little")
    pos += 4
    version, platform, stored_digest = marshal.loads(blob[pos : pos + head_len])
    pos += head_len
    if version != COMPILED_VERSION or tuple(platform) != _PLATFORM:
        raise ValueError("written by another version")
    if stored_digest != digest:
        raise ValueError("entry belongs to another file")
    checksum, payload = blob[pos : pos + 4], memoryview(blob)[pos + 4 :]
    if zlib.crc32(payload).to_bytes(4, "little") != checksum:
        raise ValueError("checksum mismatch")
    index_len = int.from_bytes(payload[:4], "little")
    index = marshal.loads(payload[4 : 4 + index_len])
    if not isinstance(index, list) or [n for n, _ in index] != list(SECTIONS):
        raise ValueError("unexpected layout")
    sections: dict[str, memoryview] = {}
    pos = 4 + index_len
    for name, length in index:
        if not isinstance(length, int) or length < 0 or pos + length > len(payload):
            raise ValueError("unexpected layout")
        sections[name] = payload[pos : pos + length]
        pos += length
    if pos != len(payload):
        raise ValueError("unexpected layout")
    return sections


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(target: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
