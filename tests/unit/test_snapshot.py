"""Snapshots and their diff on synthetic kernels: a new process, a uid that became 0, a new
writable-and-executable mapping, a changed executable page; saved and loaded as data."""

from __future__ import annotations

import gzip

import pytest

from tests.support.kernel import Obj
from tests.support.profiles import kernel
from tests.unit.test_search import BASE, PAGE, _frames, _process
from vmishell.errors import GuestDataError, VmiError
from vmishell.limits import Limits
from vmishell.monitor.snapshot import Snapshot
from vmishell.session import Session


@pytest.fixture
def guest():
    k = kernel("6.1")
    frames = _frames(k, 2)
    mm = _process(k, 100, "daemon", frames, path="/usr/lib/libc.so.6")
    return k, mm, frames, Session(k.source(), k.profile)


def _facts(df) -> set[tuple]:
    return {(r.kind, r.change, r.pid, r.field, r.note) for r in df.itertuples()}


def test_nothing_changed_is_an_empty_diff(guest) -> None:
    _, _, _, s = guest
    snap = s.snapshot(hashes=True)
    assert s.diff(snap).empty


def test_a_new_process_and_a_uid_that_became_root(guest) -> None:
    k, _, _, s = guest
    daemon = k.leaders[0]
    va = daemon.obj.get("cred")
    Obj(k, va, k.pa_of(va), "cred").set("uid", 1000)
    snap = s.snapshot()
    root = k.new("cred")
    root.set("uid", 0).set("euid", 0)
    daemon.obj.set("real_cred", root.va).set("cred", root.va)
    k.task(200, "intruder", mm=k.mm(argv=("intruder",)), start_boottime=5)
    facts = _facts(s.diff(snap))
    assert ("process", "appeared", 200, "", "") in facts
    assert ("process", "changed", 100, "uid", "became root") in facts


def test_a_new_rwx_mapping_and_a_changed_executable_page(guest) -> None:
    k, mm, frames, s = guest
    # The library mapping is r-x: make it so, then take the baseline with page hashes.
    lib = mm.vmas[0]
    lib.set("vm_flags", 0x1 | 0x4)  # VM_READ | VM_EXEC
    snap = s.snapshot(hashes=True)
    assert len(snap.hashes) == 2
    k.write(frames[1] + 0x10, b"\xcc\xcc")  # a patched instruction
    rwx_frame = _frames(k, 1)[0]
    mm.space.map(0x7000000, rwx_frame)
    shellcode = k.vma(mm, 0x7000000, 0x7000000 + PAGE, flags=0x1 | 0x2 | 0x4)
    k.set_vmas(mm, [lib, shellcode])
    df = s.diff(snap, s.snapshot(hashes=True))
    facts = _facts(df)
    assert ("mapping", "appeared", 100, "", "writable and executable") in facts
    assert ("page", "changed", 100, "sha256", "executable page changed") in facts
    page = df[df.kind == "page"].iloc[0]
    assert f"at {BASE + PAGE:#x}" in page.what


def test_snapshots_save_and_load_as_data(guest, tmp_path) -> None:
    _, _, _, s = guest
    snap = s.snapshot(hashes=True)
    path = tmp_path / "snap.json.gz"
    snap.save(path)
    again = Snapshot.load(path)
    assert again == snap
    assert s.diff(path).empty
    bad = tmp_path / "bad.json.gz"
    with gzip.open(bad, "wt") as f:
        f.write('{"format": "something else"}')
    with pytest.raises(VmiError, match="not a vmishell snapshot"):
        Snapshot.load(bad)
    with pytest.raises(VmiError, match="not a vmishell snapshot"):
        Snapshot.load(tmp_path)


def test_snapshot_rows_are_bounded(guest) -> None:
    k, _, _, _ = guest
    s = Session(k.source(), k.profile, limits=Limits(max_snapshot_rows=2))
    with pytest.raises(GuestDataError, match=r"Limits\.max_snapshot_rows"):
        s.snapshot()
