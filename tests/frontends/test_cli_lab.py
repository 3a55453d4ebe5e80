"""The three front doors agree: `Session.processes()`, `%ps` and `vmishell ps`.

Each lists one row per process by default, like `ps`, and one row per
thread when asked, like `ps -eL`; the x86_64 lab guest's marker process has a
second thread to tell the two apart.
"""

from __future__ import annotations

import json

import pytest

from vmishell.cli import build_parser, main
from vmishell.session import Session

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def attached(ip, x86_64_guest):
    """The guest attached in the shell under a name of this module's own."""
    ip.run_line_magic("attach", f"{x86_64_guest.name} --name cli-lab")
    yield x86_64_guest
    ip.run_line_magic("detach", "cli-lab")


def _user_pids(rows) -> set[int]:
    """Pids of the user-space rows (kernel workers come and go between two listings)."""
    return {int(r["pid"]) for r in rows if not r["kernel_thread"]}


def _cli_rows(capsys: pytest.CaptureFixture[str], *argv: str) -> list[dict]:
    capsys.readouterr()
    assert main(["ps", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("threads", [False, True], ids=["default", "threads"])
def test_session_magic_and_command_line_list_the_same_rows(
    cell, attached, capsys: pytest.CaptureFixture[str], threads: bool
) -> None:
    truth = attached.truth()
    (thread,) = [t.pid for t in truth.threads_of(truth.marker_pid) if t.pid != truth.marker_pid]
    with Session.attach(attached.name) as s:
        frame = s.processes(threads=True) if threads else s.processes()
    session = _user_pids(frame.to_dict("records"))
    magic_frame = cell("%ps -t cli-lab" + (" --threads" if threads else "")).value
    magic = _user_pids(magic_frame.to_dict("records"))
    command = _user_pids(_cli_rows(capsys, attached.name, *(["--threads"] if threads else [])))
    assert session == magic == command
    assert truth.marker_pid in session
    assert (thread in session) is threads


def test_the_help_texts_say_what_the_default_is(ip) -> None:
    sub = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for text in (sub["ps"].format_help(), ip.find_line_magic("ps").__doc__):
        words = " ".join(text.split())
        assert "one row per process, like ps" in words
        assert "one row per thread, like ps -eL" in words
    assert "threads=True" in (Session.processes.__doc__ or "")
