"""%watch in a real IPython shell over a synthetic kernel's Session: fields streamed by type,
re-running a watch replaces the old one, --list and --stop-all."""

from __future__ import annotations

import time

import pytest

from tests.support.profiles import kernel
from tests.unit.test_search import BASE, _frames, _process
from vmishell.session import Session


@pytest.fixture
def synthetic(ip):
    k = kernel("6.1")
    frames = _frames(k, 1)
    _process(k, 100, "victim", frames)
    k.write(frames[0], (0x56B).to_bytes(8, "little"))
    session = Session(k.source(), k.profile, name="synthetic")
    magics = ip.magics_manager.registry["VmiMagics"]
    previous, opener = magics.attached._current, magics.attached._open
    magics.attached._open = lambda spec, **kw: session
    try:
        target = magics.attached.attach("synthetic", name="synthetic")
        yield k
        magics.attached.detach(target.name)
    finally:
        magics.attached._open = opener
        magics.attached._current = previous if previous in magics.attached.names() else None


def test_fields_stream_their_decoded_values(cell, synthetic) -> None:
    r = cell("w = %watch task_struct.cred->uid task_struct.comm -p 100 --every 0.05 --count 2")
    assert r.success, r.output
    assert "task_struct.comm = 'victim'" in r.output
    assert "task_struct.cred->uid = 0" in r.output


def test_rerunning_a_watch_replaces_the_old_one_and_list_and_stop_all(ip, cell, synthetic) -> None:
    from vmishell.frontends.watch import Watcher

    magics = ip.magics_manager.registry["VmiMagics"]
    target = magics.attached.get("synthetic")
    process = target.session.process(100)
    first = Watcher(process, BASE, 8, every=0.05).start()
    magics.attached.add_watcher(target, first)
    second = Watcher(process, BASE, 8, every=0.05).start()
    replaced = magics.attached.add_watcher(target, second)
    assert replaced == [first] and not first.running and second.running
    assert "replaced" in first.stopped_because
    listed = cell("%watch --list").value
    assert list(listed.watch) == ["0x600000"] and list(listed.running) == [True]
    r = cell("%watch --stop-all")
    assert "stopped 1 watch" in r.output
    deadline = time.monotonic() + 5
    while second.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not second.running


def test_as_u64_streams_whole_values(cell, synthetic) -> None:
    r = cell(f"w = %watch {BASE:#x} 8 -p 100 --as u64 --every 0.05 --count 1")
    assert r.success, r.output
    assert "as u64" in cell("w.status()").value


def test_diff_magic_takes_a_snapshot_then_compares(ip, cell, synthetic) -> None:
    r = cell("snap = %diff")
    assert r.success, r.output
    synthetic.task(300, "newcomer", mm=synthetic.mm(argv=("newcomer",)), start_boottime=9)
    df = cell("%diff snap").value
    assert [(r.kind, r.change, r.pid) for r in df.itertuples()] == [("process", "appeared", 300)]
