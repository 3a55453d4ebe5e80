"""A running guest whose kernel structures are corrupted under it cannot fool vmishell.

This module boots its own x86_64 lab guest (others share theirs), pauses it
(QMP stop), rewrites its kernel's memory through the RAM file opened
writable, checks what a second, default (read-only) session answers, puts
the original bytes back and resumes the guest. Every answer must come in
bounded time, as a clear error or a row marked suspect (the `error`
column), never as corrupted data presented as good; and every rendering of
guest strings must be inert (no live HTML, no terminal escape).
"""

from __future__ import annotations

import html
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from vmishell.errors import PageFault, SourceError, VmiError
from vmishell.frontends.frames import guest_frame
from vmishell.frontends.text import safe_cell, safe_text
from vmishell.lab.workload import MARKER, X86_64_DATA_VA
from vmishell.os.linux.layout import mm_layout, task_layout
from vmishell.session import Session

pytestmark = pytest.mark.lab

SECONDS = 5.0
SCRIPT = b"<script>alert(1)</script>"
TITLE = b"\x1b]0;pwned\x07"
CLEAR = b"\x1b[2J"


@pytest.fixture(scope="module")
def guest(x86_64_guest) -> Iterator[Any]:
    """A guest of this module's own (it is written to), booted once the shared one is up.

    Whether the lab can boot at all is decided by the shared `x86_64_guest`
    (tests/conftest.py: skipped on a machine without QEMU, a failure under
    CI=true); after that, failing to boot the same image again is a failure.
    """
    from vmishell.lab.runner import down, up

    name = f"tamper-{os.getpid()}"
    running = up("x86_64", name, timeout=240)
    try:
        yield running
    finally:
        down(name)


@pytest.fixture(scope="module")
def writer(guest) -> Iterator[Session]:
    """The session that tampers: the guest's RAM opened writable (explicitly)."""
    with Session.lab(guest.name, writable=True) as s:
        yield s


@pytest.fixture(scope="module")
def reader(guest) -> Iterator[Session]:
    """The session under test: opened the default way, read-only."""
    with Session.lab(guest.name) as s:
        yield s


class Tamper:
    """Writes into the paused guest and remembers what to put back."""

    def __init__(self, session: Session) -> None:
        self.s = session
        self.saved: list[tuple[int, bytes]] = []

    def kernel_paddr(self, vaddr: int) -> int:
        return self.s.guest.kernel_translator.translate(vaddr).paddr

    def write(self, paddr: int, data: bytes) -> None:
        self.saved.append((paddr, self.s.source.read(paddr, len(data))))
        self.s.source.write(paddr, data)
        self.s.refresh()

    def kernel(self, vaddr: int, data: bytes) -> None:
        self.write(self.kernel_paddr(vaddr), data)

    def pointer(self, vaddr: int, value: int) -> None:
        self.kernel(vaddr, value.to_bytes(8, "little"))

    def restore(self) -> None:
        for paddr, data in reversed(self.saved):
            self.s.source.write(paddr, data)
        self.saved.clear()
        self.s.refresh()


@contextmanager
def tampered(writer: Session) -> Iterator[Tamper]:
    """The guest paused and writable for the block; its bytes restored before it resumes."""
    with writer.paused():
        t = Tamper(writer)
        try:
            yield t
        finally:
            t.restore()


def answer(call: Callable[[], Any]) -> tuple[Any, float]:
    """What vmishell answered (a value or its VmiError) and how long it took."""
    start = time.perf_counter()
    try:
        result = call()
    except VmiError as exc:
        result = exc
    return result, time.perf_counter() - start


def tasks_by_comm(session: Session) -> dict[str, Any]:
    return {t.comm: t for t in session.tasks()}


# -- read-only by default ------------------------------------------------------------------


def test_a_default_session_on_a_live_guest_cannot_write_it(reader: Session) -> None:
    source = reader.source
    assert source.live and not source.writable
    with pytest.raises(SourceError, match="read-only"):
        source.write(0x1000, b"x")
    assert source.segments()[0].view.readonly


def test_the_untampered_guest_answers_without_errors(reader: Session) -> None:
    with reader.paused():
        rows = reader.process_rows()
    assert rows and all(r.error is None for r in rows)


# -- the task list -------------------------------------------------------------------------


def test_a_task_list_made_cyclic_is_answered_quickly_with_the_loop_marked(
    writer: Session, reader: Session
) -> None:
    """The marker's tasks.next points back at init's (an earlier task, not the head)."""
    t = task_layout(writer.profile)
    with tampered(writer) as tamper:
        clean = [(r.pid, r.comm) for r in reader.process_rows()]
        by = tasks_by_comm(writer)
        marker, init = by["vmi-marker"], by["init"]
        tamper.pointer(marker.address + t.tasks, init.address + t.tasks)
        rows, seconds = answer(reader.process_rows)
        frame, _ = answer(reader.processes)
    assert seconds < SECONDS
    assert not isinstance(rows, VmiError), rows
    listed = [(r.pid, r.comm) for r in rows]
    assert listed == clean[: len(listed)]  # the tasks before the loop, unchanged
    marked = [r for r in rows if r.error]
    assert [r.comm for r in marked] == ["vmi-marker"]
    assert "loops back" in marked[0].error
    assert frame.error.notna().sum() == 1  # the DataFrame carries the same mark


def test_a_task_hidden_by_relinking_the_list_is_visible_as_a_broken_link(
    writer: Session, reader: Session
) -> None:
    """The marker's tasks.next skips `sleep`; the next task's prev still names sleep."""
    t = task_layout(writer.profile)
    with tampered(writer) as tamper:
        by = tasks_by_comm(writer)
        tamper.pointer(by["vmi-marker"].address + t.tasks, by["cat"].address + t.tasks)
        rows, seconds = answer(reader.process_rows)
    assert seconds < SECONDS
    cat = next(r for r in rows if r.comm == "cat")
    assert cat.error and "prev link" in cat.error


# -- page tables ---------------------------------------------------------------------------


def test_page_table_entries_at_their_own_table_and_beyond_ram_are_answered_as_such(
    writer: Session, reader: Session, guest
) -> None:
    """The marker's PTE for its marker page points at its own page table; the PTE of the
    next page points beyond the end of RAM."""
    pid = guest.truth().marker_pid
    with tampered(writer) as tamper:
        proc = writer.process(pid)
        leaf = proc.walk(X86_64_DATA_VA).steps[-1]
        beyond_leaf = proc.walk(X86_64_DATA_VA + 0x1000).steps[-1]
        own_table = leaf.table | (leaf.entry & 0xFFF) | (leaf.entry & (1 << 63))
        ram_end = writer.source.size
        beyond = (ram_end + (64 << 20)) | (leaf.entry & 0xFFF)  # present, like the marker's
        tamper.write(leaf.entry_address, own_table.to_bytes(8, "little"))
        tamper.write(beyond_leaf.entry_address, beyond.to_bytes(8, "little"))

        target = reader.process(pid)
        read, seconds = answer(lambda: target.read(X86_64_DATA_VA, len(MARKER)))
        walk = target.walk(X86_64_DATA_VA)
        table_bytes = reader.source.read(leaf.table, len(MARKER))
        fault, _ = answer(lambda: target.read(X86_64_DATA_VA + 0x1000, 16))
        padded = target.read(X86_64_DATA_VA + 0x1000, 16, pad=True)
        runs, map_seconds = answer(lambda: list(target.mappings(0, 1 << 47)))
        arrays, arrays_seconds = answer(lambda: target.runs(0, 1 << 47))
        rows, ps_seconds = answer(reader.process_rows)
    assert max(seconds, map_seconds, arrays_seconds, ps_seconds) < SECONDS
    assert not isinstance(runs, VmiError) and not isinstance(rows, VmiError)
    assert arrays == [(m.vaddr, m.paddr, m.size, m.writable, m.user, m.nx) for m in runs]
    frames = {m.vaddr + off: m.paddr + off for m in runs for off in range(0, m.size, 0x1000)
              if m.vaddr + off in (X86_64_DATA_VA, X86_64_DATA_VA + 0x1000)}  # fmt: skip
    assert frames == {X86_64_DATA_VA: leaf.table, X86_64_DATA_VA + 0x1000: ram_end + (64 << 20)}
    # What the guest's tables say, shown as such: the page *is* its page table now.
    assert walk.translation is not None and walk.translation.paddr == leaf.table
    assert read == table_bytes != MARKER
    assert isinstance(fault, PageFault) and "outside guest RAM" in str(fault)
    assert fault.level == "PT"
    assert padded == bytes(16)


# -- hostile strings ------------------------------------------------------------------------


def test_html_and_terminal_escapes_in_names_are_rendered_inert(
    writer: Session, reader: Session, guest
) -> None:
    t = task_layout(writer.profile)
    mml = mm_layout(writer.profile)
    pid = guest.truth().marker_pid
    argv = SCRIPT + b"\0" + TITLE + b"\0" + CLEAR + b"\0"
    with tampered(writer) as tamper:
        by = tasks_by_comm(writer)
        tamper.kernel(by["sleep"].address + t.comm, SCRIPT[:16])  # no NUL: all 16 bytes
        tamper.kernel(by["cat"].address + t.comm, TITLE + CLEAR + b"\0")
        # The marker's arguments move to its data page (unused past 0x80).
        marker_mm = by["vmi-marker"].mm
        proc = writer.process(pid)
        area = X86_64_DATA_VA + 0x200
        tamper.write(proc.translate(area).paddr, argv)
        tamper.pointer(marker_mm + mml.arg_start, area)
        tamper.pointer(marker_mm + mml.arg_end, area + len(argv))

        frame, seconds = answer(reader.processes)
        rows = reader.process_rows()
    assert seconds < SECONDS
    comms = {r.pid: r.comm for r in rows}
    marker_row = next(r for r in rows if r.pid == pid)
    assert SCRIPT[:16].decode() in comms.values()  # the data is the guest's, unchanged
    assert marker_row.cmdline == " ".join(a.decode() for a in (SCRIPT, TITLE, CLEAR))

    texts = [safe_cell(r.comm) for r in rows] + [safe_cell(marker_row.cmdline)]
    texts.append(safe_text(frame.to_string()))
    for text in texts:
        assert "\x1b" not in text and "\x07" not in text
    page = html.escape(marker_row.cmdline) + frame.to_html()
    assert "<script>" not in page
    shown = guest_frame(frame)
    assert "<script>" not in shown._repr_html_()
    assert "\x1b" not in repr(shown)


def test_a_task_whose_cred_is_gone_is_marked_not_shown_as_root(
    writer: Session, reader: Session
) -> None:
    t = task_layout(writer.profile)
    with tampered(writer) as tamper:
        sleep = tasks_by_comm(writer)["sleep"]
        off = t.real_cred if t.real_cred is not None else t.cred
        assert off is not None
        tamper.pointer(sleep.address + off, 0xFFFF_FFFF_FFFF_F000)
        rows, seconds = answer(reader.process_rows)
    assert seconds < SECONDS
    row = next(r for r in rows if r.comm == "sleep")
    assert row.uid == -1 and row.error and "cred" in row.error


def test_the_guest_keeps_running_after_being_restored(reader: Session, guest) -> None:
    from vmishell.lab.workload import layout

    lay = layout("x86_64")
    proc = reader.process(guest.truth().marker_pid)
    first = proc.read(lay.counter_va, 8)
    time.sleep(2.2)
    reader.refresh()
    assert proc.read(lay.counter_va, 8) != first
