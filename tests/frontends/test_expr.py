"""Address expressions: numbers, symbols and integer operators, parsed without eval."""

from __future__ import annotations

import pytest

from vmishell.errors import VmiError
from vmishell.frontends.expr import ExpressionError, as_address, evaluate, evaluate_all

SYMBOLS = {"init_task": 0xFFFFFFFF82A0C940, "jiffies": 0xFFFFFFFF82A05000, "a.b$c": 7}


def resolve(name: str) -> int:
    try:
        return SYMBOLS[name]
    except KeyError:
        raise ExpressionError(f"no symbol {name!r}") from None


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0x600000", 0x600000),
        ("4096", 4096),
        ("0o17 + 0b101", 15 + 5),
        ("1_000", 1000),
        ("init_task+0x10", SYMBOLS["init_task"] + 0x10),
        ("0x600000 + 4*8", 0x600000 + 32),
        ("(0x600000 + 4) * 8", (0x600000 + 4) * 8),
        ("jiffies - init_task", SYMBOLS["jiffies"] - SYMBOLS["init_task"]),
        ("1 << 12 | 0xff & 0x0f", (1 << 12) | (0xFF & 0x0F)),
        ("0x1234 >> 4 ^ 1", (0x1234 >> 4) ^ 1),
        ("17 // 4", 4),
        ("-8 + 16", 8),
        ("~0 & 0xffff", 0xFFFF),
        ("a.b$c", 7),
    ],
)
def test_expressions_follow_python_integer_semantics(text: str, value: int) -> None:
    assert evaluate(text, resolve) == value


def test_consecutive_expressions_split_where_the_next_token_cannot_continue() -> None:
    assert evaluate_all("0x600000 + 4*8 32", resolve) == [0x600000 + 32, 32]
    assert evaluate_all("init_task (8)", resolve) == [SYMBOLS["init_task"], 8]
    assert evaluate_all("", resolve) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("init_task +", "at the end"),
        ("(1 + 2", "expected ')'"),
        ("1 / 2", "use // for division"),
        ("1 // 0", "division by zero"),
        ("1 << 100000", "shift by"),
        ("1 << -1", "shift by"),
        ("2 * (1 << 127)", "out of range"),
        ("nosuch", "no symbol 'nosuch'"),
        ("0x12; import os", "unexpected ';"),
        ("__import__('os')", "unexpected"),
        ("(" * 200 + "1" + ")" * 200, "nested too deeply"),
        ("1" * 2000, "longer than"),
        (")", "expected a number"),
    ],
)
def test_bad_expressions_raise_one_clear_vmishell_error(text: str, message: str) -> None:
    with pytest.raises(ExpressionError, match=None) as info:
        evaluate(text, resolve)
    assert isinstance(info.value, VmiError)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_more_values_than_asked_for_is_an_error() -> None:
    with pytest.raises(ExpressionError, match="more than 2 values"):
        evaluate_all("1 2 3", resolve, limit=2)


def test_without_a_resolver_names_are_refused() -> None:
    with pytest.raises(ExpressionError, match="no target"):
        evaluate("init_task")


def test_addresses_must_fit_the_guest_word() -> None:
    assert as_address(0xFFFFFFFF, "x", 32) == 0xFFFFFFFF
    with pytest.raises(ExpressionError, match="not a 32-bit address"):
        as_address(1 << 32, "x", 32)
    with pytest.raises(ExpressionError, match="not a 64-bit address"):
        as_address(-1, "-1")
