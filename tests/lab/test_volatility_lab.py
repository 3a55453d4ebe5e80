"""Volatility3 runs on vmishell targets, a live guest included, and agrees with the truth.

Volatility3 cannot open a running guest itself; through vmishell's data layer
its own automagic finds the kernel and its linux.pslist must list what the
guest's /proc listed at boot. On a dump it must agree with vmishell.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vmishell.interop.volatility import VolatilityError, run_plugin
from vmishell.session import Session

pytestmark = pytest.mark.lab

#: Volatility shows task_struct.comm: at most 15 characters.
COMM_MAX = 15


def _comparable(task) -> bool:
    """User processes and kernel threads, but no kworkers (they come and go)."""
    return task.pid == task.tgid and not task.comm.startswith("kworker/")


def test_pslist_on_a_live_guest_matches_its_own_process_list(x86_64_guest) -> None:
    truth = x86_64_guest.truth()
    with Session.lab(x86_64_guest.name) as s:
        assert s.live
        df = run_plugin(s, "linux.pslist")
    vol = {row.PID: (row.PPID, row.COMM) for row in df.itertuples()}
    for task in filter(_comparable, truth.processes):
        assert task.pid in vol, task
        ppid, comm = vol[task.pid]
        assert ppid == task.ppid, task
        assert task.comm.startswith(comm) and len(comm) == min(len(task.comm), COMM_MAX), task
    assert vol[truth.marker_pid][1] == "vmi-marker"


def test_pslist_on_a_dump_agrees_with_vmishell(x86_64_guest, tmp_path: Path) -> None:
    dump = x86_64_guest.dump(tmp_path / "x86_64.raw", "raw")
    with Session.image(dump) as s:
        df = run_plugin(s, "linux.pslist")
        ours = s.processes(threads=False)
    dump.unlink()
    vol = df[["PID", "PPID", "COMM"]].sort_values("PID").reset_index(drop=True)
    mine = ours[ours.pid != 0][["pid", "ppid", "comm"]].sort_values("pid").reset_index(drop=True)
    assert list(vol.PID) == list(mine.pid)
    assert list(vol.PPID) == list(mine.ppid)
    assert [c[:COMM_MAX] for c in mine.comm] == list(vol.COMM)


def test_plugin_options_pass_through_and_values_are_plain(x86_64_guest) -> None:
    truth = x86_64_guest.truth()
    with Session.lab(x86_64_guest.name) as s:
        df = run_plugin(s, "linux.pslist", ["--pid", str(truth.marker_pid)])
    assert list(df.PID) == [truth.marker_pid]
    assert type(df["OFFSET (V)"].iloc[0]).__name__ in ("int", "int64")


def test_errors_name_the_plugin(x86_64_guest) -> None:
    with Session.lab(x86_64_guest.name) as s:
        with pytest.raises(VolatilityError, match=r"no Volatility3 plugin named linux\.nothing"):
            run_plugin(s, "linux.nothing")
        with pytest.raises(VolatilityError, match=r"linux\.pslist: unknown option '--bogus'"):
            run_plugin(s, "linux.pslist", ["--bogus", "1"])


def test_the_callers_url_opener_is_back_after_a_plugin(x86_64_guest) -> None:
    """Volatility installs an offline URL opener for the whole process; a notebook's
    own HTTP (urllib) must still work after %vol."""
    import urllib.request

    mine = urllib.request.build_opener()
    urllib.request.install_opener(mine)
    try:
        with Session.lab(x86_64_guest.name) as s:
            run_plugin(s, "linux.pslist", ["--pid", "1"])
        assert urllib.request._opener is mine
    finally:
        urllib.request.install_opener(None)
