"""Type names as a C programmer reads them: anonymous structs inline, not hashed names.

ISF profiles keep no typedef names, and name each anonymous struct or union
`unnamed_<16 hex>` (a hash of its layout). `%dt mm_struct` would then say
`struct unnamed_dbdd48c03bf27356 mm_users`, where pahole and drgn show the
anonymous type itself: `struct {int counter;}` (what `atomic_t` is). This
spells such types out inline, shortened past a readable width.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from vmishell.errors import VmiError

if TYPE_CHECKING:
    from vmishell.symbols.profile import Profile

ANONYMOUS = re.compile(r"\b(struct|union) (unnamed_[0-9a-f]{16})\b")
#: Longest inline spelling of one anonymous type before it is cut with "…".
WIDTH = 72
#: Anonymous types nested inside an inline one that are spelled out too.
DEPTH = 2


def is_anonymous(type_text: str) -> bool:
    return ANONYMOUS.search(type_text) is not None


def inline_type(profile: Profile, type_text: str, *, width: int = WIDTH) -> str:
    """`type_text` with every hashed anonymous struct/union spelled out as `struct {…}`."""
    return _inline(profile, type_text, width, DEPTH)


def _inline(profile: Profile, type_text: str, width: int, depth: int) -> str:
    def spell(match: re.Match[str]) -> str:
        kind, name = match.group(1), match.group(2)
        if depth <= 0:
            return f"{kind} {{…}}"
        try:
            fields = profile.fields(name)
        except VmiError:
            return f"{kind} {{…}}"
        members: list[str] = []
        for f in fields:
            member = f"{_inline(profile, str(f.type), width, depth - 1)} {f.name};"
            if members and sum(len(m) + 1 for m in members) + len(member) > width:
                members.append("…")  # whole members only; the rest is one ellipsis
                break
            members.append(member)
        return f"{kind} {{{' '.join(members)}}}"

    return ANONYMOUS.sub(spell, type_text)


__all__ = ["inline_type", "is_anonymous"]
