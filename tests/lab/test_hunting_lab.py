"""Search, watch, snapshot and diff on a live x86_64 lab guest, checked against the guest's
own ground truth: the marker where its maps and pagemap put it, and the facts a scenario
(vmishell.lab.hunting, stepped from the serial console) changes after a snapshot."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.conftest import lab_unavailable
from vmishell.errors import VmiError
from vmishell.lab import runner
from vmishell.lab.hunting import HUNT_UID, RWX_CODE, RWX_VA, hunt_lines, send, write_scenario
from vmishell.lab.workload import MARKER, layout
from vmishell.search import META_KEY
from vmishell.session import Session

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[runner.RunningGuest]:
    name = f"t-{os.getpid()}-hunt"
    script = write_scenario(tmp_path_factory.mktemp("hunt") / "scenario.sh")
    try:
        running = runner.up("x86_64", name, init_script=script, timeout=240)
    except VmiError as exc:
        lab_unavailable(f"x86_64 (hunting scenario): {exc}")
        raise AssertionError("unreachable") from exc
    yield running
    runner.down(name)


@pytest.fixture(scope="module")
def session(guest) -> Iterator[Session]:
    s = Session.lab(guest.name)
    yield s
    s.close()


def _step(guest: runner.RunningGuest, word: str) -> list[str]:
    return send(guest.run_dir / "serial.sock", guest.serial_log, word)


def _hunt_pid(guest: runner.RunningGuest) -> int:
    return next(int(w[1]) for w in hunt_lines(guest.serial_log) if w[0] == "pid")


def test_the_marker_is_found_in_exactly_the_marker_process(guest, session) -> None:
    truth = guest.truth()
    hits = session.search(MARKER)
    assert list(zip(hits.pid, hits.vaddr, hits.paddr, strict=True)) == [
        (truth.marker_pid, layout("x86_64").marker_va, truth.marker_paddr)
    ]
    row = hits.iloc[0]
    assert row.path == "/bin/vmi-marker" and row.perms.startswith("rw")
    assert row.file_offset == 0x1000  # the data page sits at file offset 0x1000
    # The same bytes as YARA and as hex with a wildcard find the same place.
    rule = f'rule M {{ strings: $m = "{MARKER.decode()}" condition: $m }}'
    assert list(session.search(rule, kind="yara").vaddr) == [row.vaddr]
    hexed = " ".join(f"{b:02x}" for b in MARKER[:8]) + " ?? " + MARKER[9:12].hex(" ")
    assert row.vaddr in set(session.search(hexed, kind="hex").vaddr)


def test_physical_search_maps_the_marker_frame_back_to_its_process(guest, session) -> None:
    truth = guest.truth()
    hits = session.physical.search(MARKER)
    at = hits[hits.paddr == truth.marker_paddr]
    assert truth.marker_pid in set(at.pid)
    assert hits.attrs[META_KEY]["scanned_bytes"] >= guest.ram_size


def test_a_watch_of_fields_samples_the_ticking_counter(guest, session) -> None:
    truth = guest.truth()
    counter = f"{layout('x86_64').counter_va:#x}"
    w = session.watch(counter, "task_struct.comm", pid=truth.marker_pid, every=0.25, count=240)
    seen = []  # stop after two ticks of the counter, however slowly the guest runs

    def two_ticks(watch, sample) -> None:
        seen.extend(sample.changes)
        if len(seen) >= 2:
            watch.stop("two ticks seen")

    w.on_sample(two_ticks)
    w.run()
    h = w.history
    assert len(h) >= 2 and set(h.target) == {counter}
    assert (h.new > h.old).all()  # a u64 counter that only goes up, compared whole
    assert w.current["task_struct.comm"] == "vmi-marker"


def test_diff_finds_a_new_process_a_uid_change_and_a_new_rwx_mapping(guest, session) -> None:
    hunt = _hunt_pid(guest)
    before = session.snapshot(hashes="vmi-hunt")
    assert before.frame("processes").set_index("pid").loc[hunt, "uid"] == 0
    spawned = next(int(line.split()[1]) for line in _step(guest, "hunt-spawn") if "spawned" in line)
    _step(guest, "hunt-rwx")
    _step(guest, "hunt-uid")
    df = session.diff(before)
    facts = {(r.kind, r.change, r.pid, r.field, r.note) for r in df.itertuples()}
    assert ("process", "appeared", spawned, "", "") in facts
    assert ("process", "changed", hunt, "uid", "") in facts
    uid = df[(df.pid == hunt) & (df.field == "uid")].iloc[0]
    assert (uid.old, uid.new) == (0, HUNT_UID)
    rwx = df[(df.kind == "mapping") & (df.pid == hunt)]
    assert [(r.change, r.note) for r in rwx.itertuples()] == [
        ("appeared", "writable and executable")
    ]
    assert f"{RWX_VA:#x}-{RWX_VA + 0x1000:#x} rwxp" in rwx.iloc[0].what
    # The injected code is in the new mapping (and, as an immediate, in vmi-hunt's text).
    hits = session.search(RWX_CODE, pids=[hunt])
    assert list(hits[hits.perms == "rwxp"].vaddr) == [RWX_VA]
