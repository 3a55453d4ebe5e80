"""Live truth and lifecycle on a real guest: what a session says while the guest changes,
reboots and dies.

One guest of its own (started so that a reset boots it again, and stopped at
the end), because these tests rewrite a page-table entry, reset the guest and
finally kill its QEMU. They run in file order: attach errors, remap, close,
truncation (while RAM holds one kernel), reset, death.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import lab_unavailable
from vmishell.errors import (
    LabError,
    ProfileError,
    SessionClosed,
    SourceError,
    StaleObjectError,
    TargetEnded,
    VmiError,
)
from vmishell.frontends.targets import Targets
from vmishell.frontends.watch import Watcher
from vmishell.lab import runner
from vmishell.lab.truth import GroundTruth, parse_truth
from vmishell.session import Session

pytestmark = pytest.mark.lab

MARKER = b"VMISHELL-MARKER-"
BOOT_LINE = "@@vmi boot init-started"


@pytest.fixture(scope="module")
def guest() -> Iterator[runner.RunningGuest]:
    name = f"t-{os.getpid()}-lifecycle"
    try:
        running = runner.up("x86_64", name, reboot=True, timeout=240)
    except VmiError as exc:
        lab_unavailable(f"x86_64 (reboot): {exc}")
        raise AssertionError("unreachable") from exc
    yield running
    runner.down(name)


def boots(g: runner.RunningGuest) -> list[str]:
    """The serial log cut into one text per boot."""
    text = g.serial_log.read_text(errors="replace")
    return [BOOT_LINE + part for part in text.split(BOOT_LINE)[1:]]


def truth_of_boot(g: runner.RunningGuest, index: int, timeout: float = 180) -> GroundTruth:
    deadline = time.monotonic() + timeout
    while True:
        texts = boots(g)
        if len(texts) > index and "@@vmi ready" in texts[index]:
            return parse_truth(texts[index], f"boot {index} of {g.name}")
        if time.monotonic() > deadline:
            pytest.fail(f"boot {index} of {g.name} did not finish in {timeout} s")
        time.sleep(0.5)


def slide(s: Session, truth: GroundTruth) -> int:
    return truth.symbols["init_task"] - s.profile.symbol_address("init_task")


def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout} s")
        time.sleep(0.2)


def one_line(exc: VmiError) -> str:
    lines = exc._render_traceback_()
    assert len(lines) == 1, lines
    return lines[0]


# -- attach errors ------------------------------------------------------------------------


def test_attaching_with_a_missing_profile_says_so_whatever_the_spelling(guest) -> None:
    for target in (f"lab:{guest.name}", guest.name):
        with pytest.raises(ProfileError, match="no-such-profile") as info:
            Session.attach(target, profile="/nonexistent/no-such-profile.json")
        assert "neither a file" not in str(info.value)


def test_a_name_that_is_nothing_says_what_targets_exist() -> None:
    with pytest.raises(SourceError, match="neither a file nor a lab instance") as info:
        Session.attach("no-such-instance-anywhere")
    assert "no lab instance named" in str(info.value.__cause__)


# -- live truth ---------------------------------------------------------------------------


def test_a_held_process_reads_a_page_where_the_guest_remapped_it(guest) -> None:
    """The kernel moves one page of the marker onto another frame (as migration or
    copy-on-write would): the next read of the same Process object follows it."""
    truth = truth_of_boot(guest, 0)
    s = Session.attach(f"lab:{guest.name}")
    p = s.process(truth.marker_pid)
    page = truth.marker_va & ~0xFFF
    assert p.read(truth.marker_va, 16) == MARKER
    assert p.read(truth.marker_va, 16) == MARKER  # every cache warm
    leaf = p.walk(page).steps[-1]
    other = next(m.vaddr for m in p.mappings() if m.vaddr != page and p.read(m.vaddr, 16) != MARKER)
    other_frame = p.translate(other).paddr & ~0xFFF
    expected = s.source.read(other_frame + (truth.marker_va - page), 16)
    fd = os.open(guest.ram_path, os.O_RDWR)
    try:
        with guest.qmp() as q:
            q.stop()  # the guest must not write through the swapped entry meanwhile
        moved = (leaf.entry & ~0x000F_FFFF_FFFF_F000) | other_frame
        os.pwrite(fd, moved.to_bytes(8, "little"), leaf.entry_address)
        try:
            assert p.translate(truth.marker_va).paddr & ~0xFFF == other_frame
            assert p.read(truth.marker_va, 16) == expected != MARKER
            with s.cached():  # explicit caches: the first read fills them, later ones reuse
                assert p.read(truth.marker_va, 16) == expected
        finally:
            os.pwrite(fd, leaf.entry.to_bytes(8, "little"), leaf.entry_address)
            with guest.qmp() as q:
                q.cont()
    finally:
        os.close(fd)
    assert p.read(truth.marker_va, 16) == MARKER
    s.close()


def test_closing_a_session_unmaps_the_guests_ram(guest) -> None:
    truth = truth_of_boot(guest, 0)
    s = Session.attach(f"lab:{guest.name}")
    p = s.process(truth.marker_pid)
    history = [s.processes(), p, s]  # what IPython's Out would keep alive
    assert str(guest.ram_path) in Path("/proc/self/maps").read_text()
    s.close()
    assert str(guest.ram_path) not in Path("/proc/self/maps").read_text()
    with pytest.raises(SessionClosed, match="is closed") as info:
        p.read(truth.marker_va, 16)
    assert "closed" in one_line(info.value)
    with pytest.raises(SessionClosed):
        s.processes()
    assert s.state == "closed" and history


def test_a_ram_file_truncated_under_a_session_gives_an_error_not_a_crash(
    guest, tmp_path: Path
) -> None:
    copy = tmp_path / "ram-copy"
    shutil.copyfile(guest.ram_path, copy)
    script = f"""
import os
from vmishell.errors import VmiError
from vmishell.session import Session
s = Session.qemu({str(copy)!r})
assert len(s.processes()) > 10
p = s.process(0)
os.truncate({str(copy)!r}, 1 << 20)
for call in (s.processes, lambda: p.read(s.guest.symbol("linux_banner"), 64)):
    try:
        call()
        print("no error")
    except VmiError as exc:
        print(type(exc).__name__, exc)
"""
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("TargetEnded") for line in lines), lines
    assert "shrank" in lines[0]


# -- reboot -------------------------------------------------------------------------------


def test_a_reset_guest_is_followed_by_the_same_session_and_old_objects_refuse(guest) -> None:
    first = truth_of_boot(guest, 0)
    s = Session.attach(f"lab:{guest.name}")  # hears QEMU's RESET event
    plain = Session.qemu(guest.ram_path, guest.qmp_path)  # no events: watches the kernel's ticks
    assert s.source.resets == 0 and plain.source.resets is None
    assert s.guest.location.virtual_shift == slide(s, first)
    old_marker = s.process(first.marker_pid)
    old_kernel = plain.process(0)
    watch = Watcher(old_marker, first.counter_va, 8, every=0.1).start()
    until(lambda: watch.samples >= 2, 30, "the watch did not sample")

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")  # the watch's thread may be the first to notice
        with guest.qmp() as q:
            q.command("system_reset")
        second = truth_of_boot(guest, 1)
        for session in (s, plain):

            def followed(session: Session = session) -> bool:
                with contextlib.suppress(VmiError):  # GuestRebooting until the kernel is found
                    session.processes()
                return session.boot == 1

            until(followed, 60, f"{session.name} did not follow the reboot")
    for session in (s, plain):
        assert session.guest.location.virtual_shift == slide(session, second)
        told = [str(w.message) for w in said if str(w.message).startswith(session.name)]
        assert len(told) == 1 and "rebooted" in told[0], told
        assert len(session.events) == 1 and "kernel located again" in session.events[0]
        df = session.processes()
        assert second.marker_pid in set(df.pid)
        assert session.state == "rebooted"

    with pytest.raises(StaleObjectError, match="taken before") as info:
        old_marker.read(first.marker_va, 16)
    assert "process(" in one_line(info.value)
    with pytest.raises(StaleObjectError):
        old_kernel.read(plain.symbol("linux_banner"), 16)
    assert watch.wait(10)
    assert "StaleObjectError" in (watch.stopped_because or "")
    fresh = s.process(second.marker_pid)
    assert fresh.read(second.marker_va, 16) == MARKER
    s.close()
    plain.close()


# -- death --------------------------------------------------------------------------------


def test_a_guest_whose_qemu_ends_raises_on_every_call_and_stops_its_watch(guest) -> None:
    truth = truth_of_boot(guest, len(boots(guest)) - 1)
    s = Session.attach(f"lab:{guest.name}")
    plain = Session.qemu(guest.ram_path, guest.qmp_path)
    p = s.process(truth.marker_pid)
    q = plain.process(truth.marker_pid)
    watch = Watcher(p, truth.counter_va, 8, every=0.1).start()
    until(lambda: watch.samples >= 2, 30, "the watch did not sample")
    before = time.time()
    os.kill(guest.pid, signal.SIGKILL)
    # The end is noticed at the first call after the kernel reports it (microseconds
    # to milliseconds after the kill, by the pidfd or the closed event socket).
    until(lambda: s.poll() == "ended" and plain.poll() == "ended", 10, "the end went unseen")
    for call in (
        s.processes,
        lambda: p.read(truth.marker_va, 16),
        plain.processes,
        lambda: q.read(truth.marker_va, 16),
    ):
        with pytest.raises(TargetEnded) as info:
            call()
        assert "ended at" in one_line(info.value)
        assert info.value.when <= time.time() and info.value.when >= before - 1
    assert watch.wait(10)
    assert (watch.stopped_because or "").startswith("TargetEnded")
    assert s.state == "ended" and plain.state == "ended"
    targets = Targets(lambda spec, **_: s)
    targets.attach(f"lab:{guest.name}")
    assert list(targets.frame()["state"]) == ["ended"]
    s.close()
    plain.close()
    for target in (f"lab:{guest.name}", guest.name):
        with pytest.raises(LabError, match="is not running") as gone:
            Session.attach(target)
        assert "neither a file" not in str(gone.value)
