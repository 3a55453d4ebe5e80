"""An arm64 guest that resets is followed without registers (its own guest and module).

A module of its own so that its guest never runs beside test_arm64_linux's: each
arm64 guest is CPU-bound under TCG while it boots.
"""

from __future__ import annotations

import os

import pytest

from vmishell.lab.workload import MARKER
from vmishell.session import Session

pytestmark = pytest.mark.lab


def test_a_reset_arm64_guest_is_followed_by_its_sessions() -> None:
    """After a reset the session finds the new boot's kernel without registers: from QEMU's
    RESET event, or (a bare RAM file) from the kernel's tick counter going back; objects
    taken before refuse. A guest of its own, booted so that a reset boots it again."""
    import contextlib
    import warnings

    from tests.conftest import lab_unavailable
    from tests.lab.test_lifecycle_lab import truth_of_boot, until
    from vmishell.errors import StaleObjectError, VmiError
    from vmishell.lab import runner

    name = f"t-{os.getpid()}-aarch64-reset"
    try:
        guest = runner.up("aarch64", name, reboot=True, timeout=300)
    except VmiError as exc:
        lab_unavailable(f"aarch64 (reboot): {exc}")
        raise AssertionError("unreachable") from exc
    try:
        first = truth_of_boot(guest, 0)
        evented = Session.attach(f"lab:{guest.name}")
        plain = Session.qemu(guest.ram_path, guest.qmp_path, machine="virt")
        old = evented.process(first.marker_pid)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            with guest.qmp() as q:
                q.command("system_reset")
            # Sessions in use: the bare RAM file's sees the tick counter go back (QEMU
            # reloads the image, KASLR's seed and so the kernel's place stay the same).
            for s in (plain, evented):

                def followed(s: Session = s) -> bool:
                    with contextlib.suppress(VmiError):  # GuestRebooting until found
                        s.processes()
                    return s.boot == 1

                until(followed, 90, f"{s.name} did not follow the reboot")
            second = truth_of_boot(guest, 1)
        assert sum("rebooted" in str(w.message) for w in said) == 2
        with pytest.raises(StaleObjectError):
            old.read(first.marker_va, 16)
        for s in (evented, plain):
            assert len(s.events) == 1 and "kernel located again" in s.events[0]
            assert second.marker_pid in set(s.processes().pid)
            assert s.process(second.marker_pid).read(second.marker_va, len(MARKER)) == MARKER
            s.close()
    finally:
        runner.down(name)
