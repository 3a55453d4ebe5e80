"""The fleet's parts that need no cluster: targets, bounds, assembly, the sandbox's deadline.

The sandbox tests start a real child process (as a worker does) and give it
real files: a FIFO that no writer opens (an attach that blocks forever in
open()) and bytes that are no memory image.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pandas as pd
import pytest

from vmishell import errors
from vmishell.fleet.assemble import ERROR_COLUMNS, combine
from vmishell.fleet.bounds import Bounds, bound_frame
from vmishell.fleet.errors import FleetError
from vmishell.fleet.questions import as_frame
from vmishell.fleet.targets import Target, expand, is_scheme
from vmishell.fleet.task import Outcome, run_target
from vmishell.lab.fleet import comm_of, instance_names, scenario


# -- targets ----------
def test_globs_expand_on_the_client_sorted_and_once(tmp_path: Path) -> None:
    for name in ("b.raw", "a.raw", "c.elf"):
        (tmp_path / name).write_bytes(b"x")
    targets, problems = expand([str(tmp_path / "*.raw"), "lab:one", str(tmp_path / "a.raw")])
    assert [t.spec for t in targets] == [
        str(tmp_path / "a.raw"),
        str(tmp_path / "b.raw"),
        "lab:one",
    ]
    assert problems == {}


def test_a_glob_that_matches_nothing_is_a_problem_not_an_exception(tmp_path: Path) -> None:
    targets, problems = expand([str(tmp_path / "none-*.raw"), "qmp:/run/q.sock"])
    assert [t.spec for t in targets] == ["qmp:/run/q.sock"]
    assert list(problems) == [str(tmp_path / "none-*.raw")]


def test_schemes_are_targets_and_existing_paths_are_files(tmp_path: Path) -> None:
    assert is_scheme("lab:a") and is_scheme("libvirt:web@qemu:///system")
    odd = tmp_path / "lab:a"
    odd.write_bytes(b"")
    assert not is_scheme(str(odd))
    assert not is_scheme("/images/a.raw")


def test_placement_is_kept_through_expansion(tmp_path: Path) -> None:
    (tmp_path / "x.raw").write_bytes(b"")
    placed = Target(str(tmp_path / "*.raw"), workers=("hv1",), resources={"host-hv1": 1})
    [target], _ = expand([placed])
    assert target.workers == ("hv1",) and dict(target.resources or {}) == {"host-hv1": 1}


def test_targets_must_be_strings_or_paths() -> None:
    with pytest.raises(FleetError):
        expand([42])  # type: ignore[list-item]


# -- bounds ----------
def test_a_frame_is_cut_to_the_row_and_cell_bounds_with_notes() -> None:
    df = pd.DataFrame({"pid": range(10), "comm": ["x" * 50] * 10, "raw": [b"y" * 50] * 10})
    cut, notes = bound_frame(df, Bounds(max_rows=4, max_cell=8))
    assert len(cut) == 4
    assert set(cut.comm) == {"x" * 8} and set(cut.raw) == {b"y" * 8}
    assert len(notes) == 2 and "max_rows" in notes[0] and "max_cell" in notes[1]
    assert df.comm[0] == "x" * 50  # the input is not changed


def test_a_frame_within_bounds_is_untouched() -> None:
    df = pd.DataFrame({"pid": [1, 2], "comm": ["init", "sh"]})
    cut, notes = bound_frame(df, Bounds())
    pd.testing.assert_frame_equal(cut, df)
    assert notes == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"a": 1}, pd.DataFrame({"a": [1]})),
        ([{"a": 1}, {"a": 2}], pd.DataFrame({"a": [1, 2]})),
        (7, pd.DataFrame({"value": [7]})),
        ([1, 2], pd.DataFrame({"value": [1, 2]})),
        (None, pd.DataFrame()),
    ],
)
def test_a_user_function_answer_becomes_rows(value: object, expected: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(as_frame(value), expected)


# -- assembly ----------
def test_answers_are_combined_in_target_order_with_a_target_column() -> None:
    a = pd.DataFrame({"pid": [1, 2]})
    a.attrs["vmishell.hex"] = ["task"]
    outcomes = [
        Outcome("img/b", answer=pd.DataFrame({"pid": [7]})),
        Outcome("lab:x", error_type="TargetTimeout", error="no answer", worker="w1"),
        Outcome("img/a", answer=a, notes=["1 rows cut"]),
    ]
    sweep = combine(outcomes)
    assert sweep.frame.columns.tolist() == ["target", "pid"]
    assert sweep.frame.target.tolist() == ["img/b", "img/a", "img/a"]
    assert sweep.frame.pid.tolist() == [7, 1, 2]
    assert sweep.frame.attrs["vmishell.hex"] == ["task"]
    assert sweep.errors.columns.tolist() == ERROR_COLUMNS
    assert sweep.errors.values.tolist() == [["lab:x", "TargetTimeout", "no answer", "w1"]]
    assert sweep.notes.values.tolist() == [["img/a", "1 rows cut"]]
    assert sweep.timings.target.tolist() == ["img/b", "lab:x", "img/a"]


def test_a_sweep_where_nothing_answered_is_an_empty_frame_with_a_target_column() -> None:
    sweep = combine([Outcome("a", error_type="ProfileError", error="no profile")])
    assert sweep.frame.columns.tolist() == ["target"] and len(sweep.frame) == 0
    assert len(sweep.errors) == 1


# -- the sandbox ----------
def test_a_target_that_blocks_forever_is_cut_off_at_the_deadline(tmp_path: Path) -> None:
    fifo = tmp_path / "hang.raw"
    os.mkfifo(fifo)
    out = run_target(str(fifo), "processes", pickle.dumps({}), timeout=20.0)
    assert out.error_type == "TargetTimeout"
    assert str(fifo) in (out.error or "") and "killed" in (out.error or "")
    assert 20.0 <= out.wall < 60.0


def test_a_garbage_image_is_a_vmishell_error_row_and_the_sandbox_carries_on(
    tmp_path: Path,
) -> None:
    junk = tmp_path / "junk.raw"
    junk.write_bytes(bytes(range(256)) * 64)
    first = run_target(str(junk), "processes", pickle.dumps({}), timeout=120.0)
    assert first.error_type == "ProfileError" and str(junk) in (first.error or "")
    missing = run_target(str(tmp_path / "gone.raw"), "processes", pickle.dumps({}))
    assert issubclass(getattr(errors, missing.error_type or ""), errors.VmiError)
    assert "gone.raw" in (missing.error or "")


# -- the lab's fleet ----------
def test_each_fleet_instance_runs_its_own_scenario() -> None:
    assert instance_names("web", 3) == ["web-1", "web-2", "web-3"]
    scripts = [scenario(k) for k in (1, 2, 3)]
    assert len(set(scripts)) == 3
    assert all(comm_of(k) in scripts[k - 1] and len(comm_of(k)) <= 15 for k in (1, 2, 3))
    with pytest.raises(errors.LabError):
        instance_names("web", 0)


# -- the sweep's bookkeeping ----------
def test_batches_keep_order_size_and_placement() -> None:
    from vmishell.fleet.core import _batches

    anywhere = [(Target(f"img/{i}"), b"") for i in range(5)]
    placed = [(Target("lab:a", workers=("hv1",)), b""), (Target("lab:b", workers=("hv1",)), b"")]
    batches = _batches([*anywhere, *placed], 2)
    assert [[t.spec for t, _ in b] for b in batches] == [
        ["img/0", "img/1"],
        ["img/2", "img/3"],
        ["img/4"],
        ["lab:a", "lab:b"],
    ]
    assert len(_batches(anywhere, 1)) == 5


def test_what_dask_reports_for_a_failed_task_becomes_an_error_row() -> None:
    from vmishell.fleet.core import _outcome

    class KilledWorker(Exception):  # stands for distributed's, which needs a live worker
        pass

    lost = _outcome("lab:a", KilledWorker("task"), KilledWorker)
    assert (lost.target, lost.error_type) == ("lab:a", "WorkerLost")
    failed = _outcome("lab:b", (RuntimeError, RuntimeError("boom"), None), KilledWorker)
    assert (failed.error_type, failed.error) == ("RuntimeError", "boom")
    mine = Outcome("lab:c", answer=pd.DataFrame())
    assert _outcome("lab:c", mine, KilledWorker) is mine


def test_lab_up_count_boots_named_instances_each_with_its_scenario(monkeypatch, capsys) -> None:
    """The CLI's wiring only: `runner.up` is recorded (booting is the lab tests' part)."""
    from types import SimpleNamespace

    from vmishell.cli import main
    from vmishell.lab import runner

    booted: list[tuple[str, str]] = []

    def up(guest: str, name: str, *, init_script: Path, **_: object) -> SimpleNamespace:
        booted.append((name, Path(init_script).read_text()))
        spec = SimpleNamespace(name=guest)
        return SimpleNamespace(name=name, spec=spec, boot_seconds=1.0, pid=1)

    monkeypatch.setattr(runner, "up", up)
    assert main(["lab", "up", "x86_64", "--count", "2", "--name", "web"]) == 0
    assert [name for name, _ in booted] == ["web-1", "web-2"]
    assert [script for _, script in booted] == [scenario(1), scenario(2)]
    assert "lab:web-2" in capsys.readouterr().out


def test_the_dashboard_link_is_shown_in_jupyter_only(monkeypatch) -> None:
    import IPython
    import IPython.display

    from vmishell.fleet.cluster import show_dashboard

    class ZMQInteractiveShell:  # what a Jupyter kernel's shell is called
        pass

    class Client:
        dashboard_link = "http://127.0.0.1:8787/status"

    shown: list[str] = []
    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(obj.data))
    monkeypatch.setattr(IPython, "get_ipython", lambda: None)
    show_dashboard(Client())
    assert shown == []  # a terminal: the progress bar, no link
    monkeypatch.setattr(IPython, "get_ipython", ZMQInteractiveShell)
    show_dashboard(Client())
    assert len(shown) == 1 and 'href="http://127.0.0.1:8787/status"' in shown[0]
