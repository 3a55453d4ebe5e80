"""LibVMI's file driver on lab dumps sees what vmishell's own raw reader sees.

The same dump is opened twice, through LibVMI and through RawImageSource:
processes, maps and bytes must be equal, and LibVMI's own page walk must land
where vmishell's does for kernel symbols and the marker. Under CI=true a
missing libvmi wheel is a failure, not a skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmishell.lab.workload import layout
from vmishell.session import Session
from vmishell.sources.files import RawImageSource
from vmishell.sources.libvmi import INSTALL_HINT, LibvmiSource, libvmi_available

pytestmark = pytest.mark.lab

GUESTS = ["x86_64", "i386-pae"]
KERNEL_SYMBOLS = ["_text", "linux_banner", "init_task"]


@pytest.fixture(scope="module", autouse=True)
def _libvmi() -> None:
    if not libvmi_available():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"libvmi cannot be imported under CI: {INSTALL_HINT}", pytrace=False)
        pytest.skip(f"libvmi not installed: {INSTALL_HINT}")


@pytest.fixture(params=GUESTS)
def guest_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def raw_dumps(lab_guest, tmp_path_factory: pytest.TempPathFactory):
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            path = tmp_path_factory.mktemp("libvmi") / f"{name}.raw"
            made[name] = lab_guest(name).dump(path, "raw")
        return made[name]

    yield get
    for path in made.values():
        path.unlink(missing_ok=True)


@pytest.fixture
def pair(lab_guest, raw_dumps, guest_name):
    """(LibVMI session, RawImageSource session, guest) on one dump of the guest."""
    dump = raw_dumps(guest_name)
    ours = Session.image(dump)
    theirs = Session.attach(f"libvmi-file:{dump}", profile=ours.profile)
    yield theirs, ours, lab_guest(guest_name)
    theirs.close()
    ours.close()


def test_attach_goes_through_libvmi(pair) -> None:
    theirs, ours, _ = pair
    assert isinstance(theirs.source, LibvmiSource)
    assert isinstance(ours.source, RawImageSource)
    assert list(theirs.source.ranges()) == list(ours.source.ranges())


def test_the_same_processes(pair) -> None:
    theirs, ours, _ = pair
    a, b = theirs.processes(), ours.processes()
    assert len(a) > 20
    assert a.equals(b)


def test_the_same_maps(pair) -> None:
    theirs, ours, guest = pair
    pid = guest.truth().marker_pid
    assert theirs.process(pid).maps().equals(ours.process(pid).maps())


def test_the_same_bytes_everywhere(pair) -> None:
    theirs, ours, _ = pair
    size, chunk = ours.source.size, 16 << 20
    for paddr in range(0, size, chunk):
        n = min(chunk, size - paddr)
        assert theirs.source.read(paddr, n) == ours.source.read(paddr, n), hex(paddr)


def test_libvmis_page_walk_lands_where_vmishells_does(pair) -> None:
    theirs, ours, guest = pair
    lv = theirs.source
    kernel = ours.kernel
    mode = ours.guest.location.mode
    for name in KERNEL_SYMBOLS:
        vaddr = ours.symbol(name)
        assert lv.translate(vaddr, kernel.dtb, mode) == kernel.translate(vaddr).paddr, name
    truth = guest.truth()
    marker = ours.process(truth.marker_pid)
    lay = layout(guest.spec.arch)
    for vaddr in (lay.marker_va, lay.counter_va, *truth.pagemap):
        try:
            expected = marker.translate(vaddr).paddr
        except Exception:
            continue  # not present: nothing to compare
        assert lv.translate(vaddr, marker.dtb, mode) == expected, hex(vaddr)
    assert lv.translate(lay.marker_va, marker.dtb, mode) == truth.marker_paddr
