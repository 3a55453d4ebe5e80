"""System.map parsing and the shared symbol table rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmishell.errors import ProfileError
from vmishell.symbols.sysmap import is_stub, load_system_map, parse_system_map

STUB = b"ffffffffffffffff B The real System.map is in the linux-image-<version>-dbg package\n"


def test_parse() -> None:
    text = (
        "0000000000000000 D __per_cpu_start\n"
        "ffffffff81000000 T _text\n"
        "ffffffff81000000 T startup_64\n"
        "ffffffff82a1aa40 D init_task\n"
        "ffffffff81123450 t helper\n"
        "ffffffff81123980 t helper\n"
        "ffffffff81124000 T helper\n"
        "garbage line\n"
    )
    table = parse_system_map(text)
    assert len(table) == 7
    assert table["init_task"] == 0xFFFFFFFF82A1AA40 and table.types["init_task"] == "D"
    assert table["helper"] == 0xFFFFFFFF81124000  # the global wins over statics
    assert table.get("nope") is None and "nope" not in table
    assert table.missing() == ["init_mm", "linux_banner"]


def test_first_local_wins_among_locals() -> None:
    table = parse_system_map(b"ffffffff81000010 t f\nffffffff81000020 t f\n")
    assert table["f"] == 0xFFFFFFFF81000010


def test_debian_stub_rejected() -> None:
    assert len(STUB) == 83 and is_stub(STUB)
    with pytest.raises(ProfileError, match=r"placeholder.*-dbg"):
        parse_system_map(STUB, "System.map-6.1.0-57-amd64")


def test_not_a_system_map() -> None:
    with pytest.raises(ProfileError, match=r"not a System\.map"):
        parse_system_map("hello\nworld\n")


def test_load(tmp_path: Path) -> None:
    path = tmp_path / "System.map"
    path.write_bytes(b"c1000000 T _text\n")
    assert load_system_map(path)["_text"] == 0xC1000000
    with pytest.raises(ProfileError, match=r"cannot read System\.map"):
        load_system_map(tmp_path / "missing")
