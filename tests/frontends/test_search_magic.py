"""%search and `vmishell search` over a real Session of a synthetic kernel: thin front ends
that return the API's rows and never print guest bytes unescaped."""

from __future__ import annotations

import pytest

from tests.support.profiles import kernel
from tests.unit.test_search import BASE, PAGE, _frames, _process
from vmishell.session import Session


@pytest.fixture
def synthetic(ip):
    k = kernel("6.7")
    frames = _frames(k, 2)
    _process(k, 100, "evil", frames)
    k.write(frames[0] + PAGE - 7, b"\x1b[2Jsec")
    k.write(frames[1], b"ret\x07\n")
    session = Session(k.source(), k.profile, name="synthetic")
    magics = ip.magics_manager.registry["VmiMagics"]
    previous, opener = magics.attached._current, magics.attached._open
    magics.attached._open = lambda spec, **kw: session
    try:
        target = magics.attached.attach("synthetic", name="synthetic")
        yield session
        magics.attached.detach(target.name)
    finally:
        magics.attached._open = opener
        magics.attached._current = previous if previous in magics.attached.names() else None


def test_search_magic_returns_the_hits_as_a_frame(cell, synthetic) -> None:
    r = cell("hits = %search secret")
    assert r.success, r.output
    hits = r.value if r.value is not None else cell("hits").value
    assert list(hits.vaddr) == [BASE + PAGE - 3]
    hex_hits = cell("%search --hex '73 65 63 72 ?? 74' -p 100").value
    assert list(hex_hits.vaddr) == [BASE + PAGE - 3]


def test_search_output_escapes_guest_bytes(cell, synthetic) -> None:
    r = cell("%search --regex 'sec[a-z]+..' --context 8")  # IPython expands {...}
    assert r.success, r.output
    shown = r.output + cell("_").value._repr_html_()
    assert "\x1b" not in shown and "\x07" not in shown
    assert "\\x1b" in shown


def test_search_cli_prints_escaped_rows(synthetic, monkeypatch, capsys) -> None:
    from vmishell import cli

    monkeypatch.setattr(Session, "attach", classmethod(lambda cls, target, **kw: synthetic))
    monkeypatch.setattr(Session, "close", lambda self: None)
    assert cli.main(["search", "whatever", "secret", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"vaddr": ' + str(BASE + PAGE - 3) in out
    assert "\x1b" not in out
    assert cli.main(["search", "whatever", "secret"]) == 0
    line = capsys.readouterr().out.strip()
    assert f"{BASE + PAGE - 3:#x}" in line and "\x1b" not in line and "[secret]" in line


def test_search_cli_physical_lists_unmapped_hits_with_no_pid(
    synthetic, monkeypatch, capsys
) -> None:
    from vmishell import cli

    monkeypatch.setattr(Session, "attach", classmethod(lambda cls, target, **kw: synthetic))
    monkeypatch.setattr(Session, "close", lambda self: None)
    assert cli.main(["search", "whatever", "2Jsec", "--physical", "--csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("pid,comm,vaddr,paddr")
    assert sorted(line.split(",")[0] for line in lines[1:]) == ["0", "100"]
    assert cli.main(["search", "whatever", "secret", "--physical", "--csv"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == []
