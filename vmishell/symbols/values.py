"""Decoded guest structures: plain values that print well in a terminal and a notebook.

`vmishell.symbols.decode` turns bytes into these. They are ordinary frozen
dataclasses (usable from scripts, comparable in tests), and they carry their
own `_repr_pretty_`/`_repr_html_` so IPython and Jupyter show them without
vmishell's extension. Everything in them came from guest memory, so the text
form shows strings through `repr` (control characters and bidi overrides
escaped) and the HTML form escapes every value.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vmishell.symbols.profile import TypeRef

if TYPE_CHECKING:
    import pandas as pd

#: Array elements shown inline in text and HTML before "… N more".
SHOWN_ELEMENTS = 16


@dataclass(frozen=True, slots=True)
class Pointer:
    """A pointer value: where it points and to what, so it can be followed.

    `str()` is the bare hex address, so IPython's `{...}` expansion in a magic
    line follows it: `%dt mm_struct {task.mm}`.
    """

    address: int
    target: TypeRef
    symbol: str | None = None

    @property
    def target_name(self) -> str:
        """The pointed-to type without its tag ("mm_struct", "char", "void")."""
        t = self.target
        return t.name if t.name else str(t)

    def __int__(self) -> int:
        return self.address

    def __index__(self) -> int:
        return self.address

    def __bool__(self) -> bool:
        return self.address != 0

    def __str__(self) -> str:
        return f"{self.address:#x}"

    def __repr__(self) -> str:
        where = f" <{self.symbol}>" if self.symbol else ""
        return f"({self.target} *) {self.address:#x}{where}"


@dataclass(frozen=True, slots=True)
class EnumValue:
    """An enum value with its constant's name (None when the value has no name)."""

    enum: str
    value: int
    name: str | None

    def __int__(self) -> int:
        return self.value

    def __index__(self) -> int:
        return self.value

    def __str__(self) -> str:
        return self.name or str(self.value)

    def __repr__(self) -> str:
        return f"{self.name} ({self.value})" if self.name else f"{self.value} (enum {self.enum})"


@dataclass(frozen=True, slots=True)
class Array:
    """A fixed-size array; `items` holds at most the decoder's element limit."""

    element: TypeRef
    address: int
    count: int
    items: tuple[Any, ...]

    @property
    def truncated(self) -> bool:
        return len(self.items) < self.count

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]

    def __repr__(self) -> str:
        return _inline(self)


@dataclass(frozen=True, slots=True)
class FieldValue:
    """One decoded member: where it is, its type, and its value or why there is none."""

    name: str
    offset: int
    type: TypeRef
    address: int
    size: int | None
    value: Any
    error: str | None = None


@dataclass(frozen=True)
class Struct:
    """A decoded struct/union instance.

    `expanded` is False when the depth limit stopped the decoder here: the
    struct is named and located but its members are not decoded (decode it
    again at `address`). `notes` says what a limit cut short.
    """

    type_name: str
    kind: str
    address: int
    size: int
    fields: tuple[FieldValue, ...] = ()
    expanded: bool = True
    notes: tuple[str, ...] = ()
    _by_name: dict[str, FieldValue] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_name.update((f.name, f) for f in self.fields)

    # -- access ---------------------------------------------------------------
    def field(self, name: str) -> FieldValue:
        """A member by name, or by a path through nested structs and arrays ("se.load")."""
        head, _, rest = name.partition(".")
        member = self._by_name.get(head)
        if member is None:
            raise KeyError(f"{self.kind} {self.type_name} has no decoded member {head!r}")
        if not rest:
            return member
        inner = member.value
        if not isinstance(inner, Struct):
            raise KeyError(f"{self.type_name}.{head} is not a decoded struct")
        return inner.field(rest)

    def __getitem__(self, name: str) -> Any:
        return self.field(name).value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self.field(name).value
        except KeyError as exc:
            raise AttributeError(str(exc)) from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def keys(self) -> list[str]:
        return [f.name for f in self.fields]

    def __dir__(self) -> list[str]:
        return [*super().__dir__(), *self._by_name]

    def to_dict(self) -> dict[str, Any]:
        """Members as a nested dict (structs become dicts, arrays lists)."""
        return {f.name: _plain(f.value) for f in self.fields}

    def frame(self) -> pd.DataFrame:
        """One row per member: offset, name, type, size, value (text), error."""
        import pandas as pd

        rows = [
            (f.offset, f.name, type_text(f.type), f.size, _inline(f.value), f.error)
            for f in self.fields
        ]
        return pd.DataFrame(rows, columns=["offset", "name", "type", "size", "value", "error"])

    # -- display --------------------------------------------------------------
    def header(self) -> str:
        name = "{…}" if _ANONYMOUS.fullmatch(f"{self.kind} {self.type_name}") else self.type_name
        return f"{self.kind} {name} @ {self.address:#x} ({self.size} bytes)"

    def to_text(self, indent: int = 0) -> str:
        """An indented member tree, one member per line; guest strings via repr."""
        lines: list[str] = []
        _text_lines(self, indent, lines)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<{self.header()}{'' if self.expanded else ', not expanded'}>"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.to_text())

    def _repr_html_(self) -> str:
        return _struct_html(self, top=True)


# -- rendering ------------------------------------------------------------------------

#: ISF names anonymous structs and unions `unnamed_<16 hex>` (a hash of the layout).
_ANONYMOUS = re.compile(r"\b(struct|union) unnamed_[0-9a-f]{16}\b")


def type_text(type_: Any) -> str:
    """A member's type as pahole and drgn show it: an anonymous one as `struct {…}`.

    Its members are listed under it, so the hashed name would tell nothing.
    """
    return _ANONYMOUS.sub(lambda m: f"{m.group(1)} {{…}}", str(type_))


def _plain(value: Any) -> Any:
    if isinstance(value, Struct):
        return value.to_dict() if value.expanded else {"address": value.address}
    if isinstance(value, Array):
        return [_plain(v) for v in value.items]
    return value


def _inline(value: Any) -> str:
    """A one-line form of a value; strings through repr so control bytes show escaped."""
    if isinstance(value, Struct):
        return "{…}" if value.expanded else f"{{…}} @ {value.address:#x}"
    if isinstance(value, Array):
        shown = ", ".join(_inline(v) for v in value.items[:SHOWN_ELEMENTS])
        more = value.count - min(len(value.items), SHOWN_ELEMENTS)
        return f"[{shown}{f', … {more} more' if more else ''}]"
    if isinstance(value, Pointer):
        return f"{value.address:#x} <{value.symbol}>" if value.symbol else f"{value.address:#x}"
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return f"{value:#x}" if abs(value) >= 0x10000 else str(value)
    if isinstance(value, (str, bytes)):
        return repr(value)
    return repr(value)


def _text_lines(s: Struct, indent: int, lines: list[str]) -> None:
    pad = "  " * indent
    if indent == 0:
        lines.append(s.header())
    width = min(24, max((len(f.name) for f in s.fields), default=0))
    twidth = min(28, max((len(type_text(f.type)) for f in s.fields), default=0))
    for f in s.fields:
        shown = f"<error: {f.error}>" if f.error else _inline(f.value)
        kind = type_text(f.type)
        lines.append(f"{pad}  +{f.offset:#05x} {f.name:<{width}} {kind:<{twidth}} {shown}")
        if isinstance(f.value, Struct) and f.value.expanded and f.value.fields:
            _text_lines(f.value, indent + 1, lines)
    for note in s.notes:
        lines.append(f"{pad}  ({note})")


def _struct_html(s: Struct, top: bool = False) -> str:
    esc = html.escape
    rows = []
    for f in s.fields:
        if f.error:
            shown = f'<span style="color:#b00">{esc(f.error)}</span>'
        elif isinstance(f.value, Struct) and f.value.expanded and f.value.fields:
            shown = f"<details><summary>{{…}}</summary>{_struct_html(f.value)}</details>"
        else:
            shown = f"<code>{esc(_inline(f.value))}</code>"
        rows.append(
            f"<tr><td style='text-align:right'><code>+{f.offset:#x}</code></td>"
            f"<td><code>{esc(f.name)}</code></td><td><code>{esc(type_text(f.type))}</code></td>"
            f"<td style='text-align:left'>{shown}</td></tr>"
        )
    notes = "".join(f"<div><i>{esc(n)}</i></div>" for n in s.notes)
    head = f"<div><b>{esc(s.header())}</b></div>" if top else ""
    return (
        f"<div class='vmishell-struct'>{head}<table>"
        "<thead><tr><th>offset</th><th>name</th><th>type</th><th>value</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>{notes}</div>"
    )


__all__ = ["SHOWN_ELEMENTS", "Array", "EnumValue", "FieldValue", "Pointer", "Struct"]
