"""Guest bytes that show themselves as a hex dump: HTML in notebooks, text in terminals.

`%peek` returns a `Memory`, a `bytes` subclass: assigned, it is just the
bytes (slicing, `struct.unpack`, `==` all work); left as a cell's value, it
renders as a hex + ASCII view. `read_window` reads a range page by page so
that one unmapped page shows as `??` instead of failing the whole view (the
hex viewer and %watch use it).
"""

from __future__ import annotations

import html
from collections.abc import Collection
from typing import Any, Protocol

from vmishell.errors import StaleObjectError, TargetGone, VmiError
from vmishell.frontends.text import hexdump

PAGE = 0x1000
WIDTH = 16
#: Most bytes one HTML/text view renders; bigger reads are still returned whole.
MAX_SHOWN = 64 * 1024


class Reader(Protocol):
    def read(self, vaddr: int, size: int) -> bytes: ...


#: Errors after which nothing of the target can be read: never folded into "unreadable".
LIFECYCLE_ERRORS = (TargetGone, StaleObjectError)


def read_window(reader: Reader, address: int, length: int) -> tuple[bytes, bytes]:
    """(data, readable) for [address, address+length): readable[i] is 1 where byte i was read.

    Unreadable bytes are zero in `data`. Raises the first VmiError when
    nothing at all could be read, so a bad address is still a clear error.
    """
    data = bytearray(length)
    ok = bytearray(length)
    first_error: VmiError | None = None
    pos = 0
    while pos < length:
        chunk = min(length - pos, PAGE - ((address + pos) & (PAGE - 1)))
        try:
            got = reader.read(address + pos, chunk)
        except LIFECYCLE_ERRORS:
            raise  # the target ended or rebooted: no byte of it is readable any more
        except VmiError as exc:
            first_error = first_error or exc
        else:
            data[pos : pos + len(got)] = got[:chunk]
            ok[pos : pos + min(len(got), chunk)] = b"\x01" * min(len(got), chunk)
        pos += chunk
    if length and first_error is not None and not any(ok):
        raise first_error
    return bytes(data), bytes(ok)


def _digits(address: int, length: int) -> int:
    return 16 if address + length > 0xFFFFFFFF else 8


def hex_html(
    data: bytes,
    address: int,
    *,
    readable: bytes | None = None,
    changed: Collection[int] = (),
    width: int = WIDTH,
) -> str:
    """An escaped HTML hex view; `changed` offsets are highlighted, unreadable bytes are ??."""
    shown = data[:MAX_SHOWN]
    digits = _digits(address, len(shown))
    lines = []
    for off in range(0, len(shown), width):
        cells = []
        chars = []
        for i in range(off, min(off + width, len(shown))):
            b = shown[i]
            if readable is not None and not readable[i]:
                cells.append('<span style="color:#999">??</span>')
                chars.append('<span style="color:#999">?</span>')
                continue
            ch = html.escape(chr(b)) if 0x20 <= b < 0x7F else "."
            if i in changed:
                style = "background:#ffd54f;font-weight:bold"
                cells.append(f'<span class="changed" style="{style}">{b:02x}</span>')
                chars.append(f'<span class="changed" style="{style}">{ch}</span>')
            else:
                cells.append(f"{b:02x}")
                chars.append(ch)
        pad = "   " * (width - len(cells))
        lines.append(
            f'<span style="color:#888">{address + off:0{digits}x}</span>  '
            f"{' '.join(cells)}{pad}  |{''.join(chars)}|"
        )
    more = ""
    if len(data) > len(shown):
        more = f"\n… {len(data) - len(shown)} more bytes (the value holds them all)"
    return (
        '<pre class="vmishell-hex" style="font-family:monospace;line-height:1.25">'
        + "\n".join(lines)
        + html.escape(more)
        + "</pre>"
    )


def hex_text(
    data: bytes,
    address: int,
    *,
    readable: bytes | None = None,
    changed: Collection[int] = (),
    color: bool = False,
    width: int = WIDTH,
) -> str:
    """A terminal hex dump; with `color`, changed bytes are shown in bold yellow."""
    shown = data[:MAX_SHOWN]
    if readable is None and not (color and changed):
        text = hexdump(shown, address, width)
    else:
        digits = _digits(address, len(shown))
        lines = []
        for off in range(0, len(shown), width):
            cells, chars = [], []
            for i in range(off, min(off + width, len(shown))):
                b = shown[i]
                if readable is not None and not readable[i]:
                    cells.append("??")
                    chars.append("?")
                    continue
                cell, ch = f"{b:02x}", chr(b) if 0x20 <= b < 0x7F else "."
                if color and i in changed:
                    cell, ch = f"\x1b[1;33m{cell}\x1b[0m", f"\x1b[1;33m{ch}\x1b[0m"
                cells.append(cell)
                chars.append(ch)
            pad = "   " * (width - len(cells))
            lines.append(f"{address + off:0{digits}x}  {' '.join(cells)}{pad}  |{''.join(chars)}|")
        text = "\n".join(lines)
    if len(data) > len(shown):
        text += f"\n… {len(data) - len(shown)} more bytes (the value holds them all)"
    return text


class Memory(bytes):
    """Bytes read from guest virtual memory at `address` (of process `pid`)."""

    address: int
    pid: int | None
    readable: bytes | None

    def __new__(
        cls, data: bytes, address: int, pid: int | None = None, readable: bytes | None = None
    ) -> Memory:
        obj = super().__new__(cls, data)
        obj.address = address
        obj.pid = pid
        obj.readable = readable if readable is not None and not all(readable) else None
        return obj

    @property
    def end(self) -> int:
        return self.address + len(self)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(hex_text(bytes(self), self.address, readable=self.readable))

    def _repr_html_(self) -> str:
        return hex_html(bytes(self), self.address, readable=self.readable)


__all__ = ["Memory", "hex_html", "hex_text", "read_window"]
