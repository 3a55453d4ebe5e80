"""The magics' edges, in a real IPython shell but against a fake target (no guest needed)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from vmishell.errors import VmiError

ADDR = 0x600040


class FakeProcess:
    def __init__(self, session: SimpleNamespace, interrupt_at: int | None = None) -> None:
        self.session = session
        self.pid = 7
        self.value = 0
        self.reads = 0
        self.interrupt_at = interrupt_at

    def read(self, vaddr: int, size: int, *, pad: bool = False) -> bytes:
        self.reads += 1
        if self.interrupt_at is not None and self.reads >= self.interrupt_at:
            raise KeyboardInterrupt
        return self.value.to_bytes(8, "little")[:size]


def fake_session(**over) -> SimpleNamespace:
    s = SimpleNamespace(
        name="fake",
        live=True,
        source=SimpleNamespace(writable=False),
        profile=SimpleNamespace(name="linux-fake", pointer_size=8),
        guest=SimpleNamespace(
            location=SimpleNamespace(arch="x86_64", mode=SimpleNamespace(name="LEVEL4"))
        ),
        symbol=lambda name: 0x1000,
        close=lambda: None,
        poll=lambda: "running",
    )
    proc = FakeProcess(s)

    def refresh() -> None:
        proc.value += 1

    s.refresh = refresh
    s.process = lambda pid: proc
    s.proc = proc
    for key, value in over.items():
        setattr(s, key, value)
    return s


@pytest.fixture
def fake(ip):
    magics = ip.magics_manager.registry["VmiMagics"]
    previous, opener = magics.attached._current, magics.attached._open
    session = fake_session()
    magics.attached._open = lambda spec, **kw: session
    try:
        target = magics.attached.attach("fake-target", name="fake")
        yield session
        magics.attached.detach(target.name)
    finally:
        # The shell is shared by the whole test session: later attaches open real targets.
        magics.attached._open = opener
        magics.attached._current = previous if previous in magics.attached.names() else None


def test_an_unexpected_exception_is_one_line_and_tb_has_the_rest(cell, fake) -> None:
    def boom(**kw):
        raise RuntimeError("boom")

    fake.processes = boom
    r = cell("%ps")
    assert not r.success
    assert r.lines == ["FrontendError: %ps failed: RuntimeError: boom (%tb shows where)"]
    tb = cell("%tb")
    assert "RuntimeError: boom" in tb.output and "Traceback" in tb.output
    assert cell("2 * 21").value == 42


def test_vol_without_its_interop_module_says_so(cell, fake, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "vmishell.interop.volatility", None)
    r = cell("%vol linux.pslist")
    assert not r.success and len(r.lines) == 1
    assert "%vol is unavailable: cannot import vmishell.interop.volatility" in r.output


def test_terminal_watch_stops_on_ctrl_c_and_returns_what_it_saw(ip, cell, fake) -> None:
    fake.proc.interrupt_at = 5  # the 5th read is interrupted (the first is the address check)
    r = cell(f"w = %watch {ADDR:#x} 8 --every 0.01")
    assert r.success, r.output
    w = ip.user_ns["w"]
    assert w.stopped_because == "interrupted" and not w.running
    assert len(w.history) == 2  # 3 samples -> 2 changes
    assert "\x1b" not in r.output


def test_watch_colours_changes_only_on_a_terminal(ip, cell, fake, monkeypatch) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    r = cell(f"w = %watch {ADDR:#x} 8 --every 0.01 --count 3")
    assert r.success
    assert "\x1b[1;33m" in r.output
    assert ip.user_ns["w"].stopped_because == "count reached"


def test_watch_in_a_notebook_runs_in_the_background_with_a_widget(ip, fake, monkeypatch) -> None:
    from vmishell.frontends.watch import Watcher
    from vmishell.frontends.widgets import WatchView, wait_for

    shown = []
    monkeypatch.setattr(ip, "kernel", object(), raising=False)  # what ipykernel's shell has
    monkeypatch.setattr("IPython.display.display", lambda obj, **kw: shown.append(obj))
    w = ip.run_line_magic("watch", f"{ADDR:#x} 8 --every 0.02")
    try:
        assert isinstance(w, Watcher) and w.running
        assert len(shown) == 1 and isinstance(shown[0], WatchView)
        assert wait_for(lambda: len(w.history) >= 2, timeout=10)
        view = shown[0]
        assert 'class="changed"' in view.view.value
        view.stop_button.click()
        assert not w.running and view.stop_button.disabled
    finally:
        w.stop()


def test_magic_results_are_errors_not_prints(cell, fake) -> None:
    fake.processes = lambda **kw: (_ for _ in ()).throw(VmiError("guest says no"))
    r = cell("x = %ps")
    assert r.lines == ["VmiError: guest says no"]


def _processes(**kw):
    import pandas as pd

    return pd.DataFrame(
        {
            "pid": [1, 2],
            "comm": ["systemd", "kthreadd"],
            "kernel_thread": [False, True],
            "cmdline": ["/sbin/init", None],
            "error": [None, None],
        }
    )


def test_ps_shows_missing_values_empty_and_leaves_out_all_empty_columns(cell, fake) -> None:
    fake.processes = _processes
    df = cell("%ps").value
    assert list(df.columns) == ["pid", "comm", "kernel_thread", "cmdline"], "error is all empty"
    text, page = repr(df), df._repr_html_()
    assert "None" not in text and "NaN" not in text and "nan" not in text
    assert "None" not in page and "NaN" not in page
    every = cell("%ps --all-columns").value
    assert "error" in every.columns and every["cmdline"].isna().iloc[1], "values stay as they are"


def test_peek_without_pid_says_it_read_the_kernel_and_suggests_pid(cell, fake) -> None:
    from vmishell.errors import PageFault

    def fault(vaddr: int, size: int, *, pad: bool = False) -> bytes:
        raise PageFault(vaddr, "PML4", 0, 0x1000)

    fake.proc.read = fault
    r = cell(f"%peek {ADDR:#x} 16")
    assert not r.success and len(r.lines) == 1
    assert "page fault translating 0x600040 at PML4" in r.output
    assert "read in pid 0, the kernel's address space" in r.output
    assert "give -p PID" in r.output
    r = cell(f"%peek {ADDR:#x} 16 -p 7")
    assert not r.success and "pid 0" not in r.output, "with -p the fault is the answer"
