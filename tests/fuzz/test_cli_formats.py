"""`vmishell ... --json` and `--csv`: guest strings stay data in machine-readable output too.

JSON keeps every guest string exact (a program reading it gets what the
guest wrote) and escapes it as JSON, in ASCII; CSV escapes each string cell
as the table does, so a record is one line and no control character reaches
a terminal. Both are checked on arbitrary text, then on a lab dump whose
processes and files have hostile names.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmishell.cli import main
from vmishell.frontends import cli
from vmishell.frontends.text import safe_cell
from vmishell.lab.workload import X86_64_DATA_VA

from .harness import Harness, Mutation, assert_no_control, fuzz_settings

guest_text = st.text() | st.binary().map(lambda b: b.decode("utf-8", "backslashreplace"))


def _printed(capsys: pytest.CaptureFixture[str], call) -> str:
    capsys.readouterr()
    call()
    return capsys.readouterr().out


@fuzz_settings(300)
@given(st.lists(guest_text, max_size=5))
def test_json_records_hold_guest_text_exactly_in_ascii(texts: list[str]) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli.print_json([{"comm": t, "pid": i} for i, t in enumerate(texts)])
    printed = out.getvalue()
    assert printed.isascii()
    assert_no_control(printed.replace("\n", ""))
    assert [r["comm"] for r in json.loads(printed)] == texts


@fuzz_settings(300)
@given(st.lists(guest_text, max_size=5))
def test_csv_records_are_one_line_each_with_guest_text_escaped(texts: list[str]) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli.print_csv(("pid", "comm"), [{"pid": i, "comm": t} for i, t in enumerate(texts)])
    printed = out.getvalue()
    assert len(printed.splitlines()) == len(texts) + 1
    assert_no_control(printed.replace("\n", ""))
    rows = list(csv.reader(io.StringIO(printed)))
    assert rows == [["pid", "comm"], *([str(i), safe_cell(t)] for i, t in enumerate(texts))]


# -- the commands, on a tampered lab dump -------------------------------------------------

HOSTILE_NAMES = [
    Mutation("task:vmi-marker.comm", "text", b'a\n1 0 R ok,"x"'),
    Mutation("task:sleep.comm", "text", b"\x1b]0;pwned\x07"),
    Mutation("task:cat.comm", "text", b"\x1b[2J\xe2\x80\xae<b>\xff"),
    Mutation("task:vmi-marker.file0.dentry0.name", "text", b"x\n\x1b[31mred"),
]


@pytest.fixture
def hostile(harness: Harness, monkeypatch: pytest.MonkeyPatch):
    """The CLI reads the harness's memory, in which names hold escapes, quotes and newlines."""
    monkeypatch.setattr(cli, "_session", lambda args: contextlib.nullcontext(harness.session))
    with harness.source.patched(harness.patches(HOSTILE_NAMES)):
        yield harness.session


@pytest.mark.lab
@pytest.mark.parametrize("threads", [False, True], ids=["processes", "threads"])
def test_ps_json_is_the_process_table_with_names_exact(
    hostile, threads: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["ps", "dump", "--json", *(["--threads"] if threads else [])]
    out = _printed(capsys, lambda: main(argv))
    assert out.isascii()
    assert_no_control(out.replace("\n", ""))
    rows = json.loads(out)
    expected = hostile.process_rows(threads=threads)
    assert [(r["pid"], r["comm"], r["cmdline"], r["error"]) for r in rows] == [
        (r.pid, r.comm, r.cmdline, r.error) for r in expected
    ]
    comms = {r["comm"] for r in rows}
    assert {'a\n1 0 R ok,"x"', "\x1b]0;pwned\x07", "\x1b[2J\u202e<b>\\xff"} <= comms


@pytest.mark.lab
def test_ps_csv_has_one_line_per_process_and_no_control_character(
    hostile, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _printed(capsys, lambda: main(["ps", "dump", "--csv"]))
    expected = hostile.process_rows(threads=False)
    assert len(out.splitlines()) == len(expected) + 1
    assert_no_control(out.replace("\n", ""))
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(int(r["pid"]), r["comm"]) for r in rows] == [
        (r.pid, safe_cell(r.comm)) for r in expected
    ]
    assert "\\x1b]0;pwned\\x07" in {r["comm"] for r in rows}


@pytest.mark.lab
@pytest.mark.parametrize("fmt", ["--json", "--csv"])
def test_maps_records_match_the_vmas_whatever_the_paths_hold(
    hostile, harness: Harness, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    pid = harness.targets.marker_pid
    out = _printed(capsys, lambda: main(["maps", "dump", "-p", str(pid), fmt]))
    vmas = hostile.process(pid).vmas()
    assert_no_control(out.replace("\n", ""))
    if fmt == "--json":
        got = [(r["start"], r["end"], r["perms"], r["path"]) for r in json.loads(out)]
        assert got == [(v.start, v.end, v.perms, v.path) for v in vmas]
        assert any("x\n\x1b[31mred" in r[3] for r in got)
    else:
        assert len(out.splitlines()) == len(vmas) + 1
        rows = list(csv.DictReader(io.StringIO(out)))
        assert [(int(r["start"]), r["path"]) for r in rows] == [
            (v.start, safe_cell(v.path)) for v in vmas
        ]


@pytest.mark.lab
def test_translate_and_peek_json_match_the_walk_and_the_bytes(
    hostile, harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    pid = str(harness.targets.marker_pid)
    process = hostile.process(harness.targets.marker_pid)
    walk = json.loads(
        _printed(
            capsys, lambda: main(["translate", "dump", hex(X86_64_DATA_VA), "-p", pid, "--json"])
        )
    )
    ours = process.walk(X86_64_DATA_VA)
    assert walk["paddr"] == ours.translation.paddr
    assert [(s["level"], s["entry"]) for s in walk["steps"]] == [
        (s.level, s.entry) for s in ours.steps
    ]
    steps = list(
        csv.DictReader(
            io.StringIO(
                _printed(
                    capsys,
                    lambda: main(["translate", "dump", hex(X86_64_DATA_VA), "-p", pid, "--csv"]),
                )
            )
        )
    )
    assert [int(s["entry"]) for s in steps] == [s.entry for s in ours.steps]
    peek = json.loads(
        _printed(
            capsys, lambda: main(["peek", "dump", hex(X86_64_DATA_VA), "32", "-p", pid, "--json"])
        )
    )
    assert bytes.fromhex(peek["hex"]) == process.read(X86_64_DATA_VA, 32)
    assert peek["address"] == X86_64_DATA_VA
