"""What a search looks for: bytes, text, hex with wildcards, a regular expression or YARA rules.

Every kind compiles once per search into a `Matcher` that finds its matches
in one buffer and says how long a match can be (`span`), which is how much
the scanner must overlap buffers so that a match across a page or run
boundary is still found. Regular expressions and YARA rules have no fixed
length: their `span` is the caller's `overlap`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from vmishell.errors import VmiError

#: Overlap across run boundaries for patterns without a fixed length.
DEFAULT_OVERLAP = 256
_HEX_TOKEN = re.compile(r"\?\?|[0-9a-fA-F?]{2}")


class PatternError(VmiError):
    """A search pattern is malformed (bad hex, bad regex, YARA rules that do not compile)."""


class Matcher(Protocol):
    """A compiled pattern: its matches in a buffer, as (start, end, rule)."""

    #: What the result's `pattern` column says.
    name: str
    #: Longest match, so the overlap needed to find matches across boundaries.
    span: int

    #: Whether matches never overlap a separator-free join of windows wrongly: true for
    #: literals (every occurrence is found, overlapping ones too), so seam windows can be
    #: scanned as one buffer.
    batchable: bool

    def finditer(
        self, data: Buffer, start: int = 0, end: int | None = None
    ) -> Iterator[tuple[int, int, str]]: ...


#: What matchers scan: bytes, or a memoryview over guest RAM (no copy).
Buffer = bytes | memoryview


class BytesMatcher:
    """A literal byte string; overlapping occurrences are all found.

    Searched with a compiled literal regex because `re` scans a memoryview
    of guest RAM in place (bytes.find would need a copy first) and is as fast.
    """

    batchable = True

    def __init__(self, needle: bytes, name: str) -> None:
        self.needle = needle
        self.name = name
        self.span = len(needle)
        self._search = re.compile(re.escape(needle)).search

    def finditer(
        self, data: Buffer, start: int = 0, end: int | None = None
    ) -> Iterator[tuple[int, int, str]]:
        search, size, name = self._search, self.span, self.name
        stop = len(data) if end is None else end
        m = search(data, start, stop)
        while m is not None:
            i = m.start()
            yield i, i + size, name
            m = search(data, i + 1, stop)


@dataclass(frozen=True)
class RegexMatcher:
    """A compiled bytes regular expression (DOTALL: a byte is a byte)."""

    regex: re.Pattern[bytes]
    name: str
    span: int
    batchable = False

    def finditer(
        self, data: Buffer, start: int = 0, end: int | None = None
    ) -> Iterator[tuple[int, int, str]]:
        stop = len(data) if end is None else end
        for m in self.regex.finditer(data, start, stop):
            if m.end() > m.start():
                yield m.start(), m.end(), self.name


class YaraMatcher:
    """YARA rules, compiled once (YARA-X, else yara-python); one hit per string match."""

    batchable = True  # string matches are reported wherever they are, overlapping too

    def __init__(self, source: str, span: int) -> None:
        self.span = span
        self.name = "yara"
        self._scan = _compile_yara(source)

    def finditer(
        self, data: Buffer, start: int = 0, end: int | None = None
    ) -> Iterator[tuple[int, int, str]]:
        stop = len(data) if end is None else end
        chunk = bytes(data[start:stop])
        for s, e, rule in sorted(self._scan(chunk)):
            yield s + start, e + start, rule


def _compile_yara(source: str) -> Any:
    """A function data -> [(start, end, "rule:$string")], from whichever binding is present."""
    try:
        import yara_x
    except ImportError:
        yara_x = None
    if yara_x is not None:
        try:
            rules = yara_x.compile(source)
        except yara_x.CompileError as exc:
            raise PatternError(f"YARA rules do not compile: {_one_line(str(exc))}") from None

        def scan_x(data: bytes) -> list[tuple[int, int, str]]:
            out = []
            for rule in rules.scan(data).matching_rules:
                for pat in rule.patterns:
                    for m in pat.matches:
                        out.append(
                            (m.offset, m.offset + m.length, f"{rule.identifier}:{pat.identifier}")
                        )
            return out

        return scan_x
    try:
        import yara
    except ImportError:
        raise PatternError(
            "YARA search needs yara-x or yara-python: pip install 'vmishell[yara]'"
        ) from None
    try:
        compiled = yara.compile(source=source)
    except yara.Error as exc:
        raise PatternError(f"YARA rules do not compile: {_one_line(str(exc))}") from None

    def scan_py(data: bytes) -> list[tuple[int, int, str]]:
        out = []
        for match in compiled.match(data=data):
            for string in match.strings:
                for inst in string.instances:
                    start = inst.offset
                    out.append(
                        (start, start + inst.matched_length, f"{match.rule}:{string.identifier}")
                    )
        return out

    return scan_py


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def hex_regex(text: str) -> tuple[bytes, int]:
    """A hex pattern ("de ad ?? b? ef") as a regex source and its length in bytes."""
    compact = re.sub(r"\s+", "", text)
    if not compact or len(compact) % 2:
        raise PatternError(f"hex pattern {text!r}: need whole bytes (two hex digits or ??)")
    parts = []
    for i in range(0, len(compact), 2):
        token = compact[i : i + 2]
        if not _HEX_TOKEN.fullmatch(token):
            raise PatternError(f"hex pattern {text!r}: {token!r} is not a byte, ?? or a nibble?")
        if token == "??":
            parts.append(b".")
        elif "?" in token:
            hi, lo = token
            values = [
                int(f"{h}{lo_}", 16)
                for h in ("0123456789abcdef" if hi == "?" else hi)
                for lo_ in ("0123456789abcdef" if lo == "?" else lo)
            ]
            parts.append(b"[" + b"".join(re.escape(bytes([v])) for v in values) + b"]")
        else:
            parts.append(re.escape(bytes.fromhex(token)))
    return b"".join(parts), len(compact) // 2


def compile_pattern(
    pattern: bytes | str | re.Pattern[bytes],
    *,
    kind: str | None = None,
    encoding: str = "utf-8",
    overlap: int = DEFAULT_OVERLAP,
) -> Matcher:
    """One matcher for a pattern of `kind` "bytes", "text", "hex", "regex" or "yara".

    Without `kind`: bytes are bytes, a compiled bytes regex is a regex, and a
    string is text in `encoding`.
    """
    if overlap < 1:
        raise PatternError(f"overlap must be positive, not {overlap}")
    if kind is None:
        if isinstance(pattern, re.Pattern):
            kind = "regex"
        elif isinstance(pattern, bytes | bytearray):
            kind = "bytes"
        else:
            kind = "text"
    if kind == "bytes":
        data = bytes(pattern) if isinstance(pattern, bytes | bytearray) else str(pattern).encode()
        if not data:
            raise PatternError("an empty pattern matches everywhere")
        return BytesMatcher(data, repr(data))
    if kind == "text":
        if not isinstance(pattern, str):
            raise PatternError("a text pattern must be a str")
        try:
            data = pattern.encode(encoding)
        except (LookupError, UnicodeError) as exc:
            raise PatternError(f"cannot encode {pattern!r} as {encoding}: {exc}") from None
        if encoding.lower().replace("-", "") in ("utf16", "utf32"):
            data = data[2:] if encoding.lower().endswith("16") else data[4:]  # no BOM
        if not data:
            raise PatternError("an empty pattern matches everywhere")
        return BytesMatcher(data, f"{pattern!r} ({encoding})")
    if kind == "hex":
        source, size = hex_regex(str(pattern))
        if b"." not in source and b"[" not in source:
            return BytesMatcher(bytes.fromhex(re.sub(r"\s+", "", str(pattern))), f"hex {pattern}")
        return RegexMatcher(re.compile(source, re.DOTALL), f"hex {pattern}", size)
    if kind == "regex":
        if isinstance(pattern, re.Pattern):
            regex = pattern
        else:
            raw = pattern if isinstance(pattern, bytes) else str(pattern).encode("utf-8")
            try:
                regex = re.compile(raw, re.DOTALL)
            except re.error as exc:
                raise PatternError(f"regex {pattern!r}: {exc}") from None
        if not isinstance(regex.pattern, bytes):
            raise PatternError("a regex must be over bytes (rb'...')")
        return RegexMatcher(regex, f"regex {regex.pattern!r}", overlap)
    if kind == "yara":
        return YaraMatcher(str(pattern), overlap)
    raise PatternError(f"unknown pattern kind {kind!r} (bytes, text, hex, regex or yara)")


__all__ = [
    "DEFAULT_OVERLAP",
    "BytesMatcher",
    "Matcher",
    "PatternError",
    "RegexMatcher",
    "YaraMatcher",
    "compile_pattern",
    "hex_regex",
]
