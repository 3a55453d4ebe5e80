"""A fleet sweep on a local Dask cluster of separate worker processes equals plain Sessions.

Targets: two live x86_64 guests (the session's x86_64 guest, and one more
instance booted as a lab fleet of one, running fleet scenario 1), a raw and
an ELF dump of the first, a garbage image, and a FIFO that blocks any
attach forever. The two broken targets are rows of the errors frame; every
other target's rows equal what a plain Session answers for it.
"""

from __future__ import annotations

import os
import shutil

import pandas as pd
import pytest

from vmishell import errors
from vmishell.errors import VmiError
from vmishell.fleet import Fleet
from vmishell.lab.fleet import comm_of, up_fleet
from vmishell.lab.runner import down
from vmishell.session import Session

pytestmark = pytest.mark.lab

#: Per-target timeout of these sweeps: the FIFO target costs one worker this long.
HANG_SECONDS = 30.0
#: Columns of a live guest's user processes that do not change while it idles.
STABLE = ["pid", "tgid", "ppid", "comm", "uid", "gid", "start_time", "cmdline"]


def _plain(df: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(df).reset_index(drop=True)


@pytest.fixture(scope="module")
def client():
    """A LocalCluster of two single-thread worker processes, as `Fleet()` starts by default."""
    from vmishell.fleet.cluster import connect

    dask_client, cluster = connect(n_workers=2)
    yield dask_client
    dask_client.close()
    cluster.close()


@pytest.fixture(scope="module")
def second(x86_64_guest, lab_pool):
    """One more x86_64 instance, booted as `lab up x86_64 --count 1` does (scenario 1)."""
    try:
        [guest] = up_fleet("x86_64", f"{lab_pool.prefix}-fleet", 1, timeout=240)
    except VmiError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"lab fleet instance unavailable under CI: {exc}", pytrace=False)
        pytest.skip(f"lab fleet instance unavailable: {exc}")
    yield guest
    down(guest.name)


@pytest.fixture(scope="module")
def images(x86_64_guest, tmp_path_factory):
    """Raw and ELF dumps of the x86_64 guest, a garbage copy and a FIFO nobody writes."""
    where = tmp_path_factory.mktemp("fleet")
    raw = x86_64_guest.dump(where / "guest.raw", "raw")
    elf = x86_64_guest.dump(where / "guest.elf", "elf")
    garbage = where / "garbage.raw"
    garbage.write_bytes(bytes(range(256)) * 4096)  # 1 MiB, no kernel anywhere
    hang = where / "hang.raw"
    os.mkfifo(hang)
    yield {"raw": raw, "elf": elf, "garbage": garbage, "hang": hang}
    shutil.rmtree(where, ignore_errors=True)


@pytest.fixture(scope="module")
def sweep(client, x86_64_guest, second, images):
    """`processes()` over the whole mix, once (the FIFO first: it holds a worker longest)."""
    targets = [
        str(images["hang"]),
        f"lab:{x86_64_guest.name}",
        f"lab:{second.name}",
        str(images["raw"]),
        str(images["elf"]),
        str(images["garbage"]),
    ]
    fleet = Fleet(targets, client=client, timeout=HANG_SECONDS, progress=False)
    fleet.warm()
    frame = fleet.processes()
    return fleet, frame


def test_the_workers_are_separate_processes_with_a_dashboard(client) -> None:
    from vmishell.fleet.cluster import dashboard_link

    pids = client.run(os.getpid)
    assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()
    assert (dashboard_link(client) or "").startswith("http://")


def test_images_answer_exactly_what_a_plain_session_answers(sweep, images) -> None:
    _, frame = sweep
    for kind in ("raw", "elf"):
        target = str(images[kind])
        got = frame[frame.target == target].drop(columns="target")
        with Session.attach(target) as s:
            expected = s.processes()
        pd.testing.assert_frame_equal(_plain(got), _plain(expected))


def test_live_guests_answer_what_a_plain_session_answers(sweep, x86_64_guest, second) -> None:
    _, frame = sweep
    for guest in (x86_64_guest, second):
        target = f"lab:{guest.name}"
        got = frame[(frame.target == target) & ~frame.kernel_thread][STABLE]
        with Session.attach(target) as s:
            expected = s.processes()
        expected = expected[~expected.kernel_thread][STABLE]
        pd.testing.assert_frame_equal(_plain(got), _plain(expected))


def test_each_live_guest_runs_its_own_scenario(sweep, x86_64_guest, second) -> None:
    _, frame = sweep
    fleet_comm = frame[frame.comm == comm_of(1)]
    assert fleet_comm.target.tolist() == [f"lab:{second.name}"]


def test_the_broken_targets_are_rows_of_the_errors_frame(sweep, images) -> None:
    fleet, frame = sweep
    errs = fleet.errors.set_index("target")
    assert sorted(errs.index) == sorted([str(images["hang"]), str(images["garbage"])])
    assert errs.loc[str(images["hang"]), "error_type"] == "TargetTimeout"
    broken = errs.loc[str(images["garbage"]), "error_type"]
    assert issubclass(getattr(errors, broken), VmiError) and broken != "TargetTimeout"
    assert not frame.target.isin(errs.index).any()
    assert set(frame.target) == {t.spec for t in fleet.targets} - set(errs.index)


def test_maps_by_comm_equal_the_plain_session_and_a_missing_comm_is_an_error(
    client, x86_64_guest, second
) -> None:
    a, b = f"lab:{x86_64_guest.name}", f"lab:{second.name}"
    fleet = Fleet([a, b], client=client, timeout=120, progress=False)
    got = fleet.maps(comm_of(1))
    assert set(got.target) == {b}
    assert fleet.errors.target.tolist() == [a]
    assert fleet.errors.error_type.tolist() == ["GuestDataError"]
    with Session.attach(b) as s:
        pid = int(s.processes().query("comm == @comm_of(1)").pid.iloc[0])
        expected = s.process(pid).maps()
    pd.testing.assert_frame_equal(
        _plain(got.drop(columns=["target", "pid", "comm"])), _plain(expected)
    )


def test_snapshots_and_diffs_per_target(client, images) -> None:
    targets = [str(images["raw"]), str(images["elf"])]
    fleet = Fleet(targets, client=client, timeout=120, progress=False)
    before = fleet.snapshot()
    assert sorted(before) == sorted(targets)
    with Session.attach(targets[0]) as s:
        assert before[targets[0]].processes == s.snapshot().processes
    changes = fleet.diff(before)
    assert len(changes) == 0 and len(fleet.errors) == 0


def test_a_worker_that_dies_loses_only_its_target_which_is_retried_then_reported(
    client, images
) -> None:
    raw, elf = str(images["raw"]), str(images["elf"])

    def count_or_die(session):
        import os
        import signal

        if session.name == elf:  # the sandbox's parent is the worker: kill it, every time
            os.kill(os.getppid(), signal.SIGKILL)
        return {"tasks": len(session.tasks())}

    fleet = Fleet([raw, elf], client=client, timeout=120, progress=False)
    got = fleet.run(count_or_die)
    with Session.attach(raw) as s:
        assert got.values.tolist() == [[raw, len(s.tasks())]]
    assert fleet.errors.target.tolist() == [elf]
    assert fleet.errors.error_type.tolist() == ["WorkerLost"]
    client.wait_for_workers(2, timeout=120)


def test_the_cli_and_the_magic_sweep_on_an_existing_scheduler(client, images, capsys) -> None:
    from IPython.core.interactiveshell import InteractiveShell

    from vmishell.cli import main
    from vmishell.fleet.magic import load

    raw, garbage = str(images["raw"]), str(images["garbage"])
    address = client.scheduler.address
    code = main(["fleet", "ps", raw, garbage, "--scheduler", address, "--json", "-q"])
    out = capsys.readouterr()
    assert code == 0
    assert '"target": "' + raw in out.out and garbage in out.err
    shell = InteractiveShell.instance()
    magics = load(shell)
    try:
        df = shell.run_line_magic("fleet", f"ps -n sleep --scheduler {address} {raw}")
        with Session.attach(raw) as s:
            expected = s.processes()
        assert df.pid.tolist() == expected[expected.comm == "sleep"].pid.tolist()
        assert set(df.target) == {raw}
    finally:
        magics.close()
        shell.magics_manager.registry.pop("FleetMagics", None)
        shell.magics_manager.magics["line"].pop("fleet", None)
