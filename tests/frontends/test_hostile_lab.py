"""A guest whose processes have hostile names: they must show as text everywhere.

The guest's init scenario starts two long-lived shells that rename themselves
by writing /proc/self/comm (the kernel's own way to set a task's comm), one
to an HTML tag and one to terminal escape sequences, then block on a FIFO
nobody writes, so they keep those names without forking anything.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from vmishell.errors import VmiError
from vmishell.frontends.text import safe_text

pytestmark = pytest.mark.lab

HTML_COMM = "<b>x</b>"
ESC_COMM = "\x1b[2J\x1b[31mX"
SCENARIO = r"""
mkfifo /tmp/never
( printf '<b>x</b>' > /proc/self/comm; read -r _ < /tmp/never ) &
( printf '\033[2J\033[31mX' > /proc/self/comm; read -r _ < /tmp/never ) &
"""


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, x86_64_guest, ip, lab_unavailable):
    """A booted x86_64 guest running the scenario, attached as `hostile`."""
    from vmishell.lab.runner import down, up

    script = tmp_path_factory.mktemp("scenario") / "hostile.sh"
    script.write_text(SCENARIO)
    name = f"t-{os.getpid()}-hostile"
    try:
        guest = up("x86_64", name, init_script=Path(script), timeout=240)
    except VmiError as exc:
        lab_unavailable(f"x86_64 with a scenario: {exc}")
    magics = ip.magics_manager.registry["VmiMagics"]
    try:
        magics.attached.attach(guest.name, name="hostile")
        yield magics.attached.get("hostile")
    finally:
        with contextlib.suppress(VmiError):
            magics.attached.detach("hostile")
        with contextlib.suppress(VmiError):
            down(name)


def formats(ip, value) -> dict:
    return ip.display_formatter.format(value)[0]


def test_the_guest_really_runs_processes_with_hostile_names(cell, hostile) -> None:
    df = cell("%ps -t hostile").value
    assert HTML_COMM in set(df.comm)
    assert ESC_COMM in set(df.comm)


def test_ps_html_shows_an_html_name_as_text(ip, cell, hostile) -> None:
    df = cell("%ps -t hostile").value
    page = formats(ip, df)["text/html"]
    assert HTML_COMM not in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page
    assert "\x1b" not in page


def test_terminal_output_never_carries_the_escape_sequences(ip, cell, hostile) -> None:
    r = cell("%ps -t hostile")
    assert r.success
    assert "\x1b" not in r.output
    assert safe_text(ESC_COMM) in r.output  # shown, made visible
    assert HTML_COMM in r.output  # in a terminal a tag is just text
    assert "\x1b" not in formats(ip, r.value)["text/plain"]


def test_a_decoded_task_escapes_its_comm_in_html_and_text(ip, cell, hostile) -> None:
    df = cell("%ps -t hostile").value
    for comm in (HTML_COMM, ESC_COMM):
        task = int(df[df.comm == comm].task.iloc[0])
        t = cell(f"%dt task_struct {task:#x} -t hostile").value
        assert t.comm == comm
        shown = formats(ip, t)
        assert "<b>x</b>" not in shown["text/html"] and "\x1b" not in shown["text/html"]
        assert "\x1b" not in shown["text/plain"]


def test_widgets_escape_the_names_too(cell, hostile) -> None:
    table = cell("%ps -t hostile --table").value
    table.filter.value = HTML_COMM  # the table pages: bring the hostile rows onto the page
    assert "&lt;b&gt;x&lt;/b&gt;" in table.table.value
    assert HTML_COMM not in table.table.value and "\x1b" not in table.table.value
