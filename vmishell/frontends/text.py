"""Plain-text renderings for terminals: hex dumps, walk tables, and escaping.

Guest bytes and strings may hold terminal escape sequences; everything shown
here passes through `safe_text`, which makes control characters visible.
"""

from __future__ import annotations

import re
from enum import IntFlag

from vmishell.arch import Walk

# C0 and C1 controls (ESC, CSI, OSC, BEL, ...) but tab and newline, DEL, line and
# paragraph separators, bidi embeddings/overrides/isolates and marks, and the
# invisible zero-width characters that make one name look like another.
_INVISIBLE = "\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u2069\ufeff"
_CONTROL = re.compile(f"[\\x00-\\x08\\x0b-\\x1f\\x7f-\\x9f{_INVISIBLE}]")
#: The same plus tab, newline and carriage return: for one cell of a table.
_CELL_CONTROL = re.compile(f"[\\x00-\\x1f\\x7f-\\x9f{_INVISIBLE}]")


def _escape(match: re.Match[str]) -> str:
    return match.group(0).encode("unicode_escape").decode("ascii")


def safe_text(text: str) -> str:
    """Text with every control character (ESC, CSI, bidi overrides) shown as an escape.

    Tabs and newlines are kept: this is for whole renderings (a table, a dump).
    A single guest string inside a row goes through `safe_cell` instead.
    """
    return _CONTROL.sub(_escape, text)


def safe_cell(text: str) -> str:
    """One guest string for one table cell: `safe_text`, and tabs and newlines escaped too,
    so a process named "x\\n  1 root init" cannot print a row of its own."""
    return _CELL_CONTROL.sub(_escape, text)


def hexdump(data: bytes, address: int = 0, width: int = 16) -> str:
    """Classic hex and ASCII dump; non-printable bytes show as '.'."""
    lines = []
    digits = 16 if address + len(data) > 0xFFFFFFFF else 8
    for off in range(0, len(data), width):
        chunk = data[off : off + width]
        hexes = " ".join(f"{b:02x}" for b in chunk).ljust(width * 3 - 1)
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        lines.append(f"{address + off:0{digits}x}  {hexes}  |{text}|")
    return "\n".join(lines)


def walk_table(walk: Walk) -> str:
    """A page walk as aligned text: one line per level, then the outcome."""
    lines = [f"{'level':<6} {'table':>18} {'index':>5} {'entry address':>18} {'entry':>18}  flags"]
    for step in walk.steps:
        detail = getattr(step, "detail", "")
        lines.append(
            f"{step.level:<6} {step.table:#18x} {step.index:5d} {step.entry_address:#18x} "
            f"{step.entry:#18x}  {flag_names(step.flags) if step.present else 'not present'}"
            + (f"  ({detail})" if detail else "")
        )
    if walk.translation is not None:
        t = walk.translation
        lines.append(f"=> {walk.vaddr:#x} -> physical {t.paddr:#x} ({t.page_size:#x} page)")
    else:
        lines.append(f"=> {walk.fault}")
    return "\n".join(lines)


def flag_names(flags: IntFlag) -> str:
    """Entry flags as `WRITABLE|USER|ACCESSED` (x86) or `PAGE|AF|UXN` (arm64); PRESENT and
    VALID are implied by being shown."""
    return "|".join(
        f.name or "" for f in type(flags) if f and f in flags and f.name not in ("PRESENT", "VALID")
    )
