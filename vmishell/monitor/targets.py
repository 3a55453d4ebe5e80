"""What a watch reads: an address, a kernel symbol, or a structure field through pointers.

`task_struct.cred->uid` (with a pid) starts at that process's task_struct,
reads the `cred` pointer, and watches `uid` in the cred it points to. The
pointers are followed again on every sample, so when the kernel installs a
new cred (commit_creds) the watch sees the new one. A symbol with a type in
the profile works the same way (`jiffies`, `init_task.comm`); anything else
is an address expression, shown as `--as` says (u64 by default).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vmishell.errors import GuestDataError, SymbolNotFound, VmiError
from vmishell.frontends.watch import NUMBER_VIEWS

if TYPE_CHECKING:
    from vmishell.session import Process, Session
    from vmishell.symbols.profile import Profile, TypeRef

_FIELD = re.compile(r"^(?P<base>[A-Za-z_]\w*)(?P<path>(?:\.|->)\S+)$")
#: Structures a pid names directly: where the process's instance is.
_PROCESS_BASES = ("task_struct", "mm_struct")
_CHARS = ("char", "unsigned char", "signed char")


class WatchTargetError(VmiError):
    """A watch target cannot be resolved (unknown type, field, symbol or address)."""


@dataclass(frozen=True, slots=True)
class Target:
    """One watched value: where it starts, the pointer hops, its size and how to show it."""

    name: str
    process: Process
    base: int
    #: Offsets: each but the last is added and then followed as a pointer.
    hops: tuple[int, ...]
    size: int
    type_name: str
    decode: Callable[[bytes], Any]

    @property
    def pid(self) -> int:
        return self.process.pid

    def locate(self) -> int:
        """The value's address now (following the pointers as they are now)."""
        read = self.process.space.read
        ptr = self.process.session.profile.pointer_size
        addr = self.base
        for off in self.hops[:-1]:
            addr = int.from_bytes(read(addr + off, ptr), "little")
            if not addr:
                raise GuestDataError(f"{self.name}: NULL pointer at hop {off:#x}")
        return addr + self.hops[-1]

    def sample(self) -> tuple[int, bytes]:
        addr = self.locate()
        return addr, self.process.space.read(addr, self.size)


def resolve(session: Session, spec: str, *, pid: int = 0, view: str | None = None) -> Target:
    """A watch target from its text: a field path, a symbol, or an address expression."""
    from vmishell.frontends.expr import evaluate_all

    profile = session.profile
    process = session.process(pid)
    m = _FIELD.match(spec)
    if m and (_is_struct(profile, m["base"]) or profile.has_symbol(m["base"])):
        return _field_target(session, process, spec, m["base"], m["path"], view)
    if re.fullmatch(r"[A-Za-z_]\w*", spec) and profile.has_symbol(spec):
        ref = profile.symbol_type(spec)
        if ref is not None and view is None:
            return _typed(spec, process, session.symbol(spec), (0,), profile, ref)
    values = evaluate_all(spec, session.symbol, limit=1)
    if len(values) != 1:
        raise WatchTargetError(f"watch target {spec!r}: one address, field or symbol")
    view = view or "u64"
    return Target(spec, process, values[0], (0,), *_view(profile, view))


def _is_struct(profile: Profile, name: str) -> bool:
    try:
        return profile.type_ref(name).kind in ("struct", "union")
    except SymbolNotFound:
        return False


def _field_target(
    session: Session, process: Process, spec: str, base_name: str, path: str, view: str | None
) -> Target:
    profile = session.profile
    if _is_struct(profile, base_name):
        if base_name not in _PROCESS_BASES or process.task is None:
            raise WatchTargetError(
                f"{spec}: {base_name} needs an instance; watch a process's task_struct or "
                "mm_struct (-p PID), or a kernel symbol's fields"
            )
        task = process.task
        base = task.address if base_name == "task_struct" else task.mm
        ref = profile.type_ref(base_name)
    else:
        base = session.symbol(base_name)
        found = profile.symbol_type(base_name)
        if found is None:
            raise WatchTargetError(f"{spec}: the profile gives no type for symbol {base_name}")
        ref = found
    hops = [0]
    # ".a.b->c.d": segments between "->" hops; the first belongs to the base itself.
    segments = path.split("->")
    for i, segment in enumerate(segments):
        if i:  # follow the pointer the previous segment ended on
            if ref.kind != "pointer" or ref.subtype is None:
                raise WatchTargetError(f"{spec}: {ref} is not a pointer to follow with ->")
            ref = ref.subtype
            hops.append(0)
            segment = "." + segment
        if not segment:
            continue
        if not segment.startswith("."):
            raise WatchTargetError(f"{spec}: expected .field or ->field at {segment!r}")
        if ref.kind not in ("struct", "union") or ref.name is None:
            raise WatchTargetError(f"{spec}: {ref} has no fields")
        try:
            field = profile.field(ref.name, segment[1:])
        except SymbolNotFound as exc:
            raise WatchTargetError(f"{spec}: {exc}") from None
        hops[-1] += field.offset
        ref = field.type
    if view is not None:
        return Target(spec, process, base, tuple(hops), *_view(profile, view))
    return _typed(spec, process, base, tuple(hops), profile, ref)


def _view(profile: Profile, view: str) -> tuple[int, str, Callable[[bytes], Any]]:
    """(size, type name, decoder) for an `--as` view: u8..f64, str, or a type's size as bytes."""
    number = NUMBER_VIEWS.get(view)
    if number is not None:
        fmt = struct.Struct(number[0])
        return number[1], view, lambda data: fmt.unpack(data)[0]
    if view == "str":
        return 64, "str", _c_string
    try:
        return profile.size_of(view), view, bytes
    except SymbolNotFound:
        raise WatchTargetError(
            f"--as {view}: not u8..u64, i8..i64, f32, f64, str or a type"
        ) from None


def _typed(
    spec: str, process: Process, base: int, hops: tuple[int, ...], profile: Profile, ref: TypeRef
) -> Target:
    size, decode = _decoder(profile, ref)
    return Target(spec, process, base, hops, size, str(ref), decode)


def _decoder(profile: Profile, ref: TypeRef) -> tuple[int, Callable[[bytes], Any]]:
    """Size and decoder of a type: numbers, enums by name, pointers, one-member wrappers
    (kuid_t) unwrapped, char arrays as text, anything else as bytes."""
    size = profile.size_of(ref)
    kind = ref.kind
    if kind == "base" and ref.name:
        width, signed, what = profile.base_type(ref.name)
        if what == "float" and width in (4, 8):
            fmt = struct.Struct("<f" if width == 4 else "<d")
            return width, lambda data: fmt.unpack(data)[0]
        if what == "bool":
            return width, lambda data: bool(int.from_bytes(data, "little"))
        return width, lambda data: int.from_bytes(data, "little", signed=signed)
    if kind == "pointer":
        return size, lambda data: int.from_bytes(data, "little")
    if kind == "enum" and ref.name:
        name = ref.name

        def enum(data: bytes) -> Any:
            value = int.from_bytes(data, "little")
            return profile.enum_name(name, value) or value

        return size, enum
    if kind in ("struct", "union") and ref.name:
        fields = profile.fields(ref.name)
        if len(fields) == 1 and fields[0].offset == 0:
            inner_size, inner = _decoder(profile, fields[0].type)
            return size, lambda data: inner(data[:inner_size])
    sub = ref.subtype
    if kind == "array" and sub is not None and sub.kind == "base" and sub.name in _CHARS:
        return size, _c_string
    return size, bytes


def _c_string(data: bytes) -> str:
    end = data.find(0)
    return (data if end < 0 else data[:end]).decode("utf-8", "backslashreplace")


__all__ = ["Target", "WatchTargetError", "resolve"]
