"""A page walk as a DataFrame that draws itself: one row per level, plus a diagram.

`%translate` returns a `WalkFrame`: a DataFrame (level, table, index,
entry_address, entry, flags, next) that keeps the `Walk` it came from in
`.walk`. In a notebook it renders a small diagram (how the virtual address
splits into table indices and where each entry leads) above the table; in a
terminal the table and the outcome line. Derived frames (filters, slices)
are plain GuestFrames.
"""

from __future__ import annotations

import html
from enum import IntFlag
from typing import Any, ClassVar

from vmishell.arch import Walk
from vmishell.arch.modes import ModeSpec
from vmishell.arch.results import WalkStep
from vmishell.frontends.frames import HEX_KEY, GuestFrame, frame_html, frame_text

WALK_COLUMNS = ["level", "table", "index", "entry_address", "entry", "flags", "next"]
#: AArch64 walks add the descriptor spelled out (kind, AP, attributes, hints).
DETAIL_COLUMN = "descriptor"
_HEX = ["table", "entry_address", "entry", "next"]
#: Flags every shown entry has (x86 PRESENT, arm64 VALID): left out of diagrams.
_IMPLIED = ("PRESENT", "VALID")


def flag_names(flags: IntFlag) -> str:
    """Flag names like PRESENT|WRITABLE|USER (x86) or VALID|PAGE|AF|UXN (arm64) in their
    declared order (empty for a non-present entry)."""
    return "|".join(f.name or "" for f in type(flags) if f and f in flags)


def _shown_flags(flags: IntFlag) -> str:
    shown = (f for f in type(flags) if f and f in flags and f.name not in _IMPLIED)
    return "|".join(f.name or "" for f in shown)


def _row(step: WalkStep) -> tuple[Any, ...]:
    return (
        step.level,
        step.table,
        step.index,
        step.entry_address,
        step.entry,
        flag_names(step.flags),
        step.target if step.present else None,
    )


def _detail(step: WalkStep) -> str:
    return getattr(step, "detail", "") or ""


def outcome(walk: Walk) -> str:
    """The last line of a walk: where the address landed, or why it did not."""
    if walk.translation is not None:
        t = walk.translation
        size = t.page_size
        return f"{walk.vaddr:#x} -> physical {t.paddr:#x} ({t.level} maps a {size:#x}-byte page)"
    return f"{walk.fault}" if walk.fault else f"{walk.vaddr:#x}: no translation"


class WalkFrame(GuestFrame):
    """The page walk of one address; `.walk` is the Walk, `.mode` the paging mode's spec."""

    _metadata: ClassVar[list[str]] = ["walk", "mode"]

    @property
    def _constructor(self) -> type[GuestFrame]:
        return GuestFrame

    @classmethod
    def from_walk(cls, walk: Walk, mode: ModeSpec | Any | None = None) -> WalkFrame:
        """`mode` has the levels (name, shift, bits) the diagram labels: an x86 ModeSpec,
        or the AArch64 half (`HalfSpec`) the address lies in."""
        if any(_detail(s) for s in walk.steps):
            frame = cls(
                [(*_row(s), _detail(s)) for s in walk.steps],
                columns=[*WALK_COLUMNS, DETAIL_COLUMN],
            )
        else:
            frame = cls([_row(s) for s in walk.steps], columns=WALK_COLUMNS)
        frame.attrs[HEX_KEY] = list(_HEX)
        frame.walk = walk
        frame.mode = mode
        return frame

    @property
    def ok(self) -> bool:
        return self.walk.translation is not None

    @property
    def paddr(self) -> int | None:
        return self.walk.translation.paddr if self.walk.translation else None

    def __repr__(self) -> str:
        return f"{frame_text(self)}\n=> {outcome(self.walk)}"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))

    def _repr_html_(self) -> str:
        return walk_html(self.walk, self.mode) + frame_html(self)


_BOX = (
    "display:inline-block;border:1px solid #888;border-radius:4px;padding:2px 6px;"
    "margin:2px;font-family:monospace;font-size:90%;vertical-align:middle"
)
_COLORS = ["#e3f2fd", "#e8f5e9", "#fff3e0", "#f3e5f5", "#fce4ec", "#e0f7fa"]


def _bits(mode: ModeSpec | Any | None, level: str) -> str:
    if mode is None:
        return ""
    for lvl in mode.levels:
        if lvl.name == level:
            return f"bits {lvl.shift + lvl.bits - 1}–{lvl.shift}"
    return ""


def _mode_text(mode: ModeSpec | Any | None) -> str:
    if mode is None:
        return ""
    describe = getattr(mode, "describe", None)
    return describe() if callable(describe) else str(mode.name)


def walk_html(walk: Walk, mode: ModeSpec | Any | None = None) -> str:
    """A diagram: the address split into indices, then table → entry → … → page."""
    esc = html.escape
    parts = []
    for i, step in enumerate(walk.steps):
        color = _COLORS[i % len(_COLORS)]
        parts.append(
            f'<span style="{_BOX};background:{color}" title="{esc(_bits(mode, step.level))}">'
            f"<b>{esc(step.level)}</b>[{step.index}]</span>"
        )
    t = walk.translation
    if t is not None:
        offset = walk.vaddr - t.page.vaddr
        parts.append(f'<span style="{_BOX}">offset {offset:#x}</span>')
    split = " ".join(parts)
    chain = [f'<span style="{_BOX}">table {walk.steps[0].table:#x}</span>'] if walk.steps else []
    for i, step in enumerate(walk.steps):
        color = _COLORS[i % len(_COLORS)]
        if step.present:
            what = f"page {step.target:#x}" if step.leaf else f"table {step.target:#x}"
            flags = esc(_shown_flags(step.flags))
        else:
            what, flags = "not present", ""
        detail = _detail(step)
        if detail:
            flags += f"<br><small>{esc(detail)}</small>"
        chain.append(
            f'<span style="{_BOX};background:{color}"><b>{esc(step.level)}</b> entry '
            f"{step.entry:#x}<br><small>{flags}</small></span> → "
            f'<span style="{_BOX}">{what}</span>'
        )
    if t is not None:
        chain.append(f' → <span style="{_BOX};background:#c8e6c9"><b>{t.paddr:#x}</b></span>')
    elif walk.fault is not None:
        chain.append(f' <span style="color:#b00">✗ {esc(str(walk.fault))}</span>')
    mode_name = f" ({esc(_mode_text(mode))})" if mode is not None else ""
    return (
        '<div class="vmishell-walk" style="margin-bottom:6px">'
        f"<div><b>walk of {walk.vaddr:#x}</b>{mode_name}: {len(walk.steps)} levels</div>"
        f"<div>{split}</div><div>{' '.join(chain)}</div></div>"
    )


__all__ = ["WALK_COLUMNS", "WalkFrame", "flag_names", "outcome", "walk_html"]
