"""Kernel symbol tables: the shared `SymbolTable` and the System.map parser.

A profile needs link-time addresses of kernel symbols. They come from a
System.map (exact, but Debian's kernel package ships only a stub; the real
one is in the -dbg package) or from the kallsyms tables inside the image
(`vmishell.symbols.kallsyms`). Both end up as a `SymbolTable`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from vmishell.errors import ProfileError

#: Data symbols a profile cannot do without (vmishell walks the task list from there).
ESSENTIAL_DATA_SYMBOLS = ("init_task", "init_mm", "linux_banner")

_LINE = re.compile(rb"^([0-9a-fA-F]+)\s+(\S)\s+(\S+)")


class Symbol(NamedTuple):
    name: str
    type: str
    address: int


class SymbolTable:
    """Symbols in table order, plus one address per name for lookups.

    Names can repeat (static functions in different files). The lookup keeps a
    global (upper-case type) definition over a local one, else the first seen,
    so `init_task` never resolves to an unrelated static of the same name.
    """

    def __init__(self, symbols: Iterable[Symbol], source: str = "") -> None:
        self.symbols: list[Symbol] = list(symbols)
        self.source = source
        self.addresses: dict[str, int] = {}
        self.types: dict[str, str] = {}
        addresses, types = self.addresses, self.types
        for name, typ, addr in self.symbols:
            old = types.get(name)
            if old is None or (old.islower() and typ.isupper()):
                addresses[name] = addr
                types[name] = typ

    def __len__(self) -> int:
        return len(self.symbols)

    def __contains__(self, name: object) -> bool:
        return name in self.addresses

    def __getitem__(self, name: str) -> int:
        return self.addresses[name]

    def __iter__(self) -> Iterator[Symbol]:
        return iter(self.symbols)

    def get(self, name: str, default: int | None = None) -> int | None:
        return self.addresses.get(name, default)

    def missing(self, names: Iterable[str] = ESSENTIAL_DATA_SYMBOLS) -> list[str]:
        """Which of `names` the table lacks (data symbols vanish without KALLSYMS_ALL)."""
        return [n for n in names if n not in self.addresses]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {len(self)} symbols from {self.source or '?'}>"


def is_stub(text: bytes | str) -> bool:
    """Whether this is Debian's 83-byte placeholder System.map.

    It holds one line, "ffffffffffffffff B The real System.map is in the
    linux-image-<version>-dbg package".
    """
    if isinstance(text, str):
        text = text.encode("utf-8", "replace")
    return len(text) < 200 and b"real System.map" in text


def parse_system_map(text: bytes | str, source: str = "System.map") -> SymbolTable:
    """Parse `address type name` lines; reject the Debian stub and files with no symbols."""
    if isinstance(text, str):
        text = text.encode("utf-8", "replace")
    if is_stub(text):
        raise ProfileError(
            f"{source} is Debian's placeholder, not a symbol map: the real System.map is in "
            "the linux-image-<version>-dbg package (/usr/lib/debug/boot/System.map-*)"
        )
    symbols = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            symbols.append(
                Symbol(m.group(3).decode("utf-8", "replace"), chr(m.group(2)[0]),
                       int(m.group(1), 16))
            )  # fmt: skip
    if not symbols:
        raise ProfileError(f"{source} holds no `address type name` lines: not a System.map")
    return SymbolTable(symbols, source)


def load_system_map(path: Path) -> SymbolTable:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ProfileError(f"cannot read System.map {path}: {exc.strerror}") from exc
    return parse_system_map(data, str(path))
