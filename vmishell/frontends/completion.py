"""Tab completion for the magics: lab guest names, targets, pids, kernel symbols, types.

Registered as an IPython (Matcher API v2) custom matcher, so it works in the
terminal and in Jupyter alike. It looks at the line up to the cursor, finds
which vmishell magic and which argument is being typed, and completes from
the current target: `-p` takes pids (cached for a few seconds, a process
walk is not free), addresses take kernel symbols (after any `+`, `(`, …),
`%dt` and `--as` take type names. Anything else is left to IPython's own
matchers (file names for `%attach IMAGE`, Python names elsewhere).
"""

from __future__ import annotations

import bisect
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vmishell.errors import VmiError

if TYPE_CHECKING:
    from vmishell.frontends.targets import Targets

MAGICS = ("attach", "detach", "use", "targets", "ps", "peek", "translate", "maps", "dt", "watch")
#: Options that take a value, per magic (the value is not a positional argument).
VALUE_OPTIONS = {
    "-p", "--pid", "--as", "-t", "--target", "--name", "--profile", "--every", "--count",
    "--depth", "-n", "--comm",
}  # fmt: skip
TYPED_VIEWS = ("u8", "u16", "u32", "u64", "i8", "i16", "i32", "i64", "f32", "f64", "str")
#: Magics whose n-th positional argument is an address expression.
ADDRESS_POSITIONS = {"peek": (0, 1), "translate": (0,), "watch": (0, 1), "dt": (1,)}
STRUCT_TAGS = ("struct", "union", "enum", "class")
MAX_RESULTS = 500
PID_CACHE_SECONDS = 5.0

_LINE = re.compile(r"(?:^|[=;(]\s*)%(?P<magic>[A-Za-z_]\w*)(?P<rest>(?:\s.*)?)$")
_IDENT_TAIL = re.compile(r"[A-Za-z_$][\w.$]*$")


@dataclass(frozen=True, slots=True)
class Suggestion:
    """What to complete: the text fragment being replaced and its candidates."""

    fragment: str
    candidates: list[str]
    exclusive: bool = True  # suppress IPython's other matchers


def _prefixed(sorted_names: list[str], prefix: str, limit: int = MAX_RESULTS) -> list[str]:
    i = bisect.bisect_left(sorted_names, prefix)
    out: list[str] = []
    while i < len(sorted_names) and sorted_names[i].startswith(prefix) and len(out) < limit:
        out.append(sorted_names[i])
        i += 1
    return out


def _running_lab_guests() -> list[str]:
    from vmishell.lab.runner import list_guests

    try:
        return sorted(st.name for st in list_guests() if st.state in ("running", "paused"))
    except VmiError:
        return []


class MagicCompleter:
    """Completion candidates for a magic line; holds per-profile name caches."""

    def __init__(
        self,
        targets: Targets,
        *,
        lab_guests: Callable[[], list[str]] = _running_lab_guests,
        clock: Callable[[], float] = time.monotonic,
        options: dict[str, list[str]] | None = None,
    ) -> None:
        self.targets = targets
        self.options = options or {}
        self.lab_guests = lab_guests
        self.clock = clock
        self._names: dict[tuple[int, str], list[str]] = {}
        self._pids: tuple[int, float, list[str]] | None = None
        self._guests: tuple[float, list[str]] | None = None

    # -- sources of names ---------------------------------------------------------
    def _session(self, name: str | None = None) -> Any:
        try:
            return self.targets.get(name).session
        except VmiError:
            return None

    def _sorted(self, session: Any, what: str) -> list[str]:
        key = (id(session.profile), what)
        if key not in self._names:
            names = (
                session.profile.symbol_names()
                if what == "symbols"
                else session.profile.type_names()
            )
            self._names[key] = sorted(set(names))
        return self._names[key]

    def pids(self, session: Any) -> list[str]:
        now = self.clock()
        if self._pids and self._pids[0] == id(session) and now - self._pids[1] < PID_CACHE_SECONDS:
            return self._pids[2]
        try:
            df = session.processes(threads=True, cmdline=False)
            pids = [str(p) for p in sorted(df["pid"].tolist())]
        except VmiError:
            pids = []
        self._pids = (id(session), now, pids)
        return pids

    def guests(self) -> list[str]:
        """Running lab instances (cached briefly: listing asks each QEMU for its state)."""
        now = self.clock()
        if self._guests is None or now - self._guests[0] >= PID_CACHE_SECONDS:
            self._guests = (now, self.lab_guests())
        return self._guests[1]

    # -- the decision ---------------------------------------------------------------
    def suggest(self, line: str) -> Suggestion | None:
        """Candidates for `line` (the text up to the cursor), or None to stay out."""
        m = _LINE.search(line)
        if m is None or m["magic"] not in MAGICS:
            return None
        magic, rest = m["magic"], m["rest"]
        words = rest.split()
        if rest and not rest[-1].isspace() and words:
            word, before = words[-1], words[:-1]
        elif not rest:
            return None  # still typing the magic's name
        else:
            word, before = "", words
        target_opt = _option_value(before, ("-t", "--target"))
        prev = before[-1] if before else None
        if prev in ("-p", "--pid"):
            session = self._session(target_opt)
            if session is None:
                return None
            return Suggestion(word, [p for p in self.pids(session) if p.startswith(word)])
        if prev in ("-t", "--target"):
            return Suggestion(word, [n for n in self.targets.names() if n.startswith(word)])
        if prev == "--as":
            session = self._session(target_opt)
            names = [t for t in TYPED_VIEWS if t.startswith(word)]
            if session is not None and word:
                names += _prefixed(self._sorted(session, "types"), word)
            return Suggestion(word, names)
        if word.startswith("-") and not word[1:2].isdigit():
            found = [o for o in self.options.get(magic, ()) if o.startswith(word)]
            return Suggestion(word, found) if found else None
        if prev in VALUE_OPTIONS:
            return None
        position = _positional_count(before)
        if magic == "dt" and position > 1 and _positionals(before)[0] in STRUCT_TAGS:
            position -= 1  # "struct task_struct" is one type
        if magic in ("use", "detach") and position == 0:
            return Suggestion(word, [n for n in self.targets.names() if n.startswith(word)])
        if magic == "attach" and position == 0:
            names = self.guests()
            if word.startswith("lab:"):
                found = [f"lab:{n}" for n in names if f"lab:{n}".startswith(word)]
            else:
                found = [n for n in names if n.startswith(word)]
            return Suggestion(word, found, exclusive=False)  # image paths come from IPython
        if magic == "dt" and position == 0:
            session = self._session(target_opt)
            if session is None or not word:
                return None
            return Suggestion(word, _prefixed(self._sorted(session, "types"), word))
        if position in ADDRESS_POSITIONS.get(magic, ()):
            session = self._session(target_opt)
            tail = _IDENT_TAIL.search(word)
            if session is None or tail is None:
                return None
            if tail.start() > 0 and word[tail.start() - 1].isalnum():
                return None  # the tail of a number such as 0x12ab
            fragment = tail.group(0)
            return Suggestion(fragment, _prefixed(self._sorted(session, "symbols"), fragment))
        return None


def _option_value(words: list[str], names: tuple[str, ...]) -> str | None:
    for i, w in enumerate(words[:-1]):
        if w in names:
            return words[i + 1]
    return None


def _positionals(words: list[str]) -> list[str]:
    out, skip = [], False
    for w in words:
        if skip:
            skip = False
        elif w in VALUE_OPTIONS:
            skip = True
        elif not w.startswith("-") or w[1:2].isdigit():
            out.append(w)
    return out


def _positional_count(words: list[str]) -> int:
    return len(_positionals(words))


def make_matcher(completer: MagicCompleter) -> Callable[[Any], dict[str, Any]]:
    """An IPython Matcher API v2 function over `completer`."""
    from IPython.core.completer import SimpleCompletion, completion_matcher

    @completion_matcher(api_version=2, identifier="vmishell.magics", priority=100)
    def vmishell_matcher(context: Any) -> dict[str, Any]:
        try:
            suggestion = completer.suggest(context.text_until_cursor)
        except Exception:  # completion must never raise into the shell
            suggestion = None
        if suggestion is None:
            return {"completions": [], "suppress": False}
        return {
            "completions": [SimpleCompletion(c, type="vmishell") for c in suggestion.candidates],
            "matched_fragment": suggestion.fragment,
            "suppress": suggestion.exclusive and bool(suggestion.candidates),
            "ordered": True,
        }

    return vmishell_matcher


__all__ = ["MagicCompleter", "Suggestion", "make_matcher"]
