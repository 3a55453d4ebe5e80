"""Session.watch on synthetic kernels: fields through pointers followed on every sample,
values decoded by type, stop conditions, a bounded history; and the byte-range Watcher's
values at the watched width."""

from __future__ import annotations

import pytest

from tests.support.kernel import Obj
from tests.support.profiles import kernel
from tests.unit.test_search import BASE, _frames, _process
from vmishell.errors import VmiError
from vmishell.frontends.watch import Watcher
from vmishell.monitor import changes, equals, outside
from vmishell.monitor.targets import WatchTargetError
from vmishell.session import Session


@pytest.fixture
def guest():
    k = kernel("6.1")
    frames = _frames(k, 1)
    _process(k, 100, "victim", frames)
    task = k.leaders[-1]
    return k, task, frames[0], Session(k.source(), k.profile)


def _cred(k, task) -> Obj:
    va = task.obj.get("cred")
    return Obj(k, va, k.pa_of(va), "cred")


def test_several_targets_are_decoded_by_their_types(guest) -> None:
    k, task, frame, s = guest
    _cred(k, task).set("uid", 1000)
    k.write(frame, (0x56B).to_bytes(8, "little"))
    w = s.watch("task_struct.cred->uid", "task_struct.comm", f"{BASE:#x}", pid=100, every=0)
    w.poll()
    assert w.current == {
        "task_struct.cred->uid": 1000,
        "task_struct.comm": "victim",
        "0x600000": 0x56B,
    }


def test_a_new_cred_is_followed_and_the_change_logged(guest) -> None:
    """commit_creds() installs another cred: the pointer is read again on every sample."""
    k, task, _, s = guest
    _cred(k, task).set("uid", 1000)
    w = s.watch("task_struct.cred->uid", pid=100, every=0)
    w.poll()
    root = k.new("cred")
    root.set("uid", 0)
    task.obj.set("cred", root.va)
    w.poll()
    h = w.history
    assert list(zip(h.target, h.old, h.new, strict=True)) == [("task_struct.cred->uid", 1000, 0)]
    assert list(h.address) == [root.addr("uid")]


def test_stop_conditions_end_the_watch_and_say_why(guest) -> None:
    k, task, frame, s = guest
    cred = _cred(k, task)
    cred.set("uid", 1000)
    w = s.watch("task_struct.cred->uid", pid=100, every=0, count=50, until=equals(0))
    w.on_sample(lambda _w, smp: cred.set("uid", 0) if smp.index == 2 else None)
    w.run()
    assert w.samples == 4 and w.stopped_because == "task_struct.cred->uid equals 0"
    w = s.watch(f"{BASE:#x}", pid=100, every=0, count=50, until=outside(0, 10))
    w.on_sample(lambda _w, smp: k.write(frame, (smp.index * 4).to_bytes(8, "little")))
    w.run()
    assert w.current == {"0x600000": 12} and "left [0, 10]" in w.stopped_because
    w = s.watch(
        "task_struct.comm", pid=100, every=0, count=50, until={"task_struct.comm": changes()}
    )
    w.on_sample(lambda _w, smp: task.obj.set("comm", "renamed") if smp.index == 5 else None)
    w.run()
    assert w.samples == 7 and w.current["task_struct.comm"] == "renamed"


def test_history_is_bounded_and_counts_what_it_dropped(guest) -> None:
    k, _, frame, s = guest
    w = s.watch(f"{BASE:#x}", pid=100, every=0, count=20, history=5)
    w.on_sample(lambda _w, smp: k.write(frame, (smp.index + 1).to_bytes(8, "little")))
    w.run()
    assert len(w.history) == 5 and w.dropped == 14
    assert list(w.history.new) == [15, 16, 17, 18, 19]  # 19 changes, the last 5 kept
    assert "14 older dropped" in w.status()


def test_as_views_and_bad_targets(guest) -> None:
    k, _, frame, s = guest
    k.write(frame, (-5).to_bytes(4, "little", signed=True))
    w = s.watch(f"{BASE:#x}", pid=100, view="i32", every=0)
    w.poll()
    assert w.current == {"0x600000": -5}
    with pytest.raises(WatchTargetError, match="no field"):
        s.watch("task_struct.nonexistent", pid=100)
    with pytest.raises(WatchTargetError, match="needs an instance"):
        s.watch("cred.uid", pid=100)
    with pytest.raises(WatchTargetError, match="--as"):
        s.watch(f"{BASE:#x}", pid=100, view="u128")
    with pytest.raises(VmiError, match="unknown targets"):
        s.watch("task_struct.comm", pid=100, until={"other": equals(1)})


def test_a_byte_watch_logs_whole_values_at_the_watched_width(guest) -> None:
    """Issue 20: 0x56b -> 0x56c is one u64 change, not the low byte 0x6b -> 0x6c."""
    k, _, frame, s = guest
    k.write(frame, (0x56B).to_bytes(8, "little"))
    p = s.process(100)
    w = Watcher(p, BASE, 16, every=0.05, view="u64", refresh=lambda: None)
    w.poll()
    k.write(frame, (0x56C).to_bytes(8, "little") + (7).to_bytes(8, "little"))
    w.poll()
    h = w.history
    assert list(zip(h.address, h.old_value, h.new_value, strict=True)) == [
        (BASE, 0x56B, 0x56C),
        (BASE + 8, 0, 7),
    ]
    w8 = Watcher(p, BASE, 8, every=0.05, refresh=lambda: None)  # 8 bytes: u64 by default
    assert w8.view == "u64"
    with pytest.raises(VmiError, match="whole u64"):
        Watcher(p, BASE, 12, view="u64")


def test_the_field_watch_widget_carries_a_snapshot_of_its_values_and_changes(guest) -> None:
    """Without a widget front end, or in a saved notebook, the last values still show."""
    from vmishell.monitor.view import FieldWatchView

    k, task, _, s = guest
    _cred(k, task).set("uid", 1000)
    task.obj.set("comm", b"<b>x</b>")
    w = s.watch("task_struct.cred->uid", "task_struct.comm", pid=100, every=0)
    view = FieldWatchView(w)
    w.poll()
    _cred(k, task).set("uid", 0)
    w.poll()
    bundle = view._repr_mimebundle_()
    assert "Snapshot of this widget" in bundle["text/plain"]
    assert "task_struct.cred-&gt;uid" in bundle["text/html"]
    assert "<b>x</b>" not in bundle["text/html"], "guest text is escaped"
    assert "1000" in bundle["text/plain"] and "task_struct.comm" in bundle["text/plain"]
