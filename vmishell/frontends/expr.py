"""Address expressions for the magics: `init_task+0x10`, `0x600000 + 4*8`, `(a|b) >> 12`.

Analysts type addresses as arithmetic over numbers and kernel symbols. This
is a tiny recursive-descent parser over exactly that (integers, symbol names
and `+ - * // << >> & | ^ ~` with parentheses), never `eval`: the text comes
from a notebook cell, but names resolve through the guest's profile and the
result indexes guest memory, so the language is kept small and every value
bounded (no `1 << 10**9` stalls, no recursion blow-up).

Several expressions can follow one another (`%peek 0x600000 + 8 32` is an
address and a length): an expression ends where the next token cannot
continue it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from vmishell.errors import VmiError

#: Longest expression text accepted.
MAX_TEXT = 1000
#: Deepest parenthesis / unary nesting accepted.
MAX_DEPTH = 64
#: Intermediate values stay below this magnitude (addresses are at most 64 bits).
MAX_MAGNITUDE = 1 << 128
#: Largest shift count.
MAX_SHIFT = 128

Resolver = Callable[[str], int]


class ExpressionError(VmiError):
    """An address expression could not be parsed or evaluated."""


_TOKEN = re.compile(
    r"\s*(?:"
    r"(?P<number>0[xX][0-9a-fA-F_]+|0[oO][0-7_]+|0[bB][01_]+|\d[\d_]*)"
    r"|(?P<name>[A-Za-z_$][\w.$]*)"
    r"|(?P<op>//|<<|>>|[-+*&|^~()])"
    r")"
)

_BINARY = {
    # operator -> (precedence, function); higher binds tighter, as in C/Python
    "|": (1, lambda a, b: a | b),
    "^": (2, lambda a, b: a ^ b),
    "&": (3, lambda a, b: a & b),
    "<<": (4, None),
    ">>": (4, None),
    "+": (5, lambda a, b: a + b),
    "-": (5, lambda a, b: a - b),
    "*": (6, lambda a, b: a * b),
    "//": (6, None),
}


@dataclass(frozen=True, slots=True)
class Token:
    kind: str  # "number", "name", "op"
    text: str
    pos: int


def tokenize(text: str) -> list[Token]:
    """Split `text` into tokens; anything else is an ExpressionError naming the spot."""
    if len(text) > MAX_TEXT:
        raise ExpressionError(f"expression is longer than {MAX_TEXT} characters")
    tokens = []
    pos = 0
    end = len(text.rstrip())
    while pos < end:
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            bad = text[pos:].strip()[:20]
            hint = " (use // for division)" if bad.startswith("/") else ""
            raise ExpressionError(f"bad expression {text!r}: unexpected {bad!r}{hint}")
        kind = m.lastgroup or "op"
        tokens.append(Token(kind, m.group(kind), m.start(kind)))
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, text: str, resolve: Resolver) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.i = 0
        self.resolve = resolve

    # -- helpers -----------------------------------------------------------
    def peek(self) -> Token | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def fail(self, what: str) -> ExpressionError:
        tok = self.peek()
        where = f"at {tok.text!r}" if tok else "at the end"
        return ExpressionError(f"bad expression {self.text!r}: {what} {where}")

    def check(self, value: int) -> int:
        if abs(value) >= MAX_MAGNITUDE:
            raise ExpressionError(f"bad expression {self.text!r}: value out of range")
        return value

    # -- grammar -----------------------------------------------------------
    def expression(self, min_prec: int = 1, depth: int = 0) -> int:
        """Precedence climbing over the binary operators."""
        left = self.unary(depth)
        while True:
            tok = self.peek()
            if tok is None or tok.kind != "op" or tok.text not in _BINARY:
                return left
            prec, func = _BINARY[tok.text]
            if prec < min_prec:
                return left
            self.i += 1
            right = self.expression(prec + 1, depth + 1)
            left = self.check(self.apply(tok.text, func, left, right))

    def apply(self, op: str, func: Callable[[int, int], int] | None, a: int, b: int) -> int:
        if op in ("<<", ">>"):
            if not 0 <= b <= MAX_SHIFT:
                raise ExpressionError(f"bad expression {self.text!r}: shift by {b}")
            return a << b if op == "<<" else a >> b
        if op == "//":
            if b == 0:
                raise ExpressionError(f"bad expression {self.text!r}: division by zero")
            return a // b
        assert func is not None
        return func(a, b)

    def unary(self, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise ExpressionError(f"bad expression {self.text!r}: nested too deeply")
        tok = self.peek()
        if tok is None:
            raise self.fail("expected a number, symbol or '('")
        if tok.kind == "op" and tok.text in ("-", "+", "~"):
            self.i += 1
            value = self.unary(depth + 1)
            return self.check(-value if tok.text == "-" else ~value if tok.text == "~" else value)
        return self.atom(depth)

    def atom(self, depth: int) -> int:
        tok = self.peek()
        assert tok is not None
        self.i += 1
        if tok.kind == "number":
            return int(tok.text, 0)
        if tok.kind == "name":
            return self.check(int(self.resolve(tok.text)))
        if tok.text == "(":
            value = self.expression(1, depth + 1)
            close = self.peek()
            if close is None or close.text != ")":
                raise self.fail("expected ')'")
            self.i += 1
            return value
        self.i -= 1
        raise self.fail("expected a number, symbol or '('")


def _no_symbols(name: str) -> int:
    raise ExpressionError(f"unknown name {name!r} (no target to resolve symbols)")


def evaluate_all(text: str, resolve: Resolver = _no_symbols, *, limit: int = 8) -> list[int]:
    """Every expression in `text`, in order (`"a + 8 32"` -> [a + 8, 32])."""
    parser = _Parser(text, resolve)
    values: list[int] = []
    while parser.peek() is not None:
        if len(values) >= limit:
            raise parser.fail(f"more than {limit} values")
        values.append(parser.expression())
    return values


def evaluate(text: str, resolve: Resolver = _no_symbols) -> int:
    """The value of exactly one expression."""
    values = evaluate_all(text, resolve, limit=1)
    if not values:
        raise ExpressionError("empty expression")
    return values[0]


def as_address(value: int, text: str, bits: int = 64) -> int:
    """`value` checked to be a valid virtual address of a `bits`-bit guest."""
    if not 0 <= value < 1 << bits:
        raise ExpressionError(f"{text!r} = {value:#x} is not a {bits}-bit address")
    return value


__all__ = ["ExpressionError", "Token", "as_address", "evaluate", "evaluate_all", "tokenize"]
