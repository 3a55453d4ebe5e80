"""Watcher: polls a range, records changed runs with timestamps, stops cleanly.

A fake process stands in for the guest: its counter ticks on every refresh,
the way a live guest's memory changes between two of vmishell's reads.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.support.pagetables import PageTableBuilder
from vmishell.arch import AddressSpace, PagingMode, Translator
from vmishell.errors import PageFault, SessionClosed, VmiError
from vmishell.frontends.targets import NoTargetError, Targets, default_name
from vmishell.frontends.watch import HISTORY_COLUMNS, Watcher, diff
from vmishell.sources.files import QemuRamSource

ADDR = 0x600040


class TickingProcess:
    """Eight bytes at ADDR hold a little-endian counter that advances on each refresh."""

    def __init__(self, step: int = 1, fail_after: int | None = None) -> None:
        self.pid = 84
        self.counter = 0
        self.step = step
        self.refreshes = 0
        self.fail_after = fail_after
        self.session = SimpleNamespace(refresh=self.refresh)

    def refresh(self) -> None:
        self.refreshes += 1
        self.counter += self.step

    def read(self, vaddr: int, size: int) -> bytes:
        if self.fail_after is not None and self.refreshes > self.fail_after:
            raise PageFault(vaddr, "PT")
        data = self.counter.to_bytes(8, "little")
        return data[vaddr - ADDR : vaddr - ADDR + size]


def test_diff_finds_runs_of_changed_bytes() -> None:
    runs = diff(b"\x00\x01\x02\x03", b"\x00\x09\x09\x03", 0x100, 1.0, 3)
    assert [(c.address, c.offset, c.old, c.new, c.sample) for c in runs] == [
        (0x101, 1, b"\x01\x02", b"\x09\x09", 3)
    ]
    assert diff(b"ab", b"ab", 0, 0.0, 0) == []


def test_foreground_watch_stops_after_count_and_keeps_a_history() -> None:
    proc = TickingProcess()
    seen = []
    w = Watcher(proc, ADDR, 8, every=0.05, count=4)
    w.on_sample(lambda _w, s: seen.append(s.index))
    w.run()
    assert seen == [0, 1, 2, 3] and proc.refreshes == 4  # a refresh before every read
    h = w.history
    assert list(h.columns) == HISTORY_COLUMNS and len(h) == 3
    assert list(h["new_int"]) == [2, 3, 4] and list(h["old_int"]) == [1, 2, 3]
    assert h["time"].is_monotonic_increasing and str(h["time"].dtype).startswith("datetime64")
    assert not w.running and w.stopped_because == "count reached"
    assert w.data == (4).to_bytes(8, "little") and w.data.address == ADDR


def test_background_watch_does_not_block_and_stop_joins_it() -> None:
    proc = TickingProcess()
    gate = threading.Event()
    plain_read = proc.read

    def held_read(vaddr: int, size: int) -> bytes:  # the first sample waits for the test
        gate.wait(10)
        return plain_read(vaddr, size)

    proc.read = held_read
    w = Watcher(proc, ADDR, 8, every=0.05)
    w.start()  # returns while its first sample is still blocked in the guest read
    assert w.running and len(w.history) == 0
    gate.set()
    deadline = time.monotonic() + 5
    while len(w.history) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(w.history) >= 3
    w.stop("test over")
    assert not w.running and w.stopped_because == "test over"
    count = w.samples
    time.sleep(0.2)
    assert w.samples == count  # really stopped


def test_read_errors_are_recorded_and_the_watch_goes_on() -> None:
    proc = TickingProcess(fail_after=2)
    w = Watcher(proc, ADDR, 8, every=0.01, count=4)
    w.run()
    assert w.samples == 4 and "page fault" in (w.error or "")
    assert len(w.history) == 1  # only the change between the two good reads


class SpaceProcess:
    """A process over a real RAM file: page tables built in bytes, read through the walker."""

    def __init__(self, path: Path) -> None:
        b = PageTableBuilder(PagingMode.LEVEL4, 4 << 20)
        b.map(ADDR & ~0xFFF, 0x200000)
        path.write_bytes(bytes(b.ram))
        self.source = QemuRamSource(path)
        self.space = AddressSpace(Translator(self.source, b.dtb, PagingMode.LEVEL4))
        self.pid = 84
        self.session = SimpleNamespace(refresh=self.source.refresh)

    def read(self, vaddr: int, size: int) -> bytes:
        self.source.check()  # what Process does at the start of every call
        return self.space.read(vaddr, size)


def test_a_source_closed_under_the_thread_ends_the_watch_with_the_reason(
    tmp_path: Path,
) -> None:
    proc = SpaceProcess(tmp_path / "ram")
    stopped = threading.Event()
    w = Watcher(proc, ADDR, 8, every=0.02)
    w.on_stop(lambda _w: stopped.set())
    w.start()
    time.sleep(0.1)
    proc.source.close()
    assert stopped.wait(5)
    assert not w.running
    assert (w.stopped_because or "").startswith("SessionClosed: live RAM file")
    assert "is closed" in (w.error or "")


def test_a_foreground_watch_of_a_closed_source_raises_the_one_line_error(
    tmp_path: Path,
) -> None:
    proc = SpaceProcess(tmp_path / "ram")
    proc.source.close()
    w = Watcher(proc, ADDR, 8, every=0.01, count=3)
    with pytest.raises(SessionClosed):
        w.run()
    assert w.samples == 0 and "SessionClosed" in (w.stopped_because or "")


def test_bad_arguments_are_vmishell_errors() -> None:
    with pytest.raises(VmiError, match="length"):
        Watcher(TickingProcess(), ADDR, 0)
    with pytest.raises(VmiError, match="count"):
        Watcher(TickingProcess(), ADDR, 8, count=0)


# -- targets -----------------------------------------------------------------------------


def fake_session(name: str) -> SimpleNamespace:
    loc = SimpleNamespace(arch="x86_64", mode=SimpleNamespace(name="LEVEL4"))
    s = SimpleNamespace(
        name=name,
        live=True,
        source=SimpleNamespace(writable=False),
        profile=SimpleNamespace(name="linux-test"),
        guest=SimpleNamespace(location=loc),
        closed=False,
    )
    s.close = lambda: setattr(s, "closed", True)
    s.poll = lambda: "closed" if s.closed else "running"
    return s


def opener(spec: str, *, profile: str | None, writable: bool) -> SimpleNamespace:
    return fake_session(spec)


def test_targets_attach_switch_and_detach() -> None:
    t = Targets(opener)
    with pytest.raises(NoTargetError, match="no target attached"):
        _ = t.current
    a = t.attach("lab:one")
    b = t.attach("/tmp/dumps/two.elf")
    assert (a.name, b.name) == ("one", "two.elf")
    assert t.current is b
    assert t.use("one") is a and t.current is a
    with pytest.raises(VmiError, match="already attached"):
        t.attach("lab:one")
    frame = t.frame()
    assert list(frame["current"]) == ["*", ""] and list(frame["name"]) == ["one", "two.elf"]
    assert list(frame["state"]) == ["running", "running"]
    t.detach()
    assert a.session.closed and not a.attached and t.current is b
    assert "detached one" in repr(a)
    with pytest.raises(NoTargetError, match=r"no target named 'one' \(attached: two.elf\)"):
        t.get("one")


def test_detaching_stops_the_targets_watches_before_closing_it() -> None:
    t = Targets(opener)
    target = t.attach("lab:live")
    proc = TickingProcess()
    closed_while_running = []
    original_close = target.session.close

    def close() -> None:
        closed_while_running.append(w.running)
        original_close()

    target.session.close = close
    w = Watcher(proc, ADDR, 8, every=0.02)
    t.add_watcher(target, w)
    w.start()
    time.sleep(0.1)
    t.detach("live")
    assert closed_while_running == [False]
    assert w.stopped_because == "target live detached"


@pytest.mark.parametrize(
    ("spec", "name"),
    [
        ("lab:demo", "demo"),
        ("demo", "demo"),
        ("qemu:/dev/shm/vm.ram,/run/qmp.sock", "vm.ram"),
        ("xen:domu1", "domu1"),
        ("/tmp/x/dump.raw", "dump.raw"),
    ],
)
def test_default_names_are_short(spec: str, name: str) -> None:
    assert default_name(spec) == name
