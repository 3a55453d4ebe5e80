"""Shared fixtures: real lab guests booted once per test session.

Each guest boots at most once per session (under a session-unique instance
name, so parallel sessions and a developer's own guests do not collide) and
is stopped at the end. Guests that the collected tests need are started
concurrently on first use, which keeps the whole lab suite near one boot time.

A guest that cannot be built or booted (no QEMU, no route to the Debian
archive) skips the tests that need it, with the reason, except under CI=true,
where that is a failure: CI must prove the features on real guests.

A module may define `boot_in_background(workdir, env)` and `stop_background()` for
a long boot that needs one CPU (the Xen host: minutes under TCG, most of them
waiting for its HVM DomU). That boot starts with the session, in a thread;
the tests that boot nothing run first, on the other CPU, then that module's
tests (its fixture takes the result from `background_boot` and stops the
host), then every other lab test: no other guest runs beside the long boot.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from vmishell.errors import VmiError

#: Fixture name -> guest name, for the per-guest convenience fixtures.
GUEST_FIXTURES = {
    "x86_64_guest": "x86_64",
    "la57_guest": "x86_64-la57",
    "i386_pae_guest": "i386-pae",
    "i386_guest": "i386",
}

#: Fixtures through which a test gets a lab guest booted.
LAB_FIXTURES = frozenset({"lab_pool", "lab_guest", *GUEST_FIXTURES})

_NEEDED = pytest.StashKey[set[str]]()
_BACKGROUND = pytest.StashKey[dict[str, "Background"]]()


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def lab_unavailable(reason: str) -> None:
    """Skip (developer machine) or fail (CI) a test whose lab guest is unavailable."""
    if in_ci():
        pytest.fail(f"lab guest unavailable under CI: {reason}", pytrace=False)
    pytest.skip(f"lab guest unavailable: {reason}")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "lab: needs real QEMU lab guests (fails under CI=true when they cannot boot)"
    )


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: only the selected tests count
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Remember which guests the selected tests use, to boot them together."""
    needed: set[str] = set()
    for item in items:
        for fixture, guest in GUEST_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                needed.add(guest)
        callspec = getattr(item, "callspec", None)
        if callspec is not None and isinstance(callspec.params.get("guest_name"), str):
            needed.add(callspec.params["guest_name"])
    config.stash[_NEEDED] = needed
    _order(items)


def boots_guests(item: pytest.Item) -> bool:
    """Whether a test boots lab guests: marked `lab`, or using a lab fixture."""
    if item.get_closest_marker("lab") is not None:
        return True
    return not LAB_FIXTURES.isdisjoint(getattr(item, "fixturenames", ()))


def _order(items: list[pytest.Item]) -> None:
    """Modules that boot nothing first, then those with a background boot, then the rest.

    A module's tests stay together and in their order (module fixtures set up once).
    """
    rank: dict[object, int] = {}
    for item in items:
        module = getattr(item, "module", None)
        here = 2 if boots_guests(item) else 0
        rank[module] = (
            1 if hasattr(module, "boot_in_background") else max(rank.get(module, 0), here)
        )
    items.sort(key=lambda item: rank[getattr(item, "module", None)])


class Background:
    """A module's `boot_in_background`, running in a daemon thread from the session start."""

    def __init__(self, module) -> None:
        self.module = module
        self.workdir = Path(tempfile.mkdtemp(prefix="vmishell-background-"))
        self.future: Future = Future()
        self.env = dict(os.environ)  # before any test changes it
        threading.Thread(target=self._run, name=f"boot {module.__name__}", daemon=True).start()

    def _run(self) -> None:
        try:
            self.future.set_result(self.module.boot_in_background(self.workdir, self.env))
        except BaseException as exc:  # handed to the fixture that asks for the result
            self.future.set_exception(exc)

    def close(self, patience: float = 120.0) -> None:
        """Stop what the boot started, also while it is still booting; remove its files."""
        deadline = time.monotonic() + patience
        self.module.stop_background()
        while not self.future.done() and time.monotonic() < deadline:
            time.sleep(2)  # a QEMU started after the first stop: stop it too
            self.module.stop_background()
        self.module.stop_background()
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> None:
    """Start the background boots of the selected modules (not for --collect-only)."""
    started: dict[str, Background] = {}
    session.config.stash[_BACKGROUND] = started
    if session.config.option.collectonly:
        return
    for item in session.items:
        module = getattr(item, "module", None)
        if hasattr(module, "boot_in_background") and module.__name__ not in started:
            started[module.__name__] = Background(module)


def pytest_sessionfinish(session: pytest.Session) -> None:
    for background in session.config.stash.get(_BACKGROUND, {}).values():
        background.close()


@pytest.fixture(scope="session")
def background_boot(request: pytest.FixtureRequest) -> Callable[[str], Future]:
    """Factory: `background_boot(__name__)` -> the Future of that module's background boot."""
    started = request.config.stash.setdefault(_BACKGROUND, {})

    def get(name: str) -> Future:
        if name not in started:  # its tests were not selected when the session started
            import sys

            started[name] = Background(sys.modules[name])
        return started[name].future

    return get


class LabPool:
    """Boots guests on demand (concurrently) and stops them all at the end."""

    def __init__(self, prefix: str, needed: set[str]) -> None:
        self.prefix = prefix
        self._needed = needed
        self._futures: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="lab-up")

    def instance_name(self, guest: str) -> str:
        return f"{self.prefix}-{guest}"

    def _boot(self, guest: str):  # -> RunningGuest
        from vmishell.lab.runner import up

        return up(guest, self.instance_name(guest), timeout=240)

    def _start(self, guest: str) -> Future:
        with self._lock:
            if guest not in self._futures:
                self._futures[guest] = self._executor.submit(self._boot, guest)
            return self._futures[guest]

    def get(self, guest: str):  # -> RunningGuest
        """The running instance of `guest`, booting it (and its siblings) if needed."""
        from vmishell.lab.guests import get_guest

        try:
            get_guest(guest)
        except VmiError as exc:
            pytest.fail(str(exc))
        # Build every needed image first (serially: builds share apt state), then boot
        # all of them at once: under TCG each boot is CPU-bound for ~10 s.
        self._prebuild({guest} | self._needed)
        for other in sorted(self._needed | {guest}):
            self._start(other)
        try:
            return self._futures[guest].result()
        except VmiError as exc:
            lab_unavailable(f"{guest}: {exc}")
            raise AssertionError("unreachable") from exc

    def _prebuild(self, guests: set[str]) -> None:
        from vmishell.lab.build import build_guest

        for guest in sorted(guests):
            if guest in self._futures:
                continue
            # A failure here is reported by the boot of that guest, with the same error.
            with contextlib.suppress(VmiError):
                build_guest(guest)

    def close(self) -> None:
        from vmishell.lab.runner import down

        self._executor.shutdown(wait=True)
        for future in self._futures.values():
            if future.exception() is None:
                with contextlib.suppress(VmiError):
                    down(future.result().name)


def _owner_alive(name: str) -> bool:
    """Whether the test process named in an instance `t-PID-...` still runs (another worker)."""
    pid = name.split("-")[1] if name.count("-") >= 1 else ""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale_test_instances() -> None:
    """Remove instances of earlier test sessions whose QEMU died (e.g. a killed run)."""
    try:
        from vmishell.lab.runner import down, list_guests

        for st in list_guests():
            if st.name.startswith("t-") and st.state == "stale" and not _owner_alive(st.name):
                down(st.name)
    except VmiError:
        pass


@pytest.fixture(scope="session")
def lab_pool(request: pytest.FixtureRequest) -> Iterator[LabPool]:
    _clean_stale_test_instances()
    pool = LabPool(f"t-{os.getpid()}", request.config.stash.get(_NEEDED, set()))
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def lab_guest(lab_pool: LabPool) -> Callable[[str], object]:
    """Factory: `lab_guest("x86_64")` -> the session's RunningGuest of that guest."""
    return lab_pool.get


@pytest.fixture(scope="session")
def x86_64_guest(lab_guest):
    return lab_guest("x86_64")


@pytest.fixture(scope="session")
def la57_guest(lab_guest):
    return lab_guest("x86_64-la57")


@pytest.fixture(scope="session")
def i386_pae_guest(lab_guest):
    return lab_guest("i386-pae")


@pytest.fixture(scope="session")
def i386_guest(lab_guest):
    return lab_guest("i386")
