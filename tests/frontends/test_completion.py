"""Which argument is being typed decides what completes (no guest: fake names)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vmishell.frontends.completion import MagicCompleter
from vmishell.frontends.targets import Targets

SYMBOLS = ["init_task", "init_mm", "jiffies", "linux_banner"]
TYPES = ["task_struct", "task_group", "mm_struct", "unsigned int"]


class FakeSession:
    def __init__(self) -> None:
        self.profile = SimpleNamespace(symbol_names=lambda: SYMBOLS, type_names=lambda: TYPES)
        self.ps_calls = 0

    def processes(self, **kw):
        import pandas as pd

        self.ps_calls += 1
        return pd.DataFrame({"pid": [1, 12, 84, 120]})

    def close(self) -> None:
        pass


@pytest.fixture
def completer() -> tuple[MagicCompleter, FakeSession, list[float]]:
    session = FakeSession()
    targets = Targets(lambda spec, **kw: session)
    targets.attach("lab:alpha")
    targets.attach("lab:beta")
    now = [0.0]
    c = MagicCompleter(
        targets,
        lab_guests=lambda: ["alpha", "beta", "demo"],
        clock=lambda: now[0],
        options={"ps": ["--kernel", "--pid", "--threads", "--user"]},
    )
    return c, session, now


@pytest.mark.parametrize(
    ("line", "fragment", "expected"),
    [
        ("%attach de", "de", ["demo"]),
        ("%attach lab:a", "lab:a", ["lab:alpha"]),
        ("%use b", "b", ["beta"]),
        ("%detach ", "", ["alpha", "beta"]),
        ("%ps -t a", "a", ["alpha"]),
        ("%ps --t", "--t", ["--threads"]),
        ("%peek init_", "init_", ["init_mm", "init_task"]),
        ("%peek init_task+jif", "jif", ["jiffies"]),
        ("%peek (linux_banner + 8) 16 -p 8", "8", ["84"]),
        ("x = %watch 0x600040 8 --pid 1", "1", ["1", "12", "120"]),
        ("%dt task_", "task_", ["task_group", "task_struct"]),
        ("%dt task_struct ji", "ji", ["jiffies"]),
        ("%dt struct task_struct init_t", "init_t", ["init_task"]),
        ("%peek 0 --as task_s", "task_s", ["task_struct"]),
        ("%peek 0 --as u3", "u3", ["u32"]),
    ],
)
def test_completions_by_position(completer, line, fragment, expected) -> None:
    c, _, _ = completer
    s = c.suggest(line)
    assert s is not None and s.fragment == fragment and s.candidates == expected


@pytest.mark.parametrize(
    "line", ["print(1)", "%pe", "%timeit init_", "%peek 0x600000 -p 84 --every 1", "%peek 12ab"]
)
def test_other_lines_are_left_to_ipython(completer, line) -> None:
    c, _, _ = completer
    assert c.suggest(line) is None


def test_pids_are_cached_for_a_few_seconds(completer) -> None:
    c, session, now = completer
    c.suggest("%peek 0 -p ")
    c.suggest("%peek 0 -p 1")
    assert session.ps_calls == 1
    now[0] += 10
    c.suggest("%peek 0 -p ")
    assert session.ps_calls == 2


def test_attach_completions_leave_room_for_file_names(completer) -> None:
    c, _, _ = completer
    suggestion = c.suggest("%attach ")
    assert suggestion is not None and not suggestion.exclusive
