"""Guest strings reach a terminal as inert text: no escape sequence, no forged row.

`safe_text` is for whole renderings (it keeps tabs and newlines); `safe_cell`
for one guest string inside a row. The command line escapes every cell
before measuring widths, and marks rows it could not trust.
"""

from __future__ import annotations

import argparse
import contextlib
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmishell.frontends import cli
from vmishell.frontends.text import safe_cell, safe_text

from .harness import HOSTILE_TEXT, Harness, Mutation, assert_no_control, fuzz_settings

FORBIDDEN_IN_CELL = {chr(c) for c in (*range(0x20), *range(0x7F, 0xA0))} | set(
    "\u061c\u200b\u200c\u200d\u200e\u200f\u2028\u2029\u202a\u202b\u202c\u202d\u202e"
    "\u2060\u2061\u2062\u2063\u2064\u2066\u2067\u2068\u2069\ufeff"
)


@fuzz_settings(500)
@given(st.text() | st.binary().map(lambda b: b.decode("utf-8", "backslashreplace")))
def test_a_cell_never_carries_a_control_bidi_or_invisible_character(text: str) -> None:
    assert not FORBIDDEN_IN_CELL.intersection(safe_cell(text))
    assert not (FORBIDDEN_IN_CELL - {"\t", "\n"}).intersection(safe_text(text))


@fuzz_settings(200)
@given(st.text(alphabet=string.printable.strip() + " éü中文"))
def test_printable_text_is_shown_unchanged(text: str) -> None:
    assert safe_cell(text) == text


@pytest.mark.parametrize("raw", HOSTILE_TEXT)
def test_every_hostile_string_is_made_visible(raw: bytes) -> None:
    text = raw.decode("utf-8", "backslashreplace")
    assert_no_control(safe_cell(text))
    assert "\n" not in safe_cell(text)


# -- the command line, on a tampered lab dump ---------------------------------------------


@contextlib.contextmanager
def _cli_on(monkeypatch: pytest.MonkeyPatch, harness: Harness, *mutations: Mutation):
    """Run `vmishell ps/maps` against the harness's (mutated) memory."""
    monkeypatch.setattr(cli, "_session", lambda args: contextlib.nullcontext(harness.session))
    with harness.source.patched(harness.patches(mutations)):
        yield


@pytest.mark.lab
def test_ps_prints_one_line_per_task_whatever_the_names_hold(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    names = [
        Mutation("task:vmi-marker.comm", "text", b"a\n 1 0 1 0 R ok"),
        Mutation("task:sleep.comm", "text", b"\x1b]0;pwned\x07"),
        Mutation("task:cat.comm", "text", b"\x1b[2J\xe2\x80\xae<b>"),
    ]
    with _cli_on(monkeypatch, harness, *names):
        tasks = len(harness.session.process_rows())
        cli.cmd_ps(argparse.Namespace(threads=True))
    out = capsys.readouterr().out
    assert len(out.splitlines()) == tasks + 1  # the header, then one line per task
    assert_no_control(out.replace("\n", ""))
    assert "a\\n 1 0 1 0 R ok" in out
    assert "\\x1b]0;pwned\\x07" in out


@pytest.mark.lab
def test_ps_marks_a_row_it_could_not_trust(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with _cli_on(monkeypatch, harness, Mutation("task:sleep.tasks.next", "set", 0)):
        cli.cmd_ps(argparse.Namespace(threads=True))
    line = next(x for x in capsys.readouterr().out.splitlines() if " sleep " in x)
    assert "!! tasks.next" in line and "NULL link" in line


@pytest.mark.lab
def test_maps_prints_one_line_per_mapping_whatever_the_paths_hold(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    hostile = Mutation("task:vmi-marker.file0.dentry0.name", "text", b"x\n\x1b[31mred")
    with _cli_on(monkeypatch, harness, hostile):
        count = len(harness.session.process(harness.targets.marker_pid).vmas())
        cli.cmd_maps(argparse.Namespace(pid=harness.targets.marker_pid))
    out = capsys.readouterr().out
    assert len(out.splitlines()) == count
    assert_no_control(out.replace("\n", ""))
    assert "x\\n\\x1b[31mred" in out
